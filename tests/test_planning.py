"""The lookahead planner: its slate value against a NumPy computation (exact over the L columns), its
value of information is never negative, and it runs in the simulator's jitted rollout."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import quickstart
from pasta_jax import simulator
from pasta_jax.agent import planning, slate
from pasta_jax.data import synthetic


def _softmax(x, axis):
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def _numpy_q(columns, log_b, u, tau, category, num_categories, immediate, lookahead):
  b = np.exp(log_b)
  shown = u[columns]  # [L, K]
  p = _softmax(tau * shown, axis=0)  # [L, K]
  now = np.sum(p * shown * b)
  later = 0.0
  for i in range(len(columns)):
    post = b * p[i]
    post = post / post.sum()
    greedy = np.asarray(
      slate.select_slate(jnp.asarray(u @ post), jnp.asarray(category), num_categories, len(columns))
    )
    q = _softmax(tau * u[greedy], axis=0)
    later += np.sum(b * p[i]) * np.sum(q * u[greedy] * post)
  return immediate * now + lookahead * later


def test_slate_value_matches_numpy_and_information_has_value():
  rng = np.random.default_rng(0)
  num_candidates, num_types, num_categories, size = 10, 3, 5, 3
  u = rng.normal(size=(num_candidates, num_types)).astype(np.float32)
  category = np.repeat(np.arange(num_categories), 2).astype(np.int32)
  log_b = np.log(np.array([0.5, 0.3, 0.2], np.float32))
  columns = np.array([0, 3, 8], np.int32)
  got = planning.slate_q(
    jnp.asarray(columns),
    jnp.ones(size, bool),
    jnp.asarray(log_b),
    jnp.asarray(u),
    2.0,
    jnp.asarray(category),
    num_categories,
    1.0,
    0.9,
  )
  want = _numpy_q(columns, log_b, u, 2.0, category, num_categories, 1.0, 0.9)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  later = planning.slate_q(
    jnp.asarray(columns),
    jnp.ones(size, bool),
    jnp.asarray(log_b),
    jnp.asarray(u),
    2.0,
    jnp.asarray(category),
    num_categories,
    0.0,
    1.0,
  )
  prior = planning.belief_value(
    jnp.asarray(log_b), jnp.asarray(u), 2.0, jnp.asarray(category), num_categories, size
  )
  assert later >= prior - 1e-5


def test_planner_runs_in_the_simulator_and_shows_one_prompt_per_category():
  config = quickstart.get_config("tiny")
  world = synthetic.make_world(jax.random.key(0), config)
  users = synthetic.PlantedUsers(world)
  env = simulator.make_params(config.interaction, synthetic.SyntheticExpander(world), users, users)
  planner = planning.Planner(num_categories=5, slate_size=4, discount=0.9)
  out = simulator.rollout(
    jax.random.key(1), jnp.arange(8), jnp.full(8, -1), env, planner, users, False, False
  )
  assert out.slate.shape == (8, config.interaction.turns, 4)
  assert all(len(set(row)) == 4 for row in np.asarray(out.category).reshape(-1, 4))
  assert np.all(np.isfinite(out.utility))
