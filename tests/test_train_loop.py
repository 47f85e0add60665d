"""The training loop shared by EM, IQL and behaviour cloning: bit-exact resume, the NaN guard and
the metric writers, each tested once for all three learners on the tiny world; settings from config
blocks."""

import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pasta_jax import config_checks, metrics_log, parallel, train_loop, types
from pasta_jax.agent import bc, data, iql
from pasta_jax.data import schema
from pasta_jax.errors import TrainingDivergedError
from pasta_jax.user_model import em, utility
from tests import test_em_convergence as convergence_panel

LEARNERS = ("em", "iql", "bc")
METRICS = {
  "em": ("loglik_per_choice/restart_0", "loglik_per_choice/restart_1"),
  "iql": ("value_loss", "critic_loss", "v", "q"),
  "bc": ("loss", "accuracy"),
}
KEYS = {"em": 1, "iql": 2, "bc": 3}


@dataclasses.dataclass(frozen=True)
class World:
  """The tiny world's inputs of each learner: EM's feature table and choices, the agents'
  transitions."""

  config: ml_collections.ConfigDict
  table: types.FeatureTable
  choices: types.Choices
  transitions: data.Transitions


@pytest.fixture(scope="module")
def world(config, rater_log, choices):
  """Transitions of every logged session, rewards N(0, 1) drawn with seed 0."""
  ch, index = choices
  sessions = data.sessions_from_records(
    rater_log.records,
    rater_log.table,
    schema.RecordSpec.from_config(config),
    index.ids,
    config.interaction.turns,
    "tiny world",
  )
  rewards = np.random.default_rng(0).normal(size=sessions.choice.shape).astype(np.float32)
  return World(config, rater_log.table, ch, data.transitions_from_sessions(sessions, rewards))


@dataclasses.dataclass(frozen=True)
class Run:
  """How a learner's run counts: units of `unit` up to `total`, `per_chunk` per dispatch."""

  unit: str
  total: int
  per_chunk: int


def _run(learner: str, config) -> Run:
  if learner == "em":
    return Run("epoch", config.em.epochs, 1)
  settings = config.agent[learner]
  return Run("step", settings.steps, settings.steps_per_dispatch)


def _fit(learner: str, world: World, table=None, transitions=None, stop_after=None, **kwargs):
  """The learner's final state on the tiny world (8 devices, key KEYS[learner]); `table` or
  `transitions` replace the world's."""
  mesh, key, config = parallel.make_mesh(), jax.random.key(KEYS[learner]), world.config
  if learner == "em":
    return em.fit(
      em.EMSettings.from_config(config.em),
      utility.from_config(config),
      world.table if table is None else table,
      world.choices,
      key,
      mesh,
      show_progress=False,
      stop_after_epoch=stop_after,
      **kwargs,
    )
  transitions = world.transitions if transitions is None else transitions
  learner_object = (
    iql.IQL(iql.IQLPolicy.from_config(config), iql.IQLSettings.from_config(config.agent.iql))
    if learner == "iql"
    else bc.BC(bc.BCPolicy.from_config(config), bc.BCSettings.from_config(config.agent.bc))
  )
  state, _ = iql.train(
    learner_object,
    transitions,
    None,
    "real",
    0.5,
    key,
    mesh,
    show_progress=False,
    stop_after_step=stop_after,
    **kwargs,
  )
  return state


def _position(learner: str, state) -> int:
  return int(state.epoch[0] if learner == "em" else state.step)


class RecordingWriter:
  """A writer keeping every `write_scalars` call, clu's progress reports included: [(step, {name:
  value})]."""

  def __init__(self):
    self.rows = []

  def write_scalars(self, step, scalars):
    self.rows.append((step, dict(scalars)))

  def flush(self):
    pass


@pytest.fixture(scope="module")
def uninterrupted(world):
  """{learner: final state} of uninterrupted runs without checkpoints."""
  return {learner: _fit(learner, world) for learner in LEARNERS}


