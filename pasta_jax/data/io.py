"""Sharded storage of canonical records: array_record files read by grain.

An array_record entry is one record as compact JSON bytes (`schema.record_to_json`). `write_shards` keeps
each user's records in one file and in their order, and `data_loader` shards by file: with
`shard_options` (default `grain.ShardByJaxProcess()`), host i of n reads files i, i + n, ..., so a user's
records stay on one host of a pod. The TFDS builder of the same entries is in `data/tfds_builder.py`
(tensorflow-datasets is an optional extra).
"""

import contextlib
import json
from collections.abc import Sequence

import grain.python as grain
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
