"""What every stage shares: its PRNG key, its console messages and its metric writers."""

import contextlib
import os
from collections.abc import Iterator

import jax
import ml_collections

from pasta_jax import config as config_lib
from pasta_jax import metrics_log, parallel


def say(message: str) -> None:
  """Prints on process 0 only."""
  if jax.process_index() == 0:
    print(message, flush=True)


def stage_key(config: ml_collections.ConfigDict, stage: str) -> jax.Array:
  """The stage's PRNG key: fold_in(key(config.seed), the stage's index in config.STAGES)."""
  return jax.random.fold_in(jax.random.key(config.seed), config_lib.STAGES.index(stage))


def metrics_dir(stage: str, run_key: str) -> str:
  """Workdir-relative folder of a stage's training curves (one subfolder per fit)."""
  return os.path.join(stage, "metrics", run_key)


@contextlib.contextmanager
def metric_writer(workdir: str, stage: str, run_key: str, name: str) -> Iterator:
  """A clu writer of one fit's curves (TensorBoard events + metrics.jsonl), closed after the block.

  Every process leaves the block once process 0's files are complete, so any process may read them.
  """
  writer = metrics_log.open_writer(os.path.join(workdir, metrics_dir(stage, run_key), name))
  try:
    yield writer
  finally:
    writer.close()
  parallel.sync(f"metrics {stage} {run_key} {name}")
