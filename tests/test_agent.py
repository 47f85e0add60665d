"""The offline agent: transitions and data mixes, the value networks and IQL's losses and update against
NumPy, the fused updates (1 vs 8 devices, traces), and planted toy problems for IQL, myopic IQL and
behaviour cloning. Resume and the NaN guard: tests/test_train_loop.py."""

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import struct

from pasta_jax import parallel, simulator, types
from pasta_jax.agent import bc, data, iql, value
from tests import reference

SESSIONS, TURNS, SLATE, CATEGORIES, DIM = 512, 3, 2, 4, 8
HIDDEN = (16, 16)
SETTINGS = iql.IQLSettings(
  expectile=0.7,
  discount=0.9,
  learning_rate=3e-3,
  polyak=0.05,
  batch_size=32,
  steps=300,
  steps_per_dispatch=100,
  checkpoint_every_steps=100,
)
ONE_UPDATE = dataclasses.replace(SETTINGS, steps=3, steps_per_dispatch=1, checkpoint_every_steps=1)
POLICY = iql.IQLPolicy(hidden=HIDDEN, num_categories=CATEGORIES, slate_size=SLATE)
CATEGORY_TEXT = np.random.default_rng(0).normal(size=(CATEGORIES, DIM)).astype(np.float32)
CHOICE_WEIGHTS = np.random.default_rng(1).normal(size=DIM).astype(np.float32)


def _mesh(devices):
  return parallel.make_mesh(ml_collections.ConfigDict({"data": devices}))


def _sessions(
  seed: int, reward_fn, text_by_category: bool = True
) -> tuple[data.Sessions, np.ndarray]:
  """SESSIONS sessions of TURNS turns: slates of SLATE distinct categories, text = the category's vector plus
  noise (or pure noise), a uniformly random choice (or the planted rule on pure-noise text); rewards
  reward_fn(chosen category i32[S, H]) -> f32[S, H]."""
  rng = np.random.default_rng(seed)
  category = rng.permuted(np.tile(np.arange(CATEGORIES), (SESSIONS * TURNS, 1)), axis=1)[:, :SLATE]
  category = category.reshape(SESSIONS, TURNS, SLATE).astype(np.int32)
  noise = rng.normal(size=(SESSIONS, TURNS, SLATE, DIM)).astype(np.float32)
  if text_by_category:
    text = CATEGORY_TEXT[category] + 0.1 * noise
    choice = rng.integers(0, SLATE, size=(SESSIONS, TURNS)).astype(np.int32)
  else:
    text = noise
    choice = np.argmax(text @ CHOICE_WEIGHTS, axis=-1).astype(np.int32)
  chosen = np.take_along_axis(text, choice[..., None, None], axis=2)[:, :, 0]
  start = rng.normal(size=(SESSIONS, 1, DIM)).astype(np.float32)
  sessions = data.Sessions(
    user=np.arange(SESSIONS, dtype=np.int32),
    history=np.concatenate([start, chosen], axis=1),
    slate_text=text,
    image_rows=np.zeros((SESSIONS, TURNS, SLATE, 1), np.int32),
    category=category,
    choice=choice,
  )
  return sessions, reward_fn(np.take_along_axis(category, choice[..., None], axis=2)[..., 0])


def _planted_reward(chosen):
  return (chosen == 2).astype(np.float32)


def _delayed_reward(chosen):
  """0.5 now for category 0; 2 at the next turn for category 1 (nothing after the last turn)."""
  later = np.concatenate([np.zeros_like(chosen[:, :1]), chosen[:, :-1] == 1], axis=1)
  return (0.5 * (chosen == 0) + 2.0 * later).astype(np.float32)


@pytest.fixture(scope="module")
def planted():
  """Transitions where reward = 1 when the chosen prompt's category is 2."""
  return data.transitions_from_sessions(*_sessions(0, _planted_reward))


@pytest.fixture(scope="module")
def trained(planted):
  """{devices: (state, history, compiles)} of IQL with SETTINGS on `planted`, on 1 and 8 devices; compiles:
  how many programs `iql.run_dispatch` compiled for the run."""
  runs = {}
  for devices in (1, 8):
    before = iql.run_dispatch._cache_size()
    state, history = iql.train(
      iql.IQL(POLICY, SETTINGS),
      planted,
      None,
      "real",
      0.5,
      jax.random.key(0),
      _mesh(devices),
      show_progress=False,
    )
    runs[devices] = (state, history, iql.run_dispatch._cache_size() - before)
  return runs


def _initial_state(transitions: data.Transitions) -> iql.IQLState:
  """The state `iql.train` starts from with SETTINGS, POLICY and key 0."""
  return iql.IQL(POLICY, SETTINGS).init(
    jax.random.key(0), jax.tree.map(lambda x: x[:1], transitions)
  )