@pytest.mark.parametrize("learner", LEARNERS)
def test_a_stopped_run_resumes_bit_identical(learner, world, uninterrupted, tmp_path):
  run, directory = _run(learner, world.config), str(tmp_path / "ckpt")
  stop = run.per_chunk if learner != "em" else 2
  stopped = _fit(learner, world, checkpoint_dir=directory, stop_after=stop)
  assert _position(learner, stopped) == stop
  writer = RecordingWriter()
  resumed = _fit(learner, world, checkpoint_dir=directory, writer=writer)
  logged = [
    (step, row) for step, row in writer.rows if "steps_per_sec" not in row and "uptime" not in row
  ]
  assert [step for step, _ in logged] == list(
    range(stop + run.per_chunk, run.total + 1, run.per_chunk)
  )
  assert all(sorted(row) == sorted(METRICS[learner]) for _, row in logged)
  expected = uninterrupted[learner]
  assert jax.tree.structure(resumed) == jax.tree.structure(expected)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(resumed), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def _first_draws(learner: str, world: World) -> np.ndarray:
  """i64[N]: the first step whose batch holds each transition, in the learner's run on `world`."""
  config, t = world.config, world.transitions
  settings = config.agent[learner]
  example = jax.tree.map(lambda x: x[:1], t)
  learner_rule = (
    iql.IQL(iql.IQLPolicy.from_config(config), iql.IQLSettings.from_config(settings))
    if learner == "iql"
    else bc.BC(bc.BCPolicy.from_config(config), bc.BCSettings.from_config(settings))
  )
  run_key = learner_rule.init(jax.random.key(KEYS[learner]), example).key
  ids = t.replace(reward=np.arange(t.size, dtype=np.float32))
  draws = jax.vmap(
    lambda step, ids: (
      data.sample_batch(
        jax.random.fold_in(jax.random.wrap_key_data(run_key), step), (ids,), (settings.batch_size,)
      ).reward
    ),
    in_axes=(0, None),
  )
  drawn = np.asarray(
    jax.jit(draws)(jnp.arange(settings.steps), ids)
  )  # [steps, B]: each step's draws.
  return np.array(
    [
      np.argmax(np.any(drawn == i, axis=1)) if np.any(drawn == i) else settings.steps
      for i in range(t.size)
    ]
  )


def _poisoned(learner: str, world: World):
  """(fit kwargs with one NaN input, the message the guard must raise)."""
  if learner == "em":
    image = np.array(world.table.image)
    image[world.choices.image_rows[7, 3, 1, 2], 4] = np.nan  # A feature of one image user 7 saw.
    table = types.FeatureTable(image=image, text=world.table.text)
    return {
      "table": table
    }, r"^EM K=3 \(minibatch\): metric 'loglik_per_choice' is nan at epoch 0 in restart 0$"
  first = _first_draws(learner, world)
  victim = int(np.argmax(np.where(first < world.config.agent[learner].steps, first, -1)))
  assert first[victim] > 0
  t = world.transitions
  if learner == "iql":
    reward = t.reward.copy()
    reward[victim] = np.nan
    return {
      "transitions": t.replace(reward=reward)
    }, rf"^IQL \(discount 0.9\): metric 'critic_loss' is nan at step {first[victim]}$"
  text = t.slate_text.copy()
  text[victim] = np.nan
  return {
    "transitions": t.replace(slate_text=text)
  }, rf"^BC: metric 'loss' is nan at step {first[victim]}$"


@pytest.mark.parametrize("learner", LEARNERS)
def test_nan_guard_names_the_run_the_step_and_the_metric(learner, world):
  kwargs, message = _poisoned(learner, world)
  with pytest.raises(TrainingDivergedError, match=message):
    _fit(learner, world, **kwargs)


def test_guard_names_the_member_and_the_state_leaf():
  schedule = train_loop.Schedule(
    name="EM K=3", unit="epoch", total=10, per_chunk=2, save_every=1, members="restart"
  )
  train_loop.check_finite(schedule, {"loglik_per_choice": np.zeros((2, 3))}, 6)
  metrics = {
    "a": np.zeros((2, 3)),
    "loglik_per_choice": np.array([[0.0, 0.0, 0.0], [-0.5, -np.inf, np.nan]]),
  }
  with pytest.raises(
    TrainingDivergedError,
    match=r"^EM K=3: metric 'loglik_per_choice' is -inf at epoch 7 in "
    r"restart 1$",
  ):
    train_loop.check_finite(schedule, metrics, 6)
  tree = {"params": {"w": np.array([1.0, np.nan]), "b": np.zeros(2)}, "step": np.int32(3)}
  finite = np.asarray(train_loop.finite_leaves(tree))
  paths = train_loop.floating_paths(tree)
  assert paths == ["['params']['b']", "['params']['w']"] and finite.tolist() == [True, False]
  with pytest.raises(
    TrainingDivergedError,
    match=r"^EM K=3: state leaf '\['params'\]\['w'\]' is not finite after "
    r"epoch 7$",
  ):
    train_loop.check_finite_state(schedule, finite, paths, 8)


