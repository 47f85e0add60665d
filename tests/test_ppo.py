"""PPO in the simulator: slate sampling and its exact log-probability, GAE against a NumPy loop, a
policy started at greedy, and a short training run that learns and resumes from its checkpoint."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import quickstart
from pasta_jax import simulator
from pasta_jax.agent import baselines, ppo, value
from pasta_jax.data import synthetic

SIZES = dict(num_categories=5, slate_size=4)


@pytest.fixture(scope="module")
def env():
  config = quickstart.get_config("tiny")
  world = synthetic.make_world(jax.random.key(0), config)
  users = synthetic.PlantedUsers(world)
  return simulator.make_params(config.interaction, synthetic.SyntheticExpander(world), users, users)


def test_sampled_slates_follow_their_log_probability():
  logits = jnp.array([0.5, -1.0, 2.0, 0.0, 1.0, -0.5])
  category = jnp.array([0, 0, 1, 1, 2, 2])
  draws = jax.vmap(ppo.sample_slate, in_axes=(0, None, None, None, None))(
    jax.random.split(jax.random.key(0), 20_000), logits, category, 3, 2
  )
  slates, log_probs = np.asarray(draws[0]), np.asarray(draws[1])
  assert all(len(set(np.asarray(category)[s])) == 2 for s in slates[:200])
  total = 0.0
  for pair in itertools.permutations(range(6), 2):
    if category[pair[0]] == category[pair[1]]:
      continue
    exact = float(jnp.exp(ppo.slate_log_prob(logits, category, jnp.array(pair), 3)[0]))
    total += exact
    frequency = np.mean(np.all(slates == pair, axis=1))
    assert abs(frequency - exact) < 0.015
    seen = np.all(slates == pair, axis=1)
    if seen.any():
      np.testing.assert_allclose(np.exp(log_probs[seen][0]), exact, rtol=1e-5)
  np.testing.assert_allclose(total, 1.0, rtol=1e-5)


def test_gae_matches_a_numpy_loop():
  rng = np.random.default_rng(0)
  rewards, values = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
  adv, returns = ppo.gae(jnp.asarray(rewards), jnp.asarray(values), 0.9, 0.8)
  expected = np.zeros_like(rewards)
  for n in range(3):
    running = 0.0
    for t in reversed(range(5)):
      next_v = values[n, t + 1] if t < 4 else 0.0
      running = rewards[n, t] + 0.9 * next_v - values[n, t] + 0.9 * 0.8 * running
      expected[n, t] = running
  np.testing.assert_allclose(adv, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(returns, expected + values, rtol=1e-5, atol=1e-6)


def _settings(**overrides) -> ppo.PPOSettings:
  fields = dict(
    inputs="text+images+belief+utilities",
    hidden=(16,),
    learning_rate=1e-3,
    num_envs=64,
    iterations=4,
    epochs=2,
    minibatches=2,
    discount=0.9,
    gae_lambda=0.95,
    clip=0.2,
    entropy_coef=0.01,
    value_coef=0.5,
    max_grad_norm=1.0,
    iterations_per_dispatch=2,
    checkpoint_every_iterations=2,
  )
  return ppo.PPOSettings(**{**fields, **overrides})


def _policy(settings):
  return ppo.PPOPolicy(hidden=settings.hidden, inputs=value.parse_inputs(settings.inputs), **SIZES)


def test_untrained_policy_with_utilities_is_greedy(env):
  settings = _settings()
  policy = _policy(settings)
  state = ppo.init_state(jax.random.key(1), policy, env, settings)
  params = {"network": state.params, "users": env.belief}
  greedy = baselines.Greedy(**SIZES)
  ids, types_ = jnp.arange(16), jnp.full(16, -1)
  ours = simulator.rollout(jax.random.key(2), ids, types_, env, policy, params, False, False)
  theirs = simulator.rollout(jax.random.key(2), ids, types_, env, greedy, env.belief, False, False)
  np.testing.assert_array_equal(ours.slate, theirs.slate)


def test_the_policy_never_reads_the_true_type(env):
  settings = _settings()
  policy = _policy(settings)
  state = ppo.init_state(jax.random.key(1), policy, env, settings)
  params = {"network": state.params, "users": env.belief}
  _, env_state = simulator.reset(jax.random.key(3), env)
  slates = [
    policy(None, simulator.reset(jax.random.key(3), env, user_type=k)[0], params)
    for k in range(env.users.log_priors.shape[0])
  ]
  assert not isinstance(policy, simulator.PrivilegedPolicy)
  for s in slates[1:]:
    np.testing.assert_array_equal(s, slates[0])


def test_the_policy_reads_the_images_chosen_in_the_turns_played(env):
  settings = _settings(inputs="text+chosen_images")
  policy = _policy(settings)
  state = ppo.init_state(jax.random.key(1), policy, env, settings)
  _, env_state = simulator.reset(jax.random.key(3), env)
  obs, *_ = simulator.step(jax.random.key(4), env_state, jnp.arange(SIZES["slate_size"]), env)
  f = ppo.features(obs, env.belief, policy.inputs)
  assert f.belief is None and f.images is None
  np.testing.assert_allclose(f.history_images, jnp.mean(obs.history_images, axis=-2), atol=1e-6)
  scores, _ = policy.network().apply(state.params, f)
  unplayed = f.replace(history_images=f.history_images.at[1:].add(1.0))
  played = f.replace(history_images=f.history_images.at[0].add(1.0))
  np.testing.assert_array_equal(policy.network().apply(state.params, unplayed)[0], scores)
  assert not np.allclose(policy.network().apply(state.params, played)[0], scores)


def test_training_runs_improves_and_resumes(env, tmp_path):
  settings = _settings(
    inputs="text",
    hidden=(32,),
    iterations=20,
    iterations_per_dispatch=10,
    checkpoint_every_iterations=10,
    learning_rate=3e-3,
  )
  policy = _policy(settings)
  state, history = ppo.train(settings, policy, env, jax.random.key(4), show_progress=False)
  assert np.all(np.isfinite(history["return"]))
  assert np.mean(history["return"][-5:]) > np.mean(history["return"][:5])
  resumed, _ = ppo.train(
    settings, policy, env, jax.random.key(4), str(tmp_path), False, stop_after=10
  )
  resumed, _ = ppo.train(settings, policy, env, jax.random.key(4), str(tmp_path), False)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
