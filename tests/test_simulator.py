"""The functional simulator: NumPy reference parity, choice frequencies, device-count invariance, records."""

import dataclasses
import functools

import jax
import ml_collections
import numpy as np
import pytest
from flax import struct
from scipy import stats

from pasta_jax import candidates, parallel, simulator, synthetic_env, types
from pasta_jax.agent import baselines, slate
from pasta_jax.data import schema, synthetic
from pasta_jax.evaluation import agents as agent_eval
from pasta_jax.user_model import utility
from tests import reference


@pytest.fixture(scope="module")
def fitted(config, rater_log):
  """A randomly initialised fitted-users model (the simulator only needs its functions)."""
  model = utility.from_config(config)
  table = rater_log.table
  example = types.OptionFeatures(image=np.stack([table.image[:4]] * 4), text=table.text[:4])
  params = model.init(jax.random.key(5), example)
  return utility.FittedUsers(
    model=model, params=params, log_priors=np.log(np.array([0.5, 0.3, 0.2], np.float32))
  )


def _run(
  config,
  rater_log,
  fitted,
  mesh,
  num_users=24,
  users="fitted",
  users_per_call=simulator.USERS_PER_CALL,
  keep_images=True,
):
  responders = fitted if users == "fitted" else None
  params = synthetic_env.env_params(rater_log.world, config, users=responders, belief=fitted)
  policy = baselines.RandomSlate(num_categories=5, slate_size=config.interaction.slate_size)
  ids = np.arange(num_users)
  return simulator.run(
    jax.random.key(11),
    ids,
    np.full(num_users, -1),
    params,
    policy,
    None,
    mesh,
    users_per_call,
    keep_images,
  ), params


def _assert_same_trajectories(actual, desired, atol=1e-6):
  """Discrete outcomes bit-identical; features, utilities and beliefs equal up to float32 rounding (XLA may
  vectorise a different per-device batch differently); fields not kept are None in both."""
  for name in ("user_id", "user_type", "start", "slate", "shown", "choice", "category", "seeds"):
    jax.tree.map(
      functools.partial(np.testing.assert_array_equal, err_msg=name),
      getattr(actual, name),
      getattr(desired, name),
    )
  for name in ("history", "slate_text", "images", "utility", "utilities", "reward", "log_belief"):
    if getattr(desired, name) is None:
      assert getattr(actual, name) is None, name
    else:
      np.testing.assert_allclose(
        getattr(actual, name), getattr(desired, name), atol=atol, err_msg=name
      )


def _numpy_softmax_log(logits):
  return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)


def test_rollout_matches_the_numpy_reference(config, rater_log, fitted):
  traj, _ = _run(config, rater_log, fitted, parallel.make_mesh())
  n, h = traj.choice.shape
  params = jax.device_get(fitted.params)
  tau = float(np.exp(params["params"]["log_inverse_temperature"]))
  log_belief = np.tile(_numpy_softmax_log(np.asarray(fitted.log_priors, np.float64)), (n, 1))
  for t in range(h):
    utilities, _ = reference.utilities(
      params, traj.images[:, t], traj.slate_text[:, t], activation=fitted.model.activation
    )  # [N, L, K]
    np.testing.assert_allclose(traj.log_belief[:, t], log_belief, atol=1e-5)
    own = utilities[np.arange(n), :, traj.user_type]  # [N, L]
    np.testing.assert_allclose(traj.utilities[:, t], own, atol=1e-5)
    np.testing.assert_allclose(traj.reward[:, t], own[np.arange(n), traj.choice[:, t]], atol=1e-5)
    log_p = _numpy_softmax_log(np.swapaxes(tau * utilities, 1, 2))  # [N, K, L]
    log_belief = _numpy_softmax_log(log_belief + log_p[np.arange(n), :, traj.choice[:, t]])
    np.testing.assert_allclose(
      traj.history[:, t + 1], traj.slate_text[np.arange(n), t, traj.choice[:, t]], atol=1e-6
    )
  np.testing.assert_allclose(traj.log_belief[:, h], log_belief, atol=1e-5)
  categories = traj.category
  assert all(len(set(row)) == row.size for row in categories.reshape(-1, categories.shape[-1]))


