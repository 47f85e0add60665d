"""Training curves people can watch: clu metric writers (TensorBoard event files and a JSON Lines
file) on process 0 and a no-op writer elsewhere, clu's progress report, and the JSON Lines curves
read back.

clu imports TensorFlow, so it is imported only when a writer is opened."""

import collections
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

JSONL_NAME = "metrics.jsonl"
PROGRESS_METRICS = (
  "steps_per_sec",
  "uptime",
)  # What clu's ReportProgress writes beside the curves.


class NullWriter:
  """The writer of processes other than 0: every write does nothing."""

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    del step, scalars

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


def open_writer(log_dir: str):
  """A clu `AsyncMultiWriter` of TensorBoard event files and `log_dir`/metrics.jsonl on process 0, a
  `NullWriter` elsewhere; the caller closes it. By convention `log_dir` is
  <checkpoint or output dir>/metrics/<run name>/."""
  if jax.process_index() != 0:
    return NullWriter()
  from clu import metric_writers  # pylint: disable=g-import-not-at-top

  from pasta_jax import jsonl_writer  # pylint: disable=g-import-not-at-top

  os.makedirs(log_dir, exist_ok=True)
  return metric_writers.AsyncMultiWriter(
    [
      metric_writers.SummaryWriter(log_dir),
      jsonl_writer.JsonlWriter(os.path.join(log_dir, JSONL_NAME)),
    ]
  )


def progress_reporter(writer, total: int) -> Callable[[int], Any]:
  """clu's `ReportProgress` (steps per second and uptime, written to `writer`) for a run of `total`
  steps; a no-op without a writer or with a `NullWriter`."""
  if writer is None or isinstance(writer, NullWriter):
    return lambda step: None
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top

  return periodic_actions.ReportProgress(num_train_steps=total, writer=writer)


def read_jsonl_metrics(path: str) -> dict[str, np.ndarray]:
  """{"step": i64[n], metric: f64[n]} of a JSON Lines metrics file over its n distinct steps,
  ascending.

  Rows of one step are merged (a later value wins, as when a resumed run logs a step again); a step
  without a metric has NaN there."""
  by_step = collections.defaultdict(dict)
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        by_step[int(row.pop("step"))].update(row)
  steps = sorted(by_step)
  names = sorted({name for row in by_step.values() for name in row})
  curves = {
    name: np.array([by_step[s].get(name, np.nan) for s in steps], np.float64) for name in names
  }
  return {"step": np.array(steps, np.int64), **curves}
