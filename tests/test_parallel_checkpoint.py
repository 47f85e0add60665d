"""Sharding invariance, determinism of the synthetic world, checkpoints (across meshes, resumed after a
SIGKILL) and compilation counts of EM. Resume after a clean stop: tests/test_train_loop.py."""

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time

import chex
import jax
import ml_collections
import numpy as np
import pytest

from configs import quickstart
from pasta_jax import checkpoint, parallel, synthetic_env, types
from pasta_jax.agent import data as agent_data
from pasta_jax.agent import iql
from pasta_jax.data import schema
from pasta_jax.user_model import em, utility
from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIT_KEY = 1


def _mesh(devices):
  return parallel.make_mesh(ml_collections.ConfigDict({"data": devices}))


def _settings(config, **overrides):
  return dataclasses.replace(em.EMSettings.from_config(config.em), **overrides)


def _fit(config, rater_log, choices, settings, mesh, **kwargs):
  return em.fit(
    settings,
    utility.from_config(config),
    rater_log.table,
    choices[0],
    jax.random.key(FIT_KEY),
    mesh,
    show_progress=False,
    **kwargs,
  )


def _devices(x):
  return len(x.sharding.device_set)


def _assert_bit_equal(actual, expected):
  for field in ("params", "opt_state", "log_priors", "loglik_history", "epoch", "key"):
    a, b = getattr(actual, field), getattr(expected, field)
    assert jax.tree.structure(a) == jax.tree.structure(b), field
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
      assert np.array_equal(np.asarray(x), np.asarray(y)), f"{field}{jax.tree_util.keystr(path)}"


def _spy_on_epochs(monkeypatch):
  """The `epoch` counter of every state em.fit hands to run_epoch from now on."""
  started, real = [], em.run_epoch

  def run_epoch(state, *args, **kwargs):
    started.append(int(jax.device_get(state.epoch[0])))
    return real(state, *args, **kwargs)

  monkeypatch.setattr(em, "run_epoch", run_epoch)
  return started


def _steps(directory):
  """Finalized checkpoint steps (Orbax writes a step under a temporary name and renames it when complete)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


# Kill and resume.


@pytest.fixture(scope="module")
def uninterrupted(config, rater_log, choices, tmp_path_factory):
  """An uninterrupted 8-device fit (the config's settings) with a checkpoint every epoch."""
  assert config.em.checkpoint_every_epochs == 1
  return _fit(
    config,
    rater_log,
    choices,
    _settings(config),
    _mesh(8),
    checkpoint_dir=str(tmp_path_factory.mktemp("uninterrupted")),
  )


TRAIN_SCRIPT = """
import sys
import time

import jax

from configs import quickstart
from pasta_jax import checkpoint, parallel, synthetic_env
from pasta_jax.data import schema
from pasta_jax.user_model import em, utility

checkpoint_dir, hold_at, fit_key = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
assert jax.device_count() == 8, jax.devices()
config = quickstart.get_config("tiny")
rater_log = synthetic_env.generate_rater_log(jax.random.key(0), config)
choices, _ = schema.to_choices(rater_log.records, schema.RecordSpec.from_config(config))
real_save = checkpoint.save


def save(mngr, step, state, force=False):
  real_save(mngr, step, state, force=force)
  if step >= hold_at:  # Park mid-run (this save may still be in flight) until the test kills the process.
    time.sleep(600)


checkpoint.save = save
em.fit(em.EMSettings.from_config(config.em), utility.from_config(config), rater_log.table, choices,
       jax.random.key(fit_key), parallel.make_mesh(), checkpoint_dir=checkpoint_dir, show_progress=False)
print("finished without being killed")
"""


@dataclasses.dataclass(frozen=True)
class TrainingProcess:
  proc: subprocess.Popen
  checkpoint_dir: str
  log_path: str


@pytest.fixture(scope="module")
def training_process(config, tmp_path_factory):
  """A separate python process fitting the tiny world on 8 devices with a checkpoint every epoch; it parks
  after saving step epochs - 1, so it is still mid-run when the test kills it.

  Module-scoped and started by the first test of this file, so that its start-up (imports, world,
  compiles) runs beside the other tests; test_sigkilled_fit_resumes_bit_exact, last, kills it.
  """
  hold_at = config.em.epochs - 1
  assert hold_at >= 2
  directory = tmp_path_factory.mktemp("sigkill")
  script, log_path, checkpoint_dir = (
    directory / "train.py",
    str(directory / "train.log"),
    str(directory / "ckpt"),
  )
  script.write_text(TRAIN_SCRIPT)
  env = dict(
    os.environ,
    XLA_FLAGS=conftest.xla_flags(8),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
  )
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
      [sys.executable, str(script), checkpoint_dir, str(hold_at), str(FIT_KEY)],
      cwd=REPO,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
    )
  yield TrainingProcess(proc, checkpoint_dir, log_path)
  if proc.poll() is None:
    proc.kill()
    proc.wait()