def test_choice_frequencies_match_the_choice_probabilities(config, rater_log, fitted):
  """Many users see their first slate; pooled by the probability bin of each column, the chosen share
  matches the model's probabilities (chi-square against the expected counts)."""
  traj, _ = _run(config, rater_log, fitted, parallel.make_mesh(), num_users=2000)
  params = jax.device_get(fitted.params)
  tau = float(np.exp(params["params"]["log_inverse_temperature"]))
  probs = np.exp(_numpy_softmax_log(tau * traj.utilities[:, 0].astype(np.float64)))  # [N, L]
  chosen = np.zeros_like(probs)
  chosen[np.arange(len(probs)), traj.choice[:, 0]] = 1.0
  bins = np.digitize(probs.ravel(), np.quantile(probs, [0.2, 0.4, 0.6, 0.8]))
  observed = np.bincount(bins, weights=chosen.ravel(), minlength=5)
  expected = np.bincount(bins, weights=probs.ravel(), minlength=5)
  assert stats.chisquare(observed, expected * observed.sum() / expected.sum()).pvalue > 1e-3
  assert observed[-1] > observed[0]


def test_trajectories_are_identical_on_one_and_eight_devices(config, rater_log, fitted):
  one, _ = _run(
    config,
    rater_log,
    fitted,
    parallel.make_mesh(ml_collections.ConfigDict({"data": 1})),
    num_users=20,
  )
  eight, _ = _run(
    config,
    rater_log,
    fitted,
    parallel.make_mesh(ml_collections.ConfigDict({"data": 8})),
    num_users=20,
  )
  _assert_same_trajectories(one, eight)


def test_calls_of_a_few_users_each_give_the_same_trajectories(config, rater_log, fitted):
  whole, _ = _run(config, rater_log, fitted, parallel.make_mesh(), num_users=20)
  chunked, _ = _run(config, rater_log, fitted, parallel.make_mesh(), num_users=20, users_per_call=3)
  _assert_same_trajectories(chunked, whole)
  lean, _ = _run(
    config,
    rater_log,
    fitted,
    parallel.make_mesh(),
    num_users=20,
    users_per_call=3,
    keep_images=False,
  )
  assert lean.images is None
  _assert_same_trajectories(lean.replace(images=chunked.images), chunked)


def test_runs_compiled_together_are_not_compiled_again(config, rater_log, fitted):
  mesh, key = parallel.make_mesh(), jax.random.key(3)
  params = synthetic_env.env_params(rater_log.world, config, users=fitted, belief=fitted)
  sizes = dict(num_categories=5, slate_size=config.interaction.slate_size)
  other_priors = fitted.replace(log_priors=fitted.log_priors[::-1])  # Same program, other values.
  runs = [
    (baselines.RandomSlate(**sizes), None),
    (baselines.Greedy(**sizes), fitted),
    (baselines.Greedy(**sizes), other_priors),
  ]
  num_users = 13  # A size no other test uses: the programs are new to the compilation caches.
  compiled = []

  def on_event(event, seconds, **_):
    if event == "/jax/core/compile/backend_compile_duration":
      compiled.append(seconds)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    simulator.compile_runs(key, num_users, params, runs, mesh, keep_images=False, keep_text=False)
    assert len(compiled) == 2
    for policy, policy_params in runs:
      simulator.run(
        key,
        np.arange(num_users),
        np.full(num_users, -1),
        params,
        policy,
        policy_params,
        mesh,
        keep_images=False,
        keep_text=False,
      )
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert len(compiled) == 2


def test_a_users_trajectory_does_not_depend_on_the_other_users(config, rater_log, fitted):
  few, _ = _run(config, rater_log, fitted, parallel.make_mesh(), num_users=8)
  many, _ = _run(config, rater_log, fitted, parallel.make_mesh(), num_users=24)
  np.testing.assert_array_equal(few.choice, many.choice[:8])
  np.testing.assert_array_equal(few.slate, many.slate[:8])


def test_planted_users_respond_with_planted_utilities(config, rater_log, fitted):
  traj, _ = _run(config, rater_log, fitted, parallel.make_mesh(), users="planted")
  planted = np.asarray(synthetic.planted_utility(rater_log.world, traj.images))  # [N, H, L, K*]
  own = np.take_along_axis(planted, traj.user_type[:, None, None, None], axis=-1)[..., 0]
  np.testing.assert_allclose(traj.utilities, own, atol=1e-5)


