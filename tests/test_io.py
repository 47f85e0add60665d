"""array_record shards read by grain (partitioned by user across readers and JAX processes) and the TFDS builder."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import grain.python as grain
import pytest

from pasta_jax.data import io, schema, tfds_builder
from tests import conftest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def records(rater_log):
  return rater_log.records[:200]  # 20 users, 2 sessions of 5 turns each.


def _key(record: schema.ChoiceRecord) -> tuple[str, int]:
  return record.session_id, record.turn


def test_encode_decode_round_trips(records):
  assert all(io.decode(io.encode(r)) == r for r in records)
  assert json.loads(io.encode(records[0])) == json.loads(
    json.dumps(schema.record_to_json(records[0]))
  )


def test_one_shard_round_trips_in_order(records, tmp_path):
  paths = io.write_shards(str(tmp_path / "records"), records)
  assert [os.path.basename(p) for p in paths] == ["records-00000-of-00001.array_record"]
  assert io.read_shards(paths) == records  # ShardByJaxProcess: one process reads everything.
  assert sorted(os.listdir(tmp_path)) == ["records-00000-of-00001.array_record"]


def test_two_shards_partition_the_records_exactly(records, tmp_path):
  paths = io.write_shards(str(tmp_path / "records"), records, num_shards=2)
  parts = [
    io.read_shards(paths, grain.ShardOptions(shard_index=i, shard_count=2)) for i in range(2)
  ]
  assert all(parts)
  assert parts[0] + parts[1] == records
  keys = [_key(r) for part in parts for r in part]
  assert len(keys) == len(set(keys)) == len(records)
  users = [{r.user_id for r in part} for part in parts]
  assert not users[0] & users[1]  # A user's records stay with one reader.
  assert abs(len(users[0]) - len(users[1])) <= 1


def test_more_shards_than_users_is_rejected(records, tmp_path):
  with pytest.raises(ValueError, match="2 shards for 1 users"):
    io.write_shards(str(tmp_path / "r"), records[:10], num_shards=2)  # One user.
  assert not os.listdir(tmp_path)


def test_files_that_do_not_divide_among_readers_are_rejected(records, tmp_path):
  paths = io.write_shards(str(tmp_path / "r"), records, num_shards=3)
  with pytest.raises(ValueError, match="3 files cannot be shared by 2 readers"):
    io.read_shards(paths, grain.ShardOptions(0, 2))


def test_a_shuffled_loader_yields_a_seeded_permutation(records, tmp_path):
  paths = io.write_shards(str(tmp_path / "r"), records, num_shards=2)
  options = grain.ShardOptions(0, 1)
  first = list(io.data_loader(paths, options, shuffle=True, seed=3))
  assert first != records and sorted(first, key=_key) == sorted(records, key=_key)
  assert list(io.data_loader(paths, options, shuffle=True, seed=3)) == first


_PROCESS = """
import json, sys
from pasta_jax import parallel
parallel.maybe_initialize_distributed()
import jax
from pasta_jax.data import io
paths = json.loads(sys.argv[1])
keys = [[r.session_id, r.turn] for r in io.read_shards(paths)]
print(json.dumps({"process": jax.process_index(), "count": jax.process_count(), "keys": keys}))
"""


def test_each_jax_process_reads_its_own_files(records, tmp_path):
  paths = io.write_shards(str(tmp_path / "r"), records, num_shards=4)
  script = tmp_path / "reader.py"
  script.write_text(textwrap.dedent(_PROCESS))
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for process_id in range(2):
    env = {
      **os.environ,
      "JAX_PLATFORMS": "cpu",
      "XLA_FLAGS": conftest.xla_flags(1),
      "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
      "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": str(process_id),
      "PYTHONPATH": REPO,
    }
    procs.append(
      subprocess.Popen(
        [sys.executable, str(script), json.dumps(paths)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
      )
    )
  outputs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
  results = sorted(
    (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs), key=lambda r: r["process"]
  )
  assert [(r["process"], r["count"]) for r in results] == [(0, 2), (1, 2)]
  expected = [
    [_key(r) for r in io.read_shards(paths[i::2], grain.ShardOptions(0, 1))] for i in range(2)
  ]
  assert [[tuple(k) for k in r["keys"]] for r in results] == expected
  assert sorted(expected[0] + expected[1]) == sorted(_key(r) for r in records)


def test_the_tfds_builder_round_trips_each_split(records, tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  schema.write_records(str(manual / "train.jsonl"), records[:150])
  schema.write_records(str(manual / "validation.jsonl"), records[150:])
  builder = tfds_builder.build_tfds(str(manual), str(tmp_path / "tfds"))
  assert set(builder.info.splits) == {"train", "validation"}
  assert builder.info.file_format.value == "array_record"
  assert tfds_builder.tfds_records(builder, "train") == records[:150]
  assert tfds_builder.tfds_records(builder, "validation") == records[150:]
  again = tfds_builder.build_tfds(str(manual), str(tmp_path / "tfds"))  # Prepared once; reused.
  assert tfds_builder.tfds_records(again, "validation") == records[150:]


def test_the_tfds_builder_names_an_empty_manual_dir(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "notes.txt").write_text("no records here")
  with pytest.raises(schema.RecordError, match="no <split>.jsonl files"):
    tfds_builder.build_tfds(str(manual), str(tmp_path / "tfds"))


def _release_records(tmp_path):
  from pasta_jax.data import pasta_kaggle
  from tests import test_pasta_kaggle

  test_pasta_kaggle.write_release(str(tmp_path))
  return pasta_kaggle.load(str(tmp_path), show_progress=False)


def _pickapic_records(tmp_path):
  from pasta_jax.data import preferences
  from tests import test_preferences

  path = test_preferences.write_pickapic(tmp_path / "train-0.parquet")
  return preferences.load_pickapic(
    [path], preferences.ImageStore(str(tmp_path)), show_progress=False
  )


@pytest.mark.parametrize(
  "load", [_release_records, _pickapic_records], ids=["pasta_release", "pickapic"]
)
def test_loaded_real_format_records_round_trip_through_two_readers(load, tmp_path):
  loaded = load(tmp_path)
  paths = io.write_shards(str(tmp_path / "records"), loaded, num_shards=2)
  parts = [
    io.read_shards(paths, grain.ShardOptions(shard_index=i, shard_count=2)) for i in range(2)
  ]
  assert all(parts) and parts[0] + parts[1] == loaded
  assert not {r.user_id for r in parts[0]} & {r.user_id for r in parts[1]}