def _wait_for_step(training, step, timeout_s):
  deadline = time.monotonic() + timeout_s
  while not any(s >= step for s in _steps(training.checkpoint_dir)):
    if training.proc.poll() is not None:
      pytest.fail(
        f"training process exited with {training.proc.returncode}:\n{open(training.log_path).read()}"
      )
    if time.monotonic() > deadline:
      pytest.fail(
        f"no checkpoint step >= {step} after {timeout_s}s:\n{open(training.log_path).read()}"
      )
    time.sleep(0.05)


# 1 vs 8 devices.


@pytest.mark.usefixtures("training_process")  # Started here; see the fixture.
@pytest.mark.parametrize("mode", em.MODES)
def test_fit_on_1_and_8_devices_agrees(config, rater_log, choices, mode):
  settings = _settings(config, mode=mode)
  one = _fit(config, rater_log, choices, settings, _mesh(1))
  eight = _fit(config, rater_log, choices, settings, _mesh(8))
  assert _devices(one.log_priors) == 1 and _devices(eight.log_priors) == 8
  assert eight.log_priors.shape == (settings.restarts, config.user_model.num_types)
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(one.params), jax.tree.leaves(eight.params)
  ):
    np.testing.assert_allclose(
      np.asarray(a), np.asarray(b), rtol=0, atol=1e-5, err_msg=jax.tree_util.keystr(path)
    )
  np.testing.assert_allclose(
    np.asarray(one.log_priors), np.asarray(eight.log_priors), rtol=0, atol=1e-5
  )
  np.testing.assert_allclose(
    np.asarray(one.loglik_history), np.asarray(eight.loglik_history), rtol=0, atol=1e-5
  )
  assert np.all(np.isfinite(np.asarray(one.loglik_history)))


# Synthetic world determinism.


def _user_number(record):
  return int(record.user_id.removeprefix("user"))


def _resolved(record, table):
  """The record with its feature-table row numbers replaced by the feature values they point at."""
  image, text = np.asarray(table.image), np.asarray(table.text)
  options = tuple(
    dataclasses.replace(
      o,
      text_row=text[o.text_row].tobytes(),
      images=tuple(dataclasses.replace(im, row=image[im.row].tobytes()) for im in o.images),
    )
    for o in record.options
  )
  start = (
    text[record.start_text_row].tobytes() if record.start_text_row >= 0 else record.start_text_row
  )
  return dataclasses.replace(record, options=options, start_text_row=start)


def test_rater_log_is_a_function_of_the_key(config, rater_log):
  again = synthetic_env.generate_rater_log(jax.random.key(0), config)
  assert again.records == rater_log.records
  np.testing.assert_array_equal(again.table.image, rater_log.table.image)
  np.testing.assert_array_equal(again.table.text, rater_log.table.text)
  np.testing.assert_array_equal(again.user_types, rater_log.user_types)


def test_a_users_log_does_not_depend_on_the_number_of_users(config, rater_log):
  # generate_rater_log's docstring: session keys are fold_in(fold_in(key, u), s), "so a user's log does not
  # depend on how many users there are". Row numbers index a table shared by all users, so records are
  # compared with their rows resolved to the features they point at.
  small_config = config.copy_and_resolve_references()
  small_config.world.num_users = config.world.num_users // 2
  small = synthetic_env.generate_rater_log(jax.random.key(0), small_config)
  first = [r for r in rater_log.records if _user_number(r) < small_config.world.num_users]
  assert len(small.records) == len(first) > 0
  assert {r.user_id for r in small.records} == {r.user_id for r in first}
  np.testing.assert_array_equal(
    small.user_types, rater_log.user_types[: small_config.world.num_users]
  )
  for a, b in zip(small.records, first):
    assert _resolved(a, small.table) == _resolved(b, rater_log.table), (a.session_id, a.turn)


# Checkpoints across meshes.


@pytest.fixture(scope="module")
def initial(config, rater_log, choices):
  """(restart-batched EM state, users padded for a mesh of 1 or 8 devices) on the host, before any epoch."""
  settings = _settings(config)
  padded = schema.pad_users(choices[0], em.users_multiple(settings, _mesh(8)))
  assert padded.num_users % em.users_multiple(settings, _mesh(1)) == 0
  table = rater_log.table
  example = types.OptionFeatures(
    image=table.image[padded.image_rows[0, 0]], text=table.text[padded.text_rows[0, 0]]
  )
  state = em.init_state(
    jax.random.key(FIT_KEY), utility.from_config(config), settings, example, padded.num_users
  )
  return jax.device_get(state), padded