def _observation(
  start: chex.Array, turn: chex.Array, previous: chex.Array, candidate_text: chex.Array
) -> simulator.Observation:
  """Before turn `turn` of a session from `start` f32[D] whose earlier choices had categories previous i32[H]
  (text CATEGORY_TEXT[c]); candidate i of candidate_text f32[C, D] has category i."""
  rows = jnp.arange(TURNS + 1)
  chosen = jnp.asarray(CATEGORY_TEXT)[previous]
  history = jnp.where(rows[:, None] == 0, start, jnp.concatenate([jnp.zeros((1, DIM)), chosen]))
  return simulator.Observation(
    history=history,
    history_mask=rows <= turn,
    turn=turn,
    candidate_text=candidate_text,
    candidate_images=jnp.zeros((CATEGORIES, 1, DIM)),
    category=jnp.arange(CATEGORIES, dtype=jnp.int32),
    log_belief=jnp.zeros((1,)),
  )


@functools.partial(jax.jit, static_argnames="policy")
def _first_shown(
  policy,
  params,
  starts: chex.Array,
  turn: chex.Array,
  previous: chex.Array,
  candidate_text: chex.Array,
) -> chex.Array:
  """i32[n]: the candidate `policy` shows first for each start f32[n, D] and candidate_text f32[n, C, D]."""
  observe = functools.partial(_observation, turn=turn, previous=previous)
  return jax.vmap(lambda s, c: policy(jax.random.key(0), observe(s, candidate_text=c), params)[0])(
    starts, candidate_text
  )


def _first_categories(
  policy, params, turn: int, previous: list[int], count: int = 50
) -> np.ndarray:
  """How often `policy` shows each category first over `count` random start prompts: i64[C]."""
  starts = np.random.default_rng(7).normal(size=(count, DIM)).astype(np.float32)
  previous = np.pad(np.asarray(previous, np.int32), (0, TURNS - len(previous)))
  shown = _first_shown(
    policy,
    params,
    starts,
    np.int32(turn),
    previous,
    np.broadcast_to(CATEGORY_TEXT, (count, CATEGORIES, DIM)),
  )
  return np.bincount(np.asarray(shown), minlength=CATEGORIES)


# NumPy reference of the networks (value.py), read from their Flax params.


def _np_features(history, mask, turn):
  valid = mask[..., None]
  mean = np.sum(np.where(valid, history, 0.0), axis=-2) / np.maximum(np.sum(valid, axis=-2), 1)
  latest = np.take_along_axis(history, turn[..., None, None], axis=-2)[..., 0, :]
  return np.concatenate([mean, latest, np.eye(history.shape[-2])[turn]], axis=-1)


def _np_mlp(params, x):
  """value.MLP on the concatenated input x: one Dense whose kernel stacks the per-part kernels, then ReLU layers."""
  f64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  num_parts = sum(name.startswith("input_") for name in params)
  x = (
    x @ np.concatenate([f64[f"input_{i}"]["kernel"] for i in range(num_parts)])
    + f64["input_0"]["bias"]
  )
  for j in range(len(params) - num_parts):
    x = np.maximum(x, 0.0) @ f64[f"layer_{j}"]["kernel"] + f64[f"layer_{j}"]["bias"]
  return x[..., 0]


def _np_chosen_features(history_images, turn):
  """Per state: [the mean of the rows of the turns played (rows < turn), the latest of them], zeros
  at turn 0: history_images [B, H, D], turn [B] -> [B, 2D]."""
  out = np.zeros(history_images.shape[:1] + (2 * history_images.shape[-1],))
  for i, t in enumerate(turn):
    if t:
      played = history_images[i, :t]
      out[i] = np.concatenate([played.mean(axis=0), played[-1]])
  return out


def _np_state(history, mask, turn, belief=None, history_images=None):
  """[features(h), belief, chosen-image features] (belief and the chosen images only if given)."""
  parts = [_np_features(history, mask, turn)] + ([] if belief is None else [belief])
  if history_images is not None:
    parts.append(_np_chosen_features(history_images, turn))
  return np.concatenate(parts, axis=-1)


def _np_prompt_value(
  params, history, mask, turn, text, category, belief=None, history_images=None, images=None
):
  """f32[..., L] of a PromptValue's params["params"]: the MLP of [features(h), belief, chosen-image
  features, text, one-hot category, images] (belief and the images only if given)."""
  state = _np_state(history, mask, turn, belief, history_images)[..., None, :]
  state = np.broadcast_to(state, text.shape[:-1] + state.shape[-1:])
  parts = [state, text, np.eye(CATEGORIES)[category]] + ([] if images is None else [images])
  return _np_mlp(params["MLP_0"], np.concatenate(parts, axis=-1))


def _np_twin(variables, *inputs):
  """f32[2, ..., L] of a TwinPromptValue's variables."""
  twins = variables["params"]["twins"]
  return np.stack(
    [
      _np_prompt_value(jax.tree.map(lambda x, i=i: np.asarray(x)[i], twins), *inputs)
      for i in range(2)
    ]
  )


