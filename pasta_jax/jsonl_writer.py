"""A clu `MetricWriter` of scalars as JSON Lines: one row {"step": s, name: value, ...} per write.

Imports clu (and with it TensorFlow); `metrics_log.open_writer` imports this module when it opens a
writer."""

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu import metric_writers


class JsonlWriter(metric_writers.MetricWriter):
  """Appends each `write_scalars` call to the file at `path` as one JSON line; other kinds are
  dropped."""

  def __init__(self, path: str):
    self._file = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    row = {"step": int(step), **{name: float(np.asarray(value)) for name, value in scalars.items()}}
    self._file.write(json.dumps(row) + "\n")

  def write_summaries(self, step, values, metadata=None) -> None:
    del step, values, metadata

  def write_images(self, step, images) -> None:
    del step, images

  def write_videos(self, step, videos) -> None:
    del step, videos

  def write_audios(self, step, audios, *, sample_rate) -> None:
    del step, audios, sample_rate

  def write_texts(self, step, texts) -> None:
    del step, texts

  def write_histograms(self, step, arrays, num_buckets=None) -> None:
    del step, arrays, num_buckets

  def write_hparams(self, hparams) -> None:
    del hparams

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()