def _on_mesh(tree, mesh):
  """{"em": state replicated, "choices": users sharded over "data"} on `mesh`."""
  return {
    "em": jax.device_put(tree["em"], parallel.replicated(mesh)),
    "choices": jax.device_put(tree["choices"], parallel.data_sharding(mesh)),
  }


def test_checkpoint_saved_on_8_devices_restores_on_1(initial, tmp_path):
  state, padded = initial
  saved = _on_mesh({"em": state, "choices": padded}, _mesh(8))
  assert (
    _devices(saved["choices"].choice) == 8
    and not saved["choices"].choice.sharding.is_fully_replicated
  )
  mngr = checkpoint.manager(str(tmp_path / "ckpt"), save_every=1)
  checkpoint.save(mngr, 3, saved)
  mngr.wait_until_finished()
  mngr.close()

  like = _on_mesh(jax.tree.map(np.zeros_like, {"em": state, "choices": padded}), _mesh(1))
  restored = checkpoint.restore(str(tmp_path / "ckpt"), like)
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  for (path, r), s, want in zip(
    jax.tree_util.tree_leaves_with_path(restored), jax.tree.leaves(saved), jax.tree.leaves(like)
  ):
    np.testing.assert_array_equal(np.asarray(r), np.asarray(s), err_msg=jax.tree_util.keystr(path))
    assert r.sharding == want.sharding and _devices(r) == 1, jax.tree_util.keystr(path)


def test_restore_of_a_missing_directory_names_the_path(tmp_path):
  missing = str(tmp_path / "no_such_run")
  with pytest.raises(FileNotFoundError, match=re.escape(missing)):
    checkpoint.restore(missing, {"x": np.zeros(3, np.float32)})


def test_restore_of_a_directory_without_steps_names_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
    checkpoint.restore(str(tmp_path), {"x": np.zeros(3, np.float32)})


# Checkpoints across topologies: saved by this 8-device process, restored by 1- and 4-device ones.


def topology_states(config) -> dict:
  """{"em": restart-batched EM state, "iql": IQL state, "users": i32[8, 3]} on the host, built from
  key 0: what the cross-topology tests save here and rebuild in the restoring process."""
  it, dim = config.interaction, config.world.feature_dim
  example = types.OptionFeatures(
    image=np.zeros((it.slate_size, it.images_per_prompt, dim), np.float32),
    text=np.zeros((it.slate_size, dim), np.float32),
  )
  em_state = em.init_state(
    jax.random.key(FIT_KEY), utility.from_config(config), _settings(config), example, 8
  )
  n, h = 2, it.turns + 1
  transitions = agent_data.Transitions(
    history=np.zeros((n, h, dim), np.float32),
    history_mask=np.ones((n, h), bool),
    turn=np.zeros(n, np.int32),
    slate_text=np.zeros((n, it.slate_size, dim), np.float32),
    slate_category=np.zeros((n, it.slate_size), np.int32),
    choice=np.zeros(n, np.int32),
    reward=np.zeros(n, np.float32),
    next_history_mask=np.ones((n, h), bool),
    next_turn=np.ones(n, np.int32),
    not_done=np.ones(n, np.float32),
  )
  policy = iql.IQLPolicy(
    hidden=tuple(config.agent.hidden), num_categories=len(it.categories), slate_size=it.slate_size
  )
  learner = iql.IQL(policy, iql.IQLSettings.from_config(config.agent.iql))
  iql_state = learner.init(jax.random.key(FIT_KEY), transitions)
  users = np.arange(24, dtype=np.int32).reshape(8, 3)
  return jax.device_get({"em": em_state, "iql": iql_state, "users": users})


def place_states(states: dict, mesh) -> dict:
  """`topology_states` on `mesh`: the states replicated, the users split over "data"."""
  replicated = parallel.replicated(mesh)
  return {
    "em": jax.device_put(states["em"], replicated),
    "iql": jax.device_put(states["iql"], replicated),
    "users": jax.device_put(states["users"], parallel.data_sharding(mesh)),
  }