def _np_state_value(variables, history, mask, turn, belief=None, history_images=None):
  return _np_mlp(
    variables["params"]["MLP_0"], _np_state(history, mask, turn, belief, history_images)
  )


def _np_batch(batch):
  return jax.tree.map(np.asarray, batch)


# Transitions and data mixes.


def _small_sessions():
  history = np.array(
    [[[0.0], [1.0], [2.0]], [[10.0], [11.0], [12.0]]], np.float32
  )  # [S=2, H+1=3, D=1]
  slate_text = (
    100 * np.arange(2)[:, None, None]
    + 10 * np.arange(2)[None, :, None]
    + np.arange(2)[None, None, :]
  ).astype(np.float32)[..., None]  # [S, H, L, D=1]
  sessions = data.Sessions(
    user=np.zeros(2, np.int32),
    history=history,
    slate_text=slate_text,
    image_rows=np.zeros((2, 2, 2, 1), np.int32),
    category=np.array([[[0, 1], [2, 3]], [[3, 2], [1, 0]]]),
    choice=np.array([[1, 0], [0, 1]], np.int32),
  )
  return sessions, np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)


def _assert_small_transitions(t: data.Transitions, sessions: data.Sessions):
  np.testing.assert_array_equal(t.history, sessions.history[[0, 0, 1, 1]])
  np.testing.assert_array_equal(t.history_mask, [[1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 0]])
  np.testing.assert_array_equal(t.next_history_mask, [[1, 1, 0], [1, 1, 1], [1, 1, 0], [1, 1, 1]])
  np.testing.assert_array_equal(t.turn, [0, 1, 0, 1])
  np.testing.assert_array_equal(t.next_turn, [1, 2, 1, 2])
  np.testing.assert_array_equal(t.not_done, [1.0, 0.0, 1.0, 0.0])
  np.testing.assert_array_equal(t.reward, [1.0, 2.0, 3.0, 4.0])
  np.testing.assert_array_equal(t.choice, [1, 0, 0, 1])
  np.testing.assert_array_equal(t.slate_text[:, :, 0], [[0, 1], [10, 11], [100, 101], [110, 111]])
  np.testing.assert_array_equal(t.slate_category, [[0, 1], [2, 3], [3, 2], [1, 0]])
  assert (
    t.history_mask.dtype == bool and t.turn.dtype == np.int32 and t.not_done.dtype == np.float32
  )
  assert t.size == 4


def test_transitions_from_sessions():
  sessions, rewards = _small_sessions()
  _assert_small_transitions(data.transitions_from_sessions(sessions, rewards), sessions)
  with pytest.raises(ValueError, match=r"\[S, H\] = \(2, 2\)"):
    data.transitions_from_sessions(sessions, rewards[:, :1])


def test_transitions_from_trajectories():
  s, rewards = _small_sessions()
  trajectories = simulator.Trajectories(
    user_id=np.arange(2),
    user_type=np.zeros(2, np.int32),
    start=None,
    history=s.history,
    slate=None,
    shown=None,
    category=s.category,
    slate_text=s.slate_text,
    images=None,
    seeds=None,
    choice=s.choice,
    utility=rewards,
    utilities=None,
    reward=rewards,
    log_belief=None,
  )
  _assert_small_transitions(data.transitions_from_trajectories(trajectories), s)


def test_the_chosen_options_images_of_ragged_sessions_match_numpy():
  sessions, rewards = _small_sessions()
  rng = np.random.default_rng(14)
  image = rng.normal(size=(20, DIM)).astype(np.float32)
  image_mask = rng.random((2, 2, 2, 3)) < 0.5
  image_mask[..., 0] = True
  option_mask = np.ones((2, 2, 2), bool)
  option_mask[0, 1, 1] = image_mask[0, 1, 1] = False  # Session 0 chose option 0 at turn 1.
  sessions = dataclasses.replace(
    sessions,
    image_rows=rng.integers(0, len(image), (2, 2, 2, 3)).astype(np.int32),
    option_mask=option_mask,
    image_mask=image_mask,
  )
  chosen_mask = np.take_along_axis(image_mask, sessions.choice[..., None, None], axis=2)
  assert not chosen_mask.all()  # Some chosen option has fewer than M images.
  expected = np.zeros((2, 2, DIM))
  for s, t in np.ndindex(2, 2):
    j = sessions.choice[s, t]
    expected[s, t] = image[sessions.image_rows[s, t, j][image_mask[s, t, j]]].mean(axis=0)
  table = types.FeatureTable(image=image, text=np.zeros((1, DIM), np.float32))
  slate_images = data.session_slate_images(table, sessions, sessions_per_call=1)
  inputs = value.parse_inputs("text+chosen_images", value.OFFLINE_INPUTS)
  no_images, chosen = data.image_inputs(slate_images, sessions.choice, inputs)
  assert no_images is None
  np.testing.assert_allclose(chosen, expected, rtol=1e-6, atol=1e-6)
  transitions = data.transitions_from_sessions(sessions, rewards, history_images=chosen)
  np.testing.assert_allclose(transitions.history_images, expected[[0, 0, 1, 1]], rtol=1e-6)
  assert data.select_inputs(transitions, value.TEXT).history_images is None
  assert data.image_inputs(None, sessions.choice, value.TEXT) == (None, None)


