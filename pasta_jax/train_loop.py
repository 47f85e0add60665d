"""The training loop of EM, IQL and behaviour cloning, in the style of the Flax examples' train.py.

A learner supplies its placed initial state and a jitted `advance(state) -> (state, metrics)` that
runs one chunk of `Schedule.per_chunk` units (EM: one epoch of every restart; IQL and BC:
`steps_per_dispatch` updates in one `lax.scan`). `run` restores the latest Orbax checkpoint,
dispatches the chunks, stops on a non-finite metric or state leaf, saves asynchronously and writes
the metrics to a clu metric writer. An optional `stop(state)` ends the run early (EM's convergence);
it reads the state alone, so a resumed run stops where an uninterrupted one does."""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

import chex
import jax
import jax.numpy as jnp
import numpy as np

from pasta_jax import checkpoint, config_checks, metrics_log, progress
from pasta_jax.errors import TrainingDivergedError

State = TypeVar("State")
Metrics = Mapping[str, np.ndarray]


class FromConfig:
  """Mixin of a frozen settings dataclass read field by field from config block `config_name`; a
  field with a default may be absent from the block (a config written before the field existed)."""

  config_name: ClassVar[str]

  @classmethod
  def from_config(cls, block) -> Any:
    """The settings in `block` (a ConfigDict); a missing field without a default is a ConfigError
    naming it."""
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    missing = [f.name for f in fields if f.name not in block and f.default is dataclasses.MISSING]
    if missing:
      raise config_checks.ConfigError(
        f"config.{cls.config_name}.{missing[0]} is missing; {cls.__name__} reads {names}"
      )
    return cls(**{name: block[name] for name in names if name in block})


@dataclasses.dataclass(frozen=True)
class Schedule:
  """`total` units ("step" or "epoch") in chunks of `per_chunk`, a checkpoint every `save_every`
  units and at the end. `name` names the run in messages and on the progress bar; `members` names
  the trailing axis of the metrics ("restart"), None when each metric is one value per unit."""

  name: str
  unit: str
  total: int
  per_chunk: int
  save_every: int
  members: str | None = None


@jax.jit
def finite_leaves(tree) -> chex.Array:
  """bool[n]: each floating leaf of `tree` is finite everywhere."""
  return jnp.stack(
    [
      jnp.all(jnp.isfinite(x))
      for x in jax.tree.leaves(tree)
      if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
  )


def floating_paths(tree) -> list[str]:
  """The key paths of the leaves `finite_leaves` checks, in its order."""
  return [
    jax.tree_util.keystr(path)
    for path, x in jax.tree_util.tree_leaves_with_path(tree)
    if jnp.issubdtype(x.dtype, jnp.inexact)
  ]


def check_finite(schedule: Schedule, metrics: Metrics, first: int) -> None:
  """metrics {name: f32[S] or f32[S, members]} of units first .. first + S - 1; raises
  TrainingDivergedError naming the first non-finite unit, the first non-finite metric at that unit
  and its member."""
  rows = {name: np.asarray(v).reshape(len(v), -1) for name, v in metrics.items()}  # [S, members]
  bad = np.stack([~np.all(np.isfinite(v), axis=1) for v in rows.values()])  # [M, S]
  if not bad.any():
    return
  unit = int(np.flatnonzero(bad.any(axis=0))[0])
  name = list(rows)[int(np.flatnonzero(bad[:, unit])[0])]
  values = rows[name][unit]
  member = int(np.flatnonzero(~np.isfinite(values))[0])
  where = f" in {schedule.members} {member}" if schedule.members else ""
  raise TrainingDivergedError(
    f"{schedule.name}: metric '{name}' is {values[member]} at {schedule.unit} {first + unit}{where}"
  )


def check_finite_state(schedule: Schedule, finite: np.ndarray, paths: list[str], done: int) -> None:
  """finite bool[n] of the leaves at `paths` after `done` units; raises TrainingDivergedError naming
  the first non-finite leaf and the last unit run."""
  if not np.all(finite):
    raise TrainingDivergedError(
      f"{schedule.name}: state leaf '{paths[int(np.argmin(finite))]}' is not finite "
      f"after {schedule.unit} {done - 1}"
    )


def scalars(metrics: Metrics, members: str | None) -> dict[str, float]:
  """The chunk's mean of each metric (f32[S] or f32[S, R]); "name/<members>_r" for each member r."""
  means = {name: np.mean(np.asarray(v), axis=0) for name, v in metrics.items()}
  if members is None:
    return {name: float(m) for name, m in means.items()}
  return {f"{name}/{members}_{r}": float(x) for name, m in means.items() for r, x in enumerate(m)}


def run(
  state: State,
  advance: Callable[[State], tuple[State, Metrics]],
  schedule: Schedule,
  position: Callable[[State], chex.Array],
  *,
  checkpoint_dir: str | None = None,
  stop_after: int | None = None,
  writer=None,
  show_progress: bool = True,
  watch: Callable[[State], Any] = lambda state: state,
  on_chunk: Callable[[State, int], None] | None = None,
  stop: Callable[[State], bool] | None = None,
) -> tuple[State, dict[str, np.ndarray]]:
  """Runs `advance` from `position(state)` (units done) to `schedule.total` units.

  Resumes from the latest checkpoint in `checkpoint_dir` (laid out like `state`); saves are
  asynchronous and the manager is closed on return and on exceptions. `stop_after` ends the run
  after that many units (as a killed run would). After each chunk: raises TrainingDivergedError on a
  non-finite metric or leaf of `watch(state)`, calls `on_chunk(state, units done)`, writes each
  metric's chunk mean (`scalars`) and clu's progress report to `writer` at step = units done, and
  saves. `stop(state)`, checked on the restored state and after each chunk, ends the run once true
  (the state it ends with is saved).

  Returns (state, history): history {metric: f32[n, ...], "step": i32[n]} over the n units this call
  ran (row i: unit step[i])."""
  manager = (
    None if checkpoint_dir is None else checkpoint.manager(checkpoint_dir, schedule.save_every)
  )
  try:
    if manager is not None:
      state = checkpoint.restore_latest(manager, state)
    paths = floating_paths(watch(state))
    start = int(jax.device_get(position(state)))
    last = schedule.total if stop_after is None else min(schedule.total, stop_after)
    if stop is not None and stop(state):
      last = start
    report = metrics_log.progress_reporter(writer, schedule.total)
    history = []
    bar = progress.progress(range(start, last, schedule.per_chunk), schedule.name, show_progress)
    for first in bar:
      state, metrics = advance(state)
      metrics, finite = jax.device_get((metrics, finite_leaves(watch(state))))
      done = first + schedule.per_chunk
      check_finite(schedule, metrics, first)
      check_finite_state(schedule, finite, paths, done)
      if on_chunk is not None:
        on_chunk(state, done)
      history.append(metrics)
      if writer is not None:
        writer.write_scalars(done, scalars(metrics, schedule.members))
        report(done)
      if hasattr(bar, "set_postfix"):
        bar.set_postfix({name: f"{np.mean(v):.4f}" for name, v in metrics.items()})
      stopping = stop is not None and stop(state)
      if manager is not None:
        checkpoint.save(manager, done, state, force=done == schedule.total or stopping)
      if stopping:
        break
  finally:
    if manager is not None:
      manager.close()
    if writer is not None:
      writer.flush()
  merged = {
    name: np.concatenate([m[name] for m in history]) for name in (history[0] if history else ())
  }
  merged["step"] = np.arange(start, start + len(history) * schedule.per_chunk, dtype=np.int32)
  return state, merged