def check_restores(directory: str) -> None:
  """Restores what `saved_on_8_devices` wrote onto all of this process's devices: the manager's
  step laid out like the states placed here, and the standalone tree laid out like
  `jax.eval_shape` of it (no shardings) and as saved (no `like`); asserts the saved values, on every
  device of this process."""
  states = topology_states(quickstart.get_config("tiny"))
  mesh = _mesh(jax.device_count())
  like = place_states(jax.tree.map(np.zeros_like, states), mesh)
  restored = {
    "manager": checkpoint.restore(os.path.join(directory, "manager"), like),
    "eval_shape": checkpoint.restore_tree(
      os.path.join(directory, "tree"), jax.eval_shape(lambda: states)
    ),
  }
  for how, tree in restored.items():
    assert jax.tree.structure(tree) == jax.tree.structure(states), how
    for (path, r), e in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(states)):
      where = f"{how}{jax.tree_util.keystr(path)}"
      assert _devices(r) == jax.device_count(), where
      np.testing.assert_array_equal(np.asarray(r), np.asarray(e), err_msg=where)
  as_saved = checkpoint.restore_tree(os.path.join(directory, "tree"))
  assert all(_devices(x) == jax.device_count() for x in jax.tree.leaves(as_saved))
  np.testing.assert_array_equal(np.asarray(as_saved["users"]), states["users"])


RESTORE_SCRIPT = """
import sys

import jax

from tests import test_parallel_checkpoint

assert jax.device_count() == int(sys.argv[2]), jax.devices()
test_parallel_checkpoint.check_restores(sys.argv[1])
print("restored on", jax.device_count(), "devices")
"""


@pytest.fixture(scope="module")
def saved_on_8_devices(config, tmp_path_factory) -> str:
  """A directory holding `topology_states` saved on 8 devices: manager/ (an asynchronous
  CheckpointManager save, step 1) and tree/ (`checkpoint.save_tree`)."""
  directory = tmp_path_factory.mktemp("topology")
  placed = place_states(topology_states(config), _mesh(8))
  assert _devices(placed["users"]) == 8 and not placed["users"].sharding.is_fully_replicated
  mngr = checkpoint.manager(str(directory / "manager"), save_every=1)
  checkpoint.save(mngr, 1, placed)
  mngr.wait_until_finished()
  mngr.close()
  checkpoint.save_tree(str(directory / "tree"), placed)
  return str(directory)


@pytest.mark.parametrize("devices", [1, 4])
def test_states_saved_on_8_devices_restore_on_1_and_4(saved_on_8_devices, devices):
  env = dict(
    os.environ,
    XLA_FLAGS=conftest.xla_flags(devices),
    JAX_PLATFORMS="cpu",
    PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p),
  )
  done = subprocess.run(
    [sys.executable, "-c", RESTORE_SCRIPT, saved_on_8_devices, str(devices)],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-5000:]
  assert f"restored on {devices} devices" in done.stdout


def test_states_saved_on_8_devices_restore_here_without_shardings(saved_on_8_devices):
  check_restores(saved_on_8_devices)


# Compilation.


def test_epoch_traces_once_for_repeated_shapes(config, rater_log, initial):
  settings, model, mesh = _settings(config), utility.from_config(config), _mesh(8)
  host_state, padded = initial
  table, placed = em.place(rater_log.table, padded, settings, mesh)
  state = jax.device_put(host_state, parallel.replicated(mesh))
  chex.clear_trace_counter()
  try:
    step = jax.jit(
      chex.assert_max_traces(em.epoch, n=1), static_argnames=("model", "settings", "mesh")
    )
    for _ in range(3):
      state, _ = step(state, table, placed, model=model, settings=settings, mesh=mesh)
  finally:
    chex.clear_trace_counter()
  assert int(state.epoch[0]) == 3


def test_fit_compiles_run_epoch_once(config, rater_log, choices):
  # Settings no other test uses, so this (model, settings, mesh) is new to run_epoch's cache.
  settings = _settings(config, epochs=5, prior_floor=3.25e-6)
  before = em.run_epoch._cache_size()
  state = _fit(config, rater_log, choices, settings, _mesh(8))
  assert int(state.epoch[0]) == settings.epochs
  assert em.run_epoch._cache_size() == before + 1


# Last in the file: the process started with the first test has reached its checkpoints by now.


def test_sigkilled_fit_resumes_bit_exact(
  config, rater_log, choices, uninterrupted, training_process, monkeypatch
):
  _wait_for_step(training_process, 2, timeout_s=400)
  training_process.proc.send_signal(signal.SIGKILL)
  assert training_process.proc.wait(timeout=60) == -signal.SIGKILL
  settings = _settings(config)
  last = _steps(training_process.checkpoint_dir)[-1]
  assert 2 <= last < settings.epochs
  started = _spy_on_epochs(monkeypatch)
  resumed = _fit(
    config, rater_log, choices, settings, _mesh(8), checkpoint_dir=training_process.checkpoint_dir
  )
  assert started == list(range(last, settings.epochs))  # Resumed from the last complete checkpoint.
  assert int(resumed.epoch[0]) == settings.epochs
  _assert_bit_equal(resumed, uninterrupted)
