"""Orbax CheckpointManager wrappers: asynchronous atomic saves (every process of a job writes its
own shards, as Orbax expects), restores onto the current (possibly resharded) state.

A restore lays every leaf out by the sharding of its counterpart in `like`; a leaf without one (e.g.
from `jax.eval_shape`) is replicated on every device of the job, so a checkpoint saved on one
topology (8 devices) loads on another (1 device, 4 devices, several processes).

A checkpoint that exists but cannot be read back (a truncated or overwritten file inside it) is a
`errors.CorruptFileError` naming the directory and what to delete and re-run; nothing is deleted."""

import contextlib
import os
from collections.abc import Iterator
from typing import TypeVar

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from pasta_jax import errors, provenance

State = TypeVar("State")
READ_ERRORS = (ValueError, OSError, EOFError, KeyError)
MAX_CAUSE_CHARS = 300


def replicated_everywhere() -> NamedSharding:
  """Replicated on every device of the job."""
  return NamedSharding(jax.sharding.Mesh(np.asarray(jax.devices()), ("devices",)), P())


def abstract(like: State) -> State:
  """`jax.ShapeDtypeStruct`s of `like`'s leaves with their shardings; `replicated_everywhere` for a
  leaf without one (a NumPy array, `jax.eval_shape`'s output, Orbax's metadata of a saved leaf)."""

  def one(x):
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, jax.sharding.Sharding):
      sharding = replicated_everywhere()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

  return jax.tree.map(one, like)


def manager(directory: str, save_every: int, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep, save_interval_steps=save_every, create=True
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, force: bool = False) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def rerun_hint(path: str) -> str:
  """What re-creates `path`: "re-run the <stage> stage" when `path` lies under a stage's folder of
  a workdir (`<workdir>/<stage>/...` beside `<workdir>/<stage>.done.json`), else "re-run the
  stage that wrote it"."""
  child = os.path.abspath(path)
  parent = os.path.dirname(child)
  while parent != child:
    stage = os.path.basename(child)
    if os.path.isfile(provenance.marker_path(parent, stage)):
      return f"re-run the {stage} stage"
    child, parent = parent, os.path.dirname(parent)
  return "re-run the stage that wrote it"


@contextlib.contextmanager
def unreadable_as_corrupt(path: str, remedy: str) -> Iterator[None]:
  """Turns a read error of Orbax, tensorstore or JSON inside the block into a CorruptFileError
  "<path>: cannot be read back (<cause>) ...; <remedy>", chained `from` the cause."""
  try:
    yield
  except Exception as e:
    if not isinstance(e, READ_ERRORS) and type(e) is not Exception:
      raise
    lines = str(e).strip().splitlines() or [""]
    cause = f"{type(e).__name__}: {lines[0][:MAX_CAUSE_CHARS]}"
    raise errors.CorruptFileError(
      f"{path}: the checkpoint cannot be read back ({cause}); it is truncated or corrupted, or "
      f"holds a state of other shapes than this run's; {remedy}"
    ) from e


def restore_latest(mngr: ocp.CheckpointManager, like: State) -> State:
  """The latest saved state, laid out like `like` (same shardings); `like` itself when none is
  saved. A step that cannot be read back is a CorruptFileError naming its directory."""
  step = mngr.latest_step()
  if step is None:
    return like
  step_dir = os.path.join(os.fspath(mngr.directory), str(step))
  remedy = (
    f"delete {step_dir} and re-run: training resumes from the checkpoint before it, or starts "
    "over when there is none"
  )
  with unreadable_as_corrupt(step_dir, remedy):
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract(like)))


def restore(directory: str, like: State, step: int | None = None) -> State:
  """Restores `step` (default: latest) from `directory`; a missing checkpoint is a
  FileNotFoundError, one that cannot be read back a CorruptFileError naming its directory."""
  path = os.path.abspath(directory)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint directory at {path}")
  with ocp.CheckpointManager(path) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise FileNotFoundError(
        f"no checkpoint step {step} in {path}; found steps {list(mngr.all_steps())}"
      )
    step_dir = os.path.join(path, str(step))
    with unreadable_as_corrupt(step_dir, f"delete {step_dir} and {rerun_hint(path)}"):
      return mngr.restore(step, args=ocp.args.StandardRestore(abstract(like)))


def save_tree(path: str, tree) -> None:
  """Writes one pytree (e.g. final fitted parameters) as a standalone Orbax checkpoint at `path`."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), tree, force=True)


def restore_tree(path: str, like: State | None = None) -> State:
  """Reads a `save_tree` checkpoint laid out like `like` (None: the saved shapes and dtypes,
  replicated on every device); a missing one is a FileNotFoundError, one that cannot be read back
  a CorruptFileError naming the directory and the stage to re-run."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}; run the stage that writes it first")
  with (
    unreadable_as_corrupt(path, f"delete {path} and {rerun_hint(path)}"),
    ocp.StandardCheckpointer() as checkpointer,
  ):
    if like is None:
      like = checkpointer.metadata(path).item_metadata
    return checkpointer.restore(path, abstract(like))