def test_simulated_trajectories_are_valid_canonical_records(config, rater_log, fitted):
  traj, _ = _run(config, rater_log, fitted, parallel.make_mesh(), num_users=6)
  records, table = synthetic_env.trajectories_to_records(traj, rater_log.world, user_prefix="sim")
  schema.validate_records(records, schema.RecordSpec.from_config(config), "simulated", table)
  assert len(records) == 6 * config.interaction.turns
  first = records[0]
  np.testing.assert_allclose(table.text[first.start_text_row], traj.history[0, 0], atol=1e-6)
  assert [r.choice for r in records[: config.interaction.turns]] == traj.choice[0].tolist()
  shown = jax.tree.map(
    lambda x: np.asarray(x)[0, 0], traj.shown
  )  # The first turn's slate of user 0.
  assert [o.text for o in first.options] == [
    synthetic.prompt_text(shown.attributes[j], shown.template[j])
    for j in range(config.interaction.slate_size)
  ]
  start = jax.tree.map(lambda x: np.asarray(x)[0], traj.start)
  assert first.start_prompt == synthetic.prompt_text(start.attributes, start.template)


def test_the_observation_never_holds_the_true_type(config, rater_log, fitted):
  names = {field.name for field in dataclasses.fields(simulator.Observation)}
  assert not {name for name in names if "type" in name}, names
  params = synthetic_env.env_params(rater_log.world, config, belief=fitted)
  observations = [simulator.reset(jax.random.key(4), params, user_type=k)[0] for k in range(3)]
  for other in observations[1:]:
    jax.tree.map(np.testing.assert_array_equal, other, observations[0])


@struct.dataclass
class _TypeKnown:
  """An ordinary policy told, in its params (users, type), the type of every user: the oracle without
  privilege."""

  num_categories: int = struct.field(pytree_node=False)
  slate_size: int = struct.field(pytree_node=False)

  def __call__(self, key, obs, params):
    del key
    users, user_type = params
    utilities, _ = users.utilities(obs.candidate_images, obs.candidate_text)
    return slate.select_slate(
      utilities[:, user_type], obs.category, self.num_categories, self.slate_size
    )


def test_the_oracle_reads_the_true_type_from_the_state_only(config, rater_log, fitted):
  sizes = {"num_categories": 5, "slate_size": config.interaction.slate_size}
  oracle = baselines.Oracle(**sizes)
  assert isinstance(oracle, simulator.PrivilegedPolicy)
  assert not isinstance(baselines.Greedy(**sizes), simulator.PrivilegedPolicy)
  planted = synthetic.PlantedUsers(rater_log.world)
  params = synthetic_env.env_params(rater_log.world, config, belief=fitted)
  ids = np.arange(12)

  def run(policy, policy_params, user_type):
    return simulator.run(
      jax.random.key(9),
      ids,
      np.full(ids.shape, user_type),
      params,
      policy,
      policy_params,
      parallel.make_mesh(),
    )

  for k in range(rater_log.world.num_types):
    _assert_same_trajectories(
      run(oracle, planted, k), run(_TypeKnown(**sizes), (planted, np.int32(k)), k)
    )


def test_seeds_of_the_shown_rows_equal_the_full_draw():
  for seed in range(10):
    key = jax.random.key(seed)
    action = jax.random.permutation(jax.random.key(100 + seed), 25)[:4]
    np.testing.assert_array_equal(
      simulator.seeds_of(key, action, 25, 4), simulator.candidate_seeds(key, 25, 4)[action]
    )


