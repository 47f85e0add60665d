"""Sharded storage of canonical records: array_record files read by grain, and a TFDS builder.

An array_record entry is one record as compact JSON bytes (`schema.record_to_json`). `write_shards` keeps
each user's records in one file and in their order, and `data_loader` shards by file: with
`shard_options` (default `grain.ShardByJaxProcess()`), host i of n reads files i, i + n, ..., so a user's
records stay on one host of a pod. `ChoiceRecordsBuilder` packages `<split>.jsonl` files as a TFDS dataset in
the array_record format (no TensorFlow needed), read back with `as_data_source()`.
"""

import contextlib
import json
import os
from collections.abc import Iterator, Sequence

import grain.python as grain
import tensorflow_datasets as tfds
from array_record.python import array_record_module

from pasta_jax import files
from pasta_jax.data import schema

WRITER_OPTIONS = "group_size:1"


def encode(record: schema.ChoiceRecord) -> bytes:
  return json.dumps(
    schema.record_to_json(record), separators=(",", ":"), ensure_ascii=False
  ).encode()


def decode(data: bytes) -> schema.ChoiceRecord:
  return schema.record_from_json(json.loads(data))


def shard_path(prefix: str, index: int, count: int) -> str:
  return f"{prefix}-{index:05d}-of-{count:05d}.array_record"


def user_shards(records: Sequence[schema.ChoiceRecord], num_shards: int) -> list[int]:
  """The shard of each record: users in order of first appearance, cut into `num_shards` contiguous groups."""
  users = list(dict.fromkeys(r.user_id for r in records))
  shard = {user: u * num_shards // len(users) for u, user in enumerate(users)}
  return [shard[r.user_id] for r in records]


def write_shards(
  prefix: str, records: Sequence[schema.ChoiceRecord], num_shards: int = 1
) -> list[str]:
  """Writes `prefix-0000i-of-0000n.array_record` files atomically (`files.replacing`: the leader
  alone); returns their paths in shard order. Every shard holds at least one user (grain cannot read
  an empty source)."""
  num_users = len({r.user_id for r in records})
  if not 1 <= num_shards <= num_users:
    raise ValueError(f"{num_shards} shards for {num_users} users; expected 1..{num_users}")
  shards = user_shards(records, num_shards)
  paths = [shard_path(prefix, i, num_shards) for i in range(num_shards)]
  with contextlib.ExitStack() as stack:
    temporary = [stack.enter_context(files.replacing(p)) for p in paths]
    writers = [array_record_module.ArrayRecordWriter(t, WRITER_OPTIONS) for t in temporary]
    for record, shard in zip(records, shards):
      writers[shard].write(encode(record))
    for writer in writers:
      writer.close()
  return paths


class _Decode(grain.MapTransform):
  def map(self, element: bytes) -> schema.ChoiceRecord:
    return decode(element)


def shard_files(paths: Sequence[str], shard_options: grain.ShardOptions) -> list[str]:
  """The files host `shard_index` of `shard_count` reads; ValueError unless the files divide evenly."""
  if len(paths) % shard_options.shard_count:
    raise ValueError(
      f"{len(paths)} files cannot be shared by {shard_options.shard_count} readers; write a "
      "multiple of the number of processes"
    )
  return list(paths[shard_options.shard_index :: shard_options.shard_count])


def data_loader(
  paths: Sequence[str],
  shard_options: grain.ShardOptions | None = None,
  shuffle: bool = False,
  seed: int = 0,
  num_epochs: int = 1,
  worker_count: int = 0,
) -> grain.DataLoader:
  """A grain DataLoader of this reader's files (see `shard_files`) that yields `schema.ChoiceRecord`s."""
  options = grain.ShardByJaxProcess() if shard_options is None else shard_options
  source = grain.ArrayRecordDataSource(shard_files(paths, options))
  sampler = grain.IndexSampler(
    num_records=len(source),
    shard_options=grain.NoSharding(),
    shuffle=shuffle,
    seed=seed,
    num_epochs=num_epochs,
  )
  return grain.DataLoader(
    data_source=source, sampler=sampler, operations=[_Decode()], worker_count=worker_count
  )


def read_shards(
  paths: Sequence[str], shard_options: grain.ShardOptions | None = None
) -> list[schema.ChoiceRecord]:
  """This reader's records, in file order."""
  return list(data_loader(paths, shard_options))


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
      yield i, {"record": encode(record).decode()}


def build_tfds(records_dir: str, data_dir: str) -> ChoiceRecordsBuilder:
  """Prepares (once) the TFDS dataset of `records_dir/<split>.jsonl` under `data_dir`."""
  builder = ChoiceRecordsBuilder(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=records_dir))
  return builder


def tfds_records(builder: ChoiceRecordsBuilder, split: str) -> list[schema.ChoiceRecord]:
  source = builder.as_data_source(split=split)
  return [decode(source[i]["record"]) for i in range(len(source))]
