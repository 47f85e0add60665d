"""Orbax CheckpointManager wrappers: atomic saves, restore onto the current (possibly resharded) state."""

import os
from typing import TypeVar

import jax
import orbax.checkpoint as ocp

State = TypeVar("State")


def manager(directory: str, save_every: int, max_to_keep: int = 2) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_every, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(mngr: ocp.CheckpointManager, step: int, state, force: bool = False) -> None:
  mngr.save(step, args=ocp.args.StandardSave(state), force=force)


def restore_latest(mngr: ocp.CheckpointManager, like: State) -> State:
  """The latest saved state, laid out like `like` (same shardings); `like` itself when none is saved."""
  step = mngr.latest_step()
  if step is None:
    return like
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore(directory: str, like: State, step: int | None = None) -> State:
  """Restores `step` (default: latest) from `directory`; a missing checkpoint is a FileNotFoundError."""
  path = os.path.abspath(directory)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint directory at {path}")
  with ocp.CheckpointManager(path) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None or step not in mngr.all_steps():
      raise FileNotFoundError(f"no checkpoint step {step} in {path}; found steps {list(mngr.all_steps())}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def save_tree(path: str, tree) -> None:
  """Writes one pytree (e.g. final fitted parameters) as a standalone Orbax checkpoint at `path`."""
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(path), tree, force=True)


def restore_tree(path: str, like: State | None = None) -> State:
  """Reads a `save_tree` checkpoint laid out like `like` (None: as saved, on the default device); a missing
  one is a FileNotFoundError."""
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no checkpoint at {path}; run the stage that writes it first")
  with ocp.StandardCheckpointer() as checkpointer:
    if like is None:
      return checkpointer.restore(path)
    return checkpointer.restore(path, jax.tree.map(ocp.utils.to_shape_dtype_struct, like))