def _pooled_world(dim=6, prompts=30, pool=5, num_candidates=10, num_categories=5):
  """A replay generator over random features and fitted users that score images alone."""
  rng = np.random.default_rng(0)
  category = np.repeat(np.arange(num_categories), num_candidates // num_categories)
  generator = candidates.ReplayGenerator(
    expansions=rng.integers(0, prompts, (prompts, 2, num_candidates)).astype(np.int32),
    category=np.broadcast_to(category, (prompts, 2, num_candidates)).astype(np.int32),
    num_expansions=rng.integers(1, 3, prompts).astype(np.int32),
    start_prompts=np.arange(8, dtype=np.int32),
    text=rng.standard_normal((prompts, dim)).astype(np.float32),
    image_rows=np.arange(prompts * pool, dtype=np.int32).reshape(prompts, pool),
    image=rng.standard_normal((prompts * pool, dim)).astype(np.float32),
  )
  model = utility.UtilityModel(num_types=3, hidden=(7,), use_text_features=False)
  example = types.OptionFeatures(
    image=np.zeros((4, 4, dim), np.float32), text=np.zeros((4, dim), np.float32)
  )
  users = utility.FittedUsers(
    model=model,
    params=model.init(jax.random.key(3), example),
    log_priors=np.log(np.array([0.5, 0.3, 0.2], np.float32)),
  )
  interaction = ml_collections.ConfigDict(
    {"turns": 3, "slate_size": 3, "images_per_prompt": 4, "categories": tuple("abcde")}
  )
  return generator, users, interaction


def test_the_table_path_is_automatic_and_gives_the_same_rollouts(config):
  generator, users, interaction = _pooled_world()
  table_params = simulator.make_params(interaction, generator, users, users)
  mlp_params = simulator.make_params(interaction, generator, users, users, tabulate=False)
  assert (
    isinstance(table_params.users, utility.UtilityTable)
    and table_params.belief is table_params.users
  )
  assert table_params.belief_is_users and mlp_params.users is users
  sizes = {"num_categories": 5, "slate_size": 3}
  policies = {
    "random": (baselines.RandomSlate(**sizes), None),
    "greedy": (baselines.Greedy(**sizes), users),
    "oracle": (baselines.Oracle(**sizes), users),
  }
  mesh = parallel.make_mesh()
  fast = agent_eval.rollouts(
    jax.random.key(2), 40, agent_eval.Environment(table_params), policies, mesh
  )
  slow = agent_eval.rollouts(
    jax.random.key(2), 40, agent_eval.Environment(mlp_params), policies, mesh
  )
  for name in policies:
    _assert_same_trajectories(fast[name], slow[name], atol=1e-5)
    assert (
      fast[name].history is None and fast[name].slate_text is None and fast[name].images is None
    )


def test_one_belief_model_scores_each_slate_once_with_the_same_outcomes(config, rater_log, fitted):
  world = rater_log.world
  same = simulator.make_params(
    config.interaction, synthetic.SyntheticExpander(world), fitted, fitted
  )
  twin = fitted.replace(params=jax.tree.map(np.array, fitted.params))
  apart = simulator.make_params(
    config.interaction, synthetic.SyntheticExpander(world), fitted, twin
  )
  assert same.belief_is_users and not apart.belief_is_users
  policy = baselines.RandomSlate(num_categories=5, slate_size=config.interaction.slate_size)

  def run(params):
    ids = np.arange(16)
    return simulator.run(
      jax.random.key(1), ids, -np.ones_like(ids), params, policy, None, parallel.make_mesh()
    )

  _assert_same_trajectories(run(same), run(apart))


def _assert_observations_match_the_rollout(params, num_categories):
  """The observations of reset and step along user 0's rollout (type 0, random slates) hold its
  history, and the images of the options chosen so far (zeros for the turns not played)."""
  policy = baselines.RandomSlate(num_categories=num_categories, slate_size=params.slate_size)
  traj = simulator.run(
    jax.random.key(11), np.arange(1), np.zeros(1), params, policy, None, parallel.make_mesh()
  )
  chosen = np.take_along_axis(traj.images[0], traj.choice[0, :, None, None, None], axis=1)[:, 0]
  k_user = simulator.user_key(jax.random.key(11), 0)
  obs, state = simulator.reset(jax.random.fold_in(k_user, params.turns), params, user_type=0)
  for t in range(params.turns + 1):
    np.testing.assert_allclose(obs.history_images[:t], chosen[:t], atol=1e-6)
    assert not np.any(obs.history_images[t:])
    if t == params.turns:
      break
    k_policy, k_env = jax.random.split(jax.random.fold_in(k_user, t))
    action = policy(k_policy, obs, None)
    np.testing.assert_array_equal(action, traj.slate[0, t])
    np.testing.assert_allclose(obs.history[t], traj.history[0, t], atol=1e-6)
    assert not np.any(obs.history[t + 1 :])
    obs, state, _, _, info = simulator.step(k_env, state, action, params)
    assert int(info.choice) == traj.choice[0, t]
    np.testing.assert_array_equal(info.seeds, traj.seeds[0, t])
    np.testing.assert_allclose(info.images, traj.images[0, t], atol=1e-6)


def test_observations_from_reset_and_step_match_the_rollout(config, rater_log, fitted):
  params = synthetic_env.env_params(rater_log.world, config, users=fitted, belief=fitted)
  _assert_observations_match_the_rollout(params, len(config.interaction.categories))
  generator, users, interaction = _pooled_world()
  pooled = simulator.make_params(interaction, generator, users, users)
  _assert_observations_match_the_rollout(pooled, len(interaction.categories))
