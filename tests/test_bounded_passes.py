"""Passes over every logged session or user run in bounded device memory: `agent.data.map_sessions`
calls one compiled kernel on equal, padded chunks of sessions; `posterior.user_beliefs` maps users in
batches. Each equals the all-at-once kernel and a NumPy reference, for a count that is not a multiple
of the chunk, and compiles once for every chunk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasta_jax import simulator, types
from pasta_jax.agent import data, ppo
from pasta_jax.user_model import posterior, utility
from tests import reference

SESSIONS, TURNS, SLATE, IMAGES, DIM, TYPES, ROWS = 7, 2, 3, 2, 5, 3, 11
CHUNK = 3  # Sessions per call: 7 sessions are 3 calls, the last padded.


@pytest.fixture(scope="module")
def fitted():
  """Fitted users with text features, mean over real images, heads scaled so padding would show."""
  model = utility.UtilityModel(num_types=TYPES, hidden=(4,), use_text_features=True)
  example = types.OptionFeatures(
    image=jnp.zeros((SLATE, IMAGES, DIM)), text=jnp.zeros((SLATE, DIM))
  )
  params = jax.tree.map(lambda x: 3.0 * x, model.init(jax.random.key(1), example))
  log_priors = jnp.log(jnp.asarray([0.5, 0.3, 0.2]))
  return utility.FittedUsers(model=model, params=params, log_priors=log_priors)


def _sessions(num_sessions: int, seed: int) -> tuple[types.FeatureTable, data.Sessions]:
  """A feature table and `num_sessions` sessions of 3 users with ragged slates: the last option of
  even sessions' turn 0 is missing, and the second image of every odd turn's first option."""
  rng = np.random.default_rng(seed)
  table = types.FeatureTable(
    image=rng.normal(size=(ROWS, DIM)).astype(np.float32),
    text=rng.normal(size=(ROWS, DIM)).astype(np.float32),
  )
  option_mask = np.ones((num_sessions, TURNS, SLATE), bool)
  option_mask[::2, 0, -1] = False
  image_mask = np.broadcast_to(option_mask[..., None], option_mask.shape + (IMAGES,)).copy()
  image_mask[:, 1::2, 0, 1] = False
  image_rows = np.where(image_mask, rng.integers(0, ROWS, image_mask.shape), 0).astype(np.int32)
  text_rows = rng.integers(0, ROWS, option_mask.shape)
  sessions = data.Sessions(
    user=rng.integers(0, 3, num_sessions).astype(np.int32),
    history=rng.normal(size=(num_sessions, TURNS + 1, DIM)).astype(np.float32),
    slate_text=np.where(option_mask[..., None], table.text[text_rows], 0.0).astype(np.float32),
    image_rows=image_rows,
    category=rng.integers(0, 2, option_mask.shape).astype(np.int32),
    choice=rng.integers(0, SLATE - 1, (num_sessions, TURNS)).astype(np.int32),
    option_mask=option_mask,
    image_mask=image_mask,
  )
  return table, sessions


def _reference_utilities(fitted, table, sessions) -> tuple[np.ndarray, float]:
  """NumPy utilities f64[S, H, L, K] over the real images and τ."""
  utils, tau = reference.utilities(
    fitted.params,
    np.asarray(table.image)[sessions.image_rows],
    sessions.slate_text,
    image_mask=sessions.image_mask,
  )
  return utils, float(tau)


def test_label_rewards_in_chunks_match_all_at_once_and_numpy(fitted):
  table, sessions = _sessions(SESSIONS, seed=0)
  posteriors = np.random.default_rng(1).dirichlet(np.ones(TYPES), 3).astype(np.float32)
  compiled = data.expected_chosen_utility._cache_size()
  rewards = data.label_rewards(fitted, table, sessions, posteriors, sessions_per_call=CHUNK)
  assert data.expected_chosen_utility._cache_size() - compiled <= 1
  at_once = data.expected_chosen_utility(
    fitted,
    np.asarray(table.image)[sessions.image_rows],
    sessions.slate_text,
    sessions.choice,
    posteriors[sessions.user],
    sessions.image_mask,
  )
  np.testing.assert_allclose(rewards, at_once, rtol=1e-6, atol=1e-6)
  utils, _ = _reference_utilities(fitted, table, sessions)
  chosen = np.take_along_axis(utils, sessions.choice[..., None, None], axis=2)[:, :, 0]
  expected = np.einsum("shk,sk->sh", chosen, posteriors[sessions.user])
  np.testing.assert_allclose(rewards, expected, rtol=1e-5, atol=1e-5)
  assert rewards.shape == (SESSIONS, TURNS) and rewards.dtype == np.float32


def test_session_beliefs_in_chunks_match_all_at_once_and_numpy(fitted):
  table, sessions = _sessions(SESSIONS, seed=2)
  compiled = data.session_beliefs_kernel._cache_size()
  beliefs = data.session_beliefs(fitted, table, sessions, sessions_per_call=CHUNK)
  assert data.session_beliefs_kernel._cache_size() - compiled <= 1
  at_once = data.session_beliefs_kernel(
    fitted,
    np.asarray(table.image)[sessions.image_rows],
    sessions.slate_text,
    sessions.option_mask,
    sessions.image_mask,
    sessions.choice,
  )
  np.testing.assert_allclose(beliefs, at_once, rtol=1e-6, atol=1e-6)
  utils, tau = _reference_utilities(fitted, table, sessions)
  expected = reference.session_beliefs(
    fitted.log_priors, utils, tau, sessions.option_mask, sessions.choice
  )
  np.testing.assert_allclose(beliefs, expected, rtol=0, atol=1e-5)


def test_session_slate_images_in_chunks_match_numpy():
  table, sessions = _sessions(SESSIONS, seed=3)
  pooled = data.session_slate_images(table, sessions, sessions_per_call=CHUNK)
  image = np.asarray(table.image)[sessions.image_rows]
  expected = reference.aggregate(image, "mean", -2, sessions.image_mask[..., None])
  np.testing.assert_allclose(pooled, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(pooled[~sessions.option_mask], 0.0)


def test_every_chunk_of_any_session_count_runs_one_compiled_kernel(fitted):
  first = _sessions(SESSIONS, seed=4)
  data.session_beliefs(fitted, *first, sessions_per_call=CHUNK)
  compiled = data.session_beliefs_kernel._cache_size()
  for count in (1, CHUNK, 2 * CHUNK + 2, 4 * CHUNK):
    table, sessions = _sessions(count, seed=count)
    one_call = data.session_beliefs(fitted, table, sessions, sessions_per_call=4 * CHUNK)
    np.testing.assert_allclose(
      data.session_beliefs(fitted, table, sessions, sessions_per_call=CHUNK),
      one_call,
      rtol=1e-6,
      atol=1e-6,
    )
  assert data.session_beliefs_kernel._cache_size() == compiled + 1  # The 4 * CHUNK calls.


def test_map_sessions_stacks_calls_in_order_and_refuses_empty_input():
  calls = []

  def kernel(rows):
    calls.append(len(rows))
    return jnp.asarray(rows)[:, None] * 10

  out = data.map_sessions(kernel, lambda rows: (rows,), 8, 3)
  np.testing.assert_array_equal(out[:, 0], np.arange(8) * 10)
  assert calls == [3, 3, 3]
  with pytest.raises(ValueError, match="sessions_per_call=0"):
    data.map_sessions(kernel, lambda rows: (rows,), 8, 0)
  with pytest.raises(ValueError, match="no sessions"):
    data.map_sessions(kernel, lambda rows: (rows,), 0, 3)


def test_user_beliefs_in_batches_match_numpy_with_padded_turns(fitted):
  table, sessions = _sessions(5, seed=5)
  turn_mask = np.ones((5, TURNS), bool)
  turn_mask[1, 1:] = False
  text_rows = np.random.default_rng(5).integers(0, ROWS, sessions.option_mask.shape)
  choices = types.Choices(
    image_rows=sessions.image_rows,
    text_rows=text_rows.astype(np.int32),
    category=sessions.category,
    choice=sessions.choice,
    option_mask=sessions.option_mask,
    turn_mask=turn_mask,
    user_index=np.arange(5, dtype=np.int32),
    image_mask=sessions.image_mask,
  )
  beliefs = np.asarray(posterior.user_beliefs(fitted, table, choices, batch_users=2))
  utils, tau = reference.utilities(
    fitted.params,
    np.asarray(table.image)[choices.image_rows],
    np.asarray(table.text)[choices.text_rows],
    image_mask=choices.image_mask,
  )
  expected = reference.session_beliefs(
    fitted.log_priors, utils, float(tau), choices.option_mask, choices.choice
  )
  expected[1, 2:] = expected[1, 1]  # The padded turn leaves the belief unchanged.
  np.testing.assert_allclose(beliefs, expected, rtol=0, atol=1e-5)


def test_ppo_pools_images_as_the_offline_agents_do():
  rng = np.random.default_rng(6)
  obs = simulator.Observation(
    history=jnp.zeros((TURNS + 1, DIM)),
    history_mask=jnp.ones(TURNS + 1, bool),
    turn=jnp.int32(0),
    candidate_text=jnp.zeros((4, DIM)),
    candidate_images=jnp.asarray(rng.normal(size=(4, IMAGES, DIM)), jnp.float32),
    category=jnp.zeros(4, jnp.int32),
    log_belief=jnp.zeros(TYPES),
  )
  images = ppo.features(obs, None, frozenset({"text", "images"})).images
  np.testing.assert_allclose(images, obs.candidate_images.mean(axis=-2), rtol=1e-6, atol=1e-6)
