"""Canonical records as a TFDS dataset in the array_record format (no TensorFlow needed), each entry
one record as compact JSON (`io.encode`); read back with `as_data_source()`. Needs the optional
tensorflow-datasets extra (requirements-extras.txt)."""

import os
from collections.abc import Iterator

import tensorflow_datasets as tfds

from pasta_jax.data import io, schema


class ChoiceRecordsBuilder(tfds.core.GeneratorBasedBuilder):
  """Canonical records as a TFDS dataset; manual_dir holds `<split>.jsonl` files (e.g. train, validation)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Canonical ChoiceRecords as JSON, in file order."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Put canonical records as <split>.jsonl files (schema.write_records) in manual_dir."
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      disable_shuffling=True,
      features=tfds.features.FeaturesDict({"record": tfds.features.Text()}),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    splits = sorted(p for p in dl_manager.manual_dir.iterdir() if p.name.endswith(".jsonl"))
    if not splits:
      raise schema.RecordError(f"{dl_manager.manual_dir}: no <split>.jsonl files")
    return {p.name.removesuffix(".jsonl"): self._generate_examples(os.fspath(p)) for p in splits}

  def _generate_examples(self, path: str) -> Iterator[tuple[int, dict]]:
    for i, record in enumerate(schema.read_records(path)):
      yield i, {"record": io.encode(record).decode()}


def build_tfds(records_dir: str, data_dir: str) -> ChoiceRecordsBuilder:
  """Prepares (once) the TFDS dataset of `records_dir/<split>.jsonl` under `data_dir`."""
  builder = ChoiceRecordsBuilder(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=records_dir))
  return builder


def tfds_records(builder: ChoiceRecordsBuilder, split: str) -> list[schema.ChoiceRecord]:
  source = builder.as_data_source(split=split)
  return [io.decode(source[i]["record"]) for i in range(len(source))]