def test_a_real_sim_batch_has_the_configured_count_from_each_source(planted):
  real = planted.replace(reward=np.zeros_like(planted.reward))
  sim = jax.tree.map(lambda x: x[:50], planted.replace(reward=np.ones_like(planted.reward)))
  datasets, counts = data.mix_sources("real+sim", 0.25, 32, real, sim)
  assert counts == (24, 8) and datasets[0] is real and datasets[1] is sim
  batch = jax.jit(data.sample_batch, static_argnums=2)(jax.random.key(3), datasets, counts)
  np.testing.assert_array_equal(np.asarray(batch.reward), [0.0] * 24 + [1.0] * 8)
  assert data.mix_sources("real", 0.25, 32, real, None) == ((real,), (32,))
  assert data.mix_sources("sim", 0.25, 32, None, sim) == ((sim,), (32,))
  with pytest.raises(ValueError, match="needs sim transitions"):
    data.mix_sources("real+sim", 0.25, 32, real, None)
  with pytest.raises(ValueError, match="sim_fraction=0.01"):
    data.mix_counts("real+sim", 0.01, 32)
  with pytest.raises(ValueError, match="'history'"):
    data.mix_sources("real+sim", 0.25, 32, real, sim.replace(history=sim.history[:, :2]))


# Networks.


@functools.partial(jax.jit, static_argnums=0)
def _network_outputs(nets, critic, state_value, batch):
  """Twin f [2, B, L], its score, f of each prompt alone [2, B, L], V [B], and f and V with the rows outside
  the history mask set to NaN."""
  twin, v_net = nets
  state = (batch.history, batch.history_mask, batch.turn)
  prompts = (batch.slate_text, batch.slate_category)
  alone = jnp.concatenate(
    [
      twin.apply(critic, *state, batch.slate_text[:, j : j + 1], batch.slate_category[:, j : j + 1])
      for j in range(SLATE)
    ],
    axis=-1,
  )
  future = jnp.where(batch.history_mask[..., None], batch.history, jnp.nan)
  masked = (future, batch.history_mask, batch.turn)
  return {
    "f": twin.apply(critic, *state, *prompts),
    "score": twin.apply(critic, *state, *prompts, method="score"),
    "alone": alone,
    "q": iql.slate_q(twin.apply, critic, batch, POLICY),
    "v": v_net.apply(state_value, *state),
    "f_masked": twin.apply(critic, *masked, *prompts),
    "v_masked": v_net.apply(state_value, *masked),
  }