@pytest.mark.parametrize("learner", LEARNERS)
def test_metric_writers_write_jsonl_and_tensorboard(learner, world, tmp_path):
  run, log_dir = _run(learner, world.config), str(tmp_path / "metrics" / learner)
  writer = metrics_log.open_writer(log_dir)
  try:
    state = _fit(learner, world, writer=writer)
  finally:
    writer.close()
  steps = list(range(run.per_chunk, run.total + 1, run.per_chunk))
  with open(os.path.join(log_dir, metrics_log.JSONL_NAME)) as f:
    rows = [json.loads(line) for line in f]
  metric_rows = [row for row in rows if set(METRICS[learner]) <= set(row)]
  assert [row["step"] for row in metric_rows] == steps
  assert all(set(row) == {"step", *METRICS[learner]} for row in metric_rows)
  assert glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
  curves = metrics_log.read_jsonl_metrics(os.path.join(log_dir, metrics_log.JSONL_NAME))
  np.testing.assert_array_equal(curves["step"], steps)
  assert curves["steps_per_sec"][-1] > 0  # clu's ReportProgress at the last step.
  if learner == "em":
    history = np.asarray(state.loglik_history)  # [R, E]
    for r in range(history.shape[0]):
      np.testing.assert_allclose(curves[f"loglik_per_choice/restart_{r}"], history[r], rtol=1e-6)


def test_read_jsonl_metrics_merges_rows_of_a_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [
    {"step": 2, "loss": 1.0},
    {"step": 1, "loss": 3.0},
    {"step": 2, "steps_per_sec": 5.0},
    {"step": 2, "loss": 0.5},
  ]
  path.write_text("".join(json.dumps(row) + "\n" for row in rows))
  curves = metrics_log.read_jsonl_metrics(str(path))
  assert sorted(curves) == ["loss", "step", "steps_per_sec"]
  np.testing.assert_array_equal(curves["step"], [1, 2])
  np.testing.assert_array_equal(curves["loss"], [3.0, 0.5])
  np.testing.assert_array_equal(curves["steps_per_sec"], [np.nan, 5.0])


def test_settings_from_config_name_a_missing_field(config):
  assert em.EMSettings.from_config(config.em).epochs == config.em.epochs
  block = config.agent.bc.copy_and_resolve_references()
  del block["steps_per_dispatch"]
  with pytest.raises(
    config_checks.ConfigError, match=r"config\.agent\.bc\.steps_per_dispatch is missing"
  ):
    bc.BCSettings.from_config(block)


def test_a_run_ended_by_its_stop_predicate_resumes_to_the_same_end(tmp_path):
  """EM's stop predicate (every restart converged, read from the state) ends exact EM on the scaled
  panel of test_em_convergence before its most epochs; stopped after 2 epochs and resumed, it ends
  at the same epoch, bit-identical, and resuming the ended run runs nothing."""
  settings = em.EMSettings(mode="exact", epochs=60, **convergence_panel.SETTINGS)
  model = utility.UtilityModel(num_types=2, hidden=(), use_text_features=False, standardize=True)
  table, choices = convergence_panel._panel()

  def fit(directory=None, stop_after=None, writer=None):
    return jax.device_get(
      em.fit(
        settings,
        model,
        table,
        choices,
        jax.random.key(2),
        parallel.make_mesh(),
        checkpoint_dir=directory,
        show_progress=False,
        stop_after_epoch=stop_after,
        writer=writer,
      )
    )

  uninterrupted = fit()
  end = int(uninterrupted.epoch[0])
  assert 2 < end < settings.epochs and uninterrupted.converged.all()
  directory = str(tmp_path / "ckpt")
  assert int(fit(directory, stop_after=2).epoch[0]) == 2
  writer = RecordingWriter()
  resumed = fit(directory, writer=writer)
  assert [step for step, row in writer.rows if "uptime" not in row][-1] == end
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(resumed), jax.tree.leaves(uninterrupted)
  ):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
  again = RecordingWriter()
  assert int(fit(directory, writer=again).epoch[0]) == end
  assert not [row for _, row in again.rows if "loglik_per_choice/restart_0" in row]