def test_networks_match_numpy_and_read_only_the_valid_history(planted):
  batch = jax.tree.map(lambda x: x[:6], planted)
  initial = _initial_state(planted)
  out = jax.tree.map(
    np.asarray,
    _network_outputs(
      (value.TwinPromptValue(HIDDEN, CATEGORIES), value.StateValue(HIDDEN)),
      initial.critic,
      initial.value_state.params,
      batch,
    ),
  )
  b = _np_batch(batch)
  assert out["f"].shape == (2, 6, SLATE) and not np.allclose(out["f"][0], out["f"][1])
  np.testing.assert_allclose(
    out["f"],
    _np_twin(initial.critic, b.history, b.history_mask, b.turn, b.slate_text, b.slate_category),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(
    out["v"],
    _np_state_value(initial.value_state.params, b.history, b.history_mask, b.turn),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_array_equal(out["score"], out["f"].min(axis=0))
  np.testing.assert_allclose(out["alone"], out["f"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["q"], out["f"].mean(axis=-1), rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(out["f_masked"], out["f"])
  np.testing.assert_array_equal(out["v_masked"], out["v"])


# IQL losses and update order.


def test_losses_match_hand_computed_values():
  np.testing.assert_allclose(
    iql.expectile_loss(jnp.array([1.0, -2.0, 0.5]), 0.7), [0.7, 1.2, 0.175], rtol=1e-6
  )
  np.testing.assert_allclose(
    iql.value_loss(jnp.array([0.0, 1.0]), jnp.array([1.0, -1.0]), 0.7), 0.95, rtol=1e-6
  )
  q = jnp.array([[1.0, 2.0], [0.0, 1.0]])  # [twins, B]
  np.testing.assert_allclose(
    iql.critic_loss(q, jnp.array([1.0, 0.0])), (0 + 1 + 4 + 1) / 2, rtol=1e-6
  )
  np.testing.assert_allclose(
    iql.td_target(jnp.array([1.0, 2.0]), jnp.array([1.0, 0.0]), jnp.array([10.0, 10.0]), 0.9),
    [10.0, 2.0],
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    bc.choice_loss(jnp.array([[0.0, np.log(3.0)], [0.0, 0.0]]), jnp.array([1, 0])),
    -(np.log(0.75) + np.log(0.5)) / 2,
    rtol=1e-6,
  )


def test_settings_and_policies_from_config(config):
  settings = iql.IQLSettings.from_config(config.agent.iql)
  assert settings.discount == config.agent.iql.discount and settings.myopic().discount == 0.0
  assert bc.BCSettings.from_config(config.agent.bc).steps == config.agent.bc.steps
  expected = dict(
    hidden=tuple(config.agent.hidden),
    num_categories=len(config.interaction.categories),
    slate_size=config.interaction.slate_size,
  )
  assert iql.IQLPolicy.from_config(config) == iql.IQLPolicy(**expected)
  assert bc.BCPolicy.from_config(config) == bc.BCPolicy(**expected)


def _expectile(diff, tau):
  return np.mean(np.where(diff > 0, tau, 1 - tau) * diff**2)


@pytest.fixture(scope="module")
def traced_updates(planted):
  """([4 states], [3 metrics]): three dispatches of one update each (ONE_UPDATE) of `iql.dispatch`, jitted under
  chex.assert_max_traces(n=1), on 1 device, from the initial state with perturbed target critics (so that
  the online and target critics differ)."""
  learner, mesh = iql.IQL(POLICY, ONE_UPDATE), _mesh(1)
  replicated = parallel.replicated(mesh)
  initial = _initial_state(planted)
  rng = np.random.default_rng(9)
  state = initial.replace(
    target_critic=jax.tree.map(
      lambda x: x + 0.3 * rng.normal(size=x.shape).astype(np.float32), initial.critic
    )
  )
  states, metrics = [jax.device_get(state)], []
  state, datasets = jax.device_put((state, (planted,)), replicated)
  chex.clear_trace_counter()
  try:
    run = jax.jit(
      chex.assert_max_traces(iql.dispatch, n=1),
      static_argnames=("learner", "counts", "mesh"),
      donate_argnums=0,
    )
    for _ in range(3):
      state, step_metrics = run(
        state, datasets, learner=learner, counts=(ONE_UPDATE.batch_size,), mesh=mesh
      )
      states.append(jax.device_get(state))
      metrics.append(jax.device_get(step_metrics))
  finally:
    chex.clear_trace_counter()
  return states, metrics


def test_update_order_v_then_q_then_target(planted, traced_updates):
  (old, new, *_), (metrics, *_) = traced_updates
  s = ONE_UPDATE
  key = jax.random.fold_in(jax.random.wrap_key_data(old.key), 0)
  b = _np_batch(jax.jit(data.sample_batch, static_argnums=2)(key, (planted,), (s.batch_size,)))
  obs = (b.history, b.history_mask, b.turn, b.slate_text, b.slate_category)

  target_q = _np_twin(old.target_critic, *obs).mean(-1).min(0)
  online_q = _np_twin(old.critic, *obs).mean(-1).min(0)
  v = _np_state_value(old.value_state.params, *obs[:3])
  np.testing.assert_allclose(
    metrics["value_loss"][0], _expectile(target_q - v, s.expectile), rtol=1e-5
  )
  assert not np.isclose(metrics["value_loss"][0], _expectile(online_q - v, s.expectile), rtol=1e-3)

  q = _np_twin(old.critic, *obs).mean(-1)  # [2, B]
  next_v = {
    name: _np_state_value(params, b.history, b.next_history_mask, b.next_turn)
    for name, params in (("updated", new.value_state.params), ("old", old.value_state.params))
  }
  loss = {
    name: np.mean(np.sum((q - (b.reward + s.discount * b.not_done * nv)) ** 2, axis=0))
    for name, nv in next_v.items()
  }
  np.testing.assert_allclose(metrics["critic_loss"][0], loss["updated"], rtol=1e-5)
  assert not np.isclose(metrics["critic_loss"][0], loss["old"], rtol=1e-3)

  for (path, t_new), c_new, t_old in zip(
    jax.tree_util.tree_leaves_with_path(new.target_critic),
    jax.tree.leaves(new.critic),
    jax.tree.leaves(old.target_critic),
  ):
    np.testing.assert_allclose(
      t_new,
      s.polyak * c_new + (1 - s.polyak) * t_old,
      rtol=1e-6,
      atol=1e-7,
      err_msg=jax.tree_util.keystr(path),
    )
  assert int(new.step) == 1
  assert int(new.value_state.step) == 1
  assert not np.allclose(
    jax.tree.leaves(new.value_state.params)[0], jax.tree.leaves(old.value_state.params)[0]
  )


# Ragged slates.

RAGGED = 3  # Options per padded slate; each transition shows 2..RAGGED of them.
BC_SETTINGS = bc.BCSettings(
  learning_rate=3e-3, batch_size=8, steps=1, steps_per_dispatch=1, checkpoint_every_steps=1
)


def _ragged_batch(n: int = 8) -> data.Transitions:
  """n transitions whose slates show 2..RAGGED options (padding: zero text, category 0, masked)."""
  rng = np.random.default_rng(11)
  turn = rng.integers(0, TURNS, n).astype(np.int32)
  shown = rng.integers(2, RAGGED + 1, n)
  shown[:2] = 2, RAGGED
  mask = np.arange(RAGGED)[None, :] < shown[:, None]
  rows = np.arange(TURNS + 1)
  return data.Transitions(
    history=rng.normal(size=(n, TURNS + 1, DIM)).astype(np.float32),
    history_mask=rows[None, :] <= turn[:, None],
    turn=turn,
    slate_text=np.where(mask[..., None], rng.normal(size=(n, RAGGED, DIM)), 0.0).astype(np.float32),
    slate_category=np.where(mask, rng.integers(0, CATEGORIES, (n, RAGGED)), 0).astype(np.int32),
    choice=rng.integers(0, shown).astype(np.int32),
    reward=rng.normal(size=n).astype(np.float32),
    next_history_mask=rows[None, :] <= turn[:, None] + 1,
    next_turn=turn + 1,
    not_done=(turn + 1 < TURNS).astype(np.float32),
    slate_mask=mask,
  )


@functools.partial(jax.jit, static_argnums=(0, 1))
def _one_update(iql_learner, bc_learner, iql_state, bc_state, batch):
  return iql_learner.update(iql_state, batch), bc_learner.update(bc_state, batch)


def test_ragged_slates_losses_match_numpy_and_ignore_the_padded_options():
  batch = _ragged_batch()
  iql_learner = iql.IQL(POLICY, SETTINGS)
  bc_learner = bc.BC(bc.BCPolicy(HIDDEN, CATEGORIES, SLATE), BC_SETTINGS)
  example = jax.tree.map(lambda x: x[:1], batch)
  old_iql = iql_learner.init(jax.random.key(0), example)
  old_bc = bc_learner.init(jax.random.key(1), example)
  (new_iql, iql_metrics), (new_bc, bc_metrics) = jax.device_get(
    _one_update(iql_learner, bc_learner, old_iql, old_bc, batch)
  )
  b, mask = _np_batch(batch), batch.slate_mask
  state = (b.history, b.history_mask, b.turn)
  prompts = (b.slate_text, b.slate_category)
  target_q = reference.slate_mean(_np_twin(old_iql.target_critic, *state, *prompts), mask).min(0)
  v = _np_state_value(old_iql.value_state.params, *state)
  np.testing.assert_allclose(
    iql_metrics["value_loss"], reference.iql_value_loss(v, target_q, SETTINGS.expectile), rtol=1e-5
  )
  q = reference.slate_mean(_np_twin(old_iql.critic, *state, *prompts), mask)
  next_v = _np_state_value(new_iql.value_state.params, b.history, b.next_history_mask, b.next_turn)
  np.testing.assert_allclose(
    iql_metrics["critic_loss"],
    reference.iql_critic_loss(q, b.reward, b.not_done, next_v, SETTINGS.discount),
    rtol=1e-5,
  )
  logits = _np_prompt_value(old_bc.params["params"], *state, *prompts)
  np.testing.assert_allclose(
    bc_metrics["loss"], reference.choice_loss(logits, b.choice, mask), rtol=1e-5
  )
  rng = np.random.default_rng(12)
  noisy = batch.replace(
    slate_text=np.where(mask[..., None], batch.slate_text, rng.normal(size=batch.slate_text.shape)),
    slate_category=np.where(mask, batch.slate_category, CATEGORIES - 1).astype(np.int32),
  )
  changed = jax.device_get(_one_update(iql_learner, bc_learner, old_iql, old_bc, noisy))
  _assert_trees_close(changed, ((new_iql, iql_metrics), (new_bc, bc_metrics)), atol=0)
  unmasked = jax.device_get(
    _one_update(iql_learner, bc_learner, old_iql, old_bc, noisy.replace(slate_mask=None))
  )
  for name in ("value_loss", "critic_loss", "q"):
    assert not np.isclose(unmasked[0][1][name], iql_metrics[name]), name
  assert not np.isclose(unmasked[1][1]["loss"], bc_metrics["loss"])


def _with_inputs(batch: data.Transitions, num_types: int = 3) -> data.Transitions:
  """`batch` with random beliefs before and after each turn, pooled slate images (zero on padding)
  and pooled images of the options chosen each turn."""
  rng = np.random.default_rng(13)
  n, slate = batch.slate_category.shape

  def log_belief():
    logits = rng.normal(size=(n, num_types))
    return (logits - np.log(np.sum(np.exp(logits), axis=-1, keepdims=True))).astype(np.float32)

  images = rng.normal(size=(n, slate, DIM)) * batch.slate_mask[..., None]
  return batch.replace(
    log_belief=log_belief(),
    next_log_belief=log_belief(),
    slate_images=images.astype(np.float32),
    history_images=rng.normal(size=(n, TURNS, DIM)).astype(np.float32),
  )


def _if_read(inputs, name, x):
  return x if name in inputs else None


@pytest.mark.parametrize("spec", ["text+images+belief+chosen_images", "text+chosen_images"])
def test_iql_and_bc_read_the_belief_and_images_as_numpy_does(spec):
  batch = _with_inputs(_ragged_batch())
  rich = value.parse_inputs(spec, value.OFFLINE_INPUTS)
  policy = dataclasses.replace(POLICY, inputs=rich)
  iql_learner = iql.IQL(policy, SETTINGS)
  bc_learner = bc.BC(bc.BCPolicy(HIDDEN, CATEGORIES, SLATE, rich), BC_SETTINGS)
  example = jax.tree.map(lambda x: x[:1], batch)
  old_iql = iql_learner.init(jax.random.key(0), example)
  old_bc = bc_learner.init(jax.random.key(1), example)
  updated = jax.device_get(_one_update(iql_learner, bc_learner, old_iql, old_bc, batch))
  (new_iql, iql_metrics), (_, bc_metrics) = updated
  b, mask = _np_batch(batch), batch.slate_mask
  belief, next_belief = (
    _if_read(rich, "belief", np.exp(x)) for x in (b.log_belief, b.next_log_belief)
  )
  chosen = _if_read(rich, "chosen_images", b.history_images)
  state = (b.history, b.history_mask, b.turn)
  prompts = (
    b.slate_text,
    b.slate_category,
    belief,
    chosen,
    _if_read(rich, "images", b.slate_images),
  )
  target_q = reference.slate_mean(_np_twin(old_iql.target_critic, *state, *prompts), mask).min(0)
  v = _np_state_value(old_iql.value_state.params, *state, belief, chosen)
  np.testing.assert_allclose(
    iql_metrics["value_loss"], reference.iql_value_loss(v, target_q, SETTINGS.expectile), rtol=1e-5
  )
  q = reference.slate_mean(_np_twin(old_iql.critic, *state, *prompts), mask)
  next_v = _np_state_value(
    new_iql.value_state.params, b.history, b.next_history_mask, b.next_turn, next_belief, chosen
  )
  np.testing.assert_allclose(
    iql_metrics["critic_loss"],
    reference.iql_critic_loss(q, b.reward, b.not_done, next_v, SETTINGS.discount),
    rtol=1e-5,
  )
  logits = _np_prompt_value(old_bc.params["params"], *state, *prompts)
  np.testing.assert_allclose(
    bc_metrics["loss"], reference.choice_loss(logits, b.choice, mask), rtol=1e-5
  )
  text_only = jax.device_get(
    _one_update(
      iql.IQL(POLICY, SETTINGS),
      bc.BC(bc.BCPolicy(HIDDEN, CATEGORIES, SLATE), BC_SETTINGS),
      iql.IQL(POLICY, SETTINGS).init(jax.random.key(0), example),
      bc.BC(bc.BCPolicy(HIDDEN, CATEGORIES, SLATE), BC_SETTINGS).init(jax.random.key(1), example),
      batch,
    )
  )
  assert not np.isclose(text_only[0][1]["critic_loss"], iql_metrics["critic_loss"])
  unplayed = np.arange(TURNS)[None, :] > batch.turn[:, None]  # Read by neither state.
  future = batch.replace(history_images=np.where(unplayed[..., None], np.nan, batch.history_images))
  _assert_trees_close(
    jax.device_get(_one_update(iql_learner, bc_learner, old_iql, old_bc, future)), updated, atol=0
  )
  for name, field in (("belief", "log_belief"), ("chosen_images", "history_images")):
    if name in rich:
      with pytest.raises(ValueError, match=f"reads '{name}'.*'{field}'"):
        iql_learner.init(jax.random.key(0), example.replace(**{field: None}))


# The fused loop.


def _assert_trees_close(actual, expected, atol=1e-5):
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path)
    )


def test_training_on_1_and_8_devices_agrees(trained):
  (one, one_history, one_compiles), (eight, eight_history, eight_compiles) = trained[1], trained[8]
  assert one_compiles == eight_compiles == 1  # One program per mesh for all three dispatches.
  for leaf in jax.tree.leaves(eight):
    assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated
  assert int(one.step) == int(eight.step) == SETTINGS.steps
  _assert_trees_close(eight, one)
  for name in ("value_loss", "critic_loss", "v", "q"):
    np.testing.assert_allclose(
      eight_history[name], one_history[name], rtol=0, atol=1e-5, err_msg=name
    )
  np.testing.assert_array_equal(one_history["step"], np.arange(SETTINGS.steps))


def test_fused_loop_traces_once_across_dispatches(traced_updates):
  states, metrics = (
    traced_updates  # Built under chex.assert_max_traces(n=1): a second trace would have raised.
  )
  assert [int(state.step) for state in states] == [0, 1, 2, 3]
  assert all(m["critic_loss"].shape == (ONE_UPDATE.steps_per_dispatch,) for m in metrics)


# Planted problems.


def test_iql_learns_the_planted_reward(trained):
  state = trained[1][0]
  for turn, previous in ((0, []), (1, [0]), (2, [3, 1])):
    assert _first_categories(POLICY, state.critic, turn, previous)[2] >= 45, turn


def test_discounted_iql_invests_and_myopic_iql_does_not():
  delayed = data.transitions_from_sessions(*_sessions(1, _delayed_reward))
  first = {}
  for name, settings in (("discounted", SETTINGS), ("myopic", SETTINGS.myopic())):
    state, _ = iql.train(
      iql.IQL(POLICY, settings),
      delayed,
      None,
      "real",
      0.5,
      jax.random.key(0),
      _mesh(1),
      show_progress=False,
    )
    first[name] = _first_categories(POLICY, state.critic, 0, [])
  assert first["discounted"][1] >= 45 and first["myopic"][0] >= 45, first


def test_behaviour_cloning_recovers_the_planted_choice_rule():
  logged = data.transitions_from_sessions(*_sessions(2, _planted_reward, text_by_category=False))
  settings = bc.BCSettings(
    learning_rate=3e-3, batch_size=32, steps=300, steps_per_dispatch=100, checkpoint_every_steps=100
  )
  policy = bc.BCPolicy(hidden=HIDDEN, num_categories=CATEGORIES, slate_size=SLATE)
  state, history = iql.train(
    bc.BC(policy, settings),
    logged,
    None,
    "real",
    0.5,
    jax.random.key(0),
    _mesh(1),
    show_progress=False,
  )
  assert np.mean(history["accuracy"][-50:]) > 0.9
  fresh = np.random.default_rng(5).normal(size=(100, CATEGORIES, DIM)).astype(np.float32)
  starts = np.random.default_rng(6).normal(size=(100, DIM)).astype(np.float32)
  picked = np.asarray(
    _first_shown(policy, state.params, starts, np.int32(0), np.zeros(TURNS, np.int32), fresh)
  )
  assert np.mean(picked == np.argmax(fresh @ CHOICE_WEIGHTS, axis=-1)) > 0.9


@struct.dataclass
class _ToyGenerator:
  """A prompt is a category index with text CATEGORY_TEXT[c]; every turn offers each category once, shuffled;
  every image of a prompt is its text."""

  def start(self, key):
    return jax.random.randint(key, (), 0, CATEGORIES)

  def generate(self, key, prompt):
    del prompt
    order = jax.random.permutation(key, CATEGORIES)
    return order, order

  def text_features(self, prompts):
    return jnp.asarray(CATEGORY_TEXT)[prompts]

  def render(self, prompts, seeds):
    return jnp.broadcast_to(self.text_features(prompts)[..., None, :], seeds.shape + (DIM,))


@struct.dataclass
class _ToyUsers:
  """One user type with utility 1 for category 2's text, else 0."""

  @property
  def log_priors(self):
    return jnp.zeros((1,))

  def utilities(self, images, text):
    del images
    return jnp.all(text == CATEGORY_TEXT[2], axis=-1).astype(jnp.float32)[..., None], jnp.float32(
      1.0
    )


def test_trained_iql_policy_runs_in_the_simulator(trained):
  params = simulator.EnvParams(
    generator=_ToyGenerator(),
    users=_ToyUsers(),
    belief=_ToyUsers(),
    turns=TURNS,
    slate_size=SLATE,
    images_per_prompt=1,
    num_categories=CATEGORIES,
  )
  trajectories = simulator.run(
    jax.random.key(1),
    np.arange(16),
    np.zeros(16, np.int32),
    params,
    POLICY,
    trained[8][0].critic,
    _mesh(8),
  )
  assert trajectories.slate.shape == (16, TURNS, SLATE)
  assert np.all(trajectories.category[..., 0] == 2)
  assert np.all(trajectories.category[..., 0] != trajectories.category[..., 1])
  transitions = data.transitions_from_trajectories(trajectories)
  assert transitions.size == 16 * TURNS
  np.testing.assert_array_equal(transitions.slate_category[:, 0], 2)
