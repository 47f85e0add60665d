"""The split's records in array_record shards with their row layout (`data/layout.py`): any block of
rows read from the shards is exactly those rows of `schema.to_choices` (long histories over several
rows, ragged slates, padding rows), a block of rows or of users reads only its own records, the
global arrays one process assembles equal the host rows, and a damaged layout or shard is a
RecordError naming the file, the record and the field."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from pasta_jax import parallel
from pasta_jax.data import io, layout, schema

HEAVY = 4  # Users whose histories become one rater's, so that rater fills HEAVY rows.
SHARDS = 3


@pytest.fixture(scope="module")
def written(config, rater_log, tmp_path_factory):
  """(directory, records, spec, {split: users}, T): 30 users (one "heavy" rater with HEAVY histories,
  one turn with a 2-option slate) split into alternating train and held-out users, written in rows
  of one ordinary history."""
  users = list(dict.fromkeys(r.user_id for r in rater_log.records))[:30]
  heavy = set(users[:HEAVY])
  records = [
    dataclasses.replace(r, user_id="heavy") if r.user_id in heavy else r
    for r in rater_log.records
    if r.user_id in users
  ]
  records[7] = dataclasses.replace(records[7], options=records[7].options[:2], choice=1)
  ids = list(dict.fromkeys(r.user_id for r in records))
  splits = {"train": ids[::2], "heldout": ids[1::2]}
  turns = int(schema.history_lengths(records, [users[-1]])[0])
  directory = str(tmp_path_factory.mktemp("shards"))
  spec = schema.RecordSpec.from_config(config)
  layout.write(directory, records, spec, splits, turns, SHARDS)
  return directory, records, spec, splits, turns


def _assert_same(got, expected):
  for field in [f.name for f in dataclasses.fields(expected)]:
    np.testing.assert_array_equal(
      np.asarray(getattr(got, field)), np.asarray(getattr(expected, field)), err_msg=field
    )


@pytest.mark.parametrize("split", layout.SPLITS)
def test_blocks_of_rows_read_from_the_shards_are_those_rows_of_to_choices(written, split):
  directory, records, spec, splits, turns = written
  expected, users = schema.to_choices(records, spec, splits[split], turns_per_row=turns)
  one = layout.load(directory)[split]
  assert one.turns_per_row == turns and one.num_rows == expected.num_users
  assert one.user_index.ids == users.ids
  np.testing.assert_array_equal(one.types, users.types)
  assert len(one.paths) == SHARDS and all(os.path.exists(p) for p in one.paths)
  padded = schema.pad_users(expected, 8)
  _assert_same(layout.read_rows(one, spec, slice(0, padded.num_users)), padded)
  cuts = [0, 3, 4, 11, padded.num_users]
  blocks = [layout.read_rows(one, spec, slice(a, b)) for a, b in zip(cuts[:-1], cuts[1:])]
  _assert_same(jax.tree.map(lambda *x: np.concatenate(x), *blocks), padded)


def test_the_heavy_rater_fills_consecutive_rows_and_the_short_slate_is_masked(written):
  directory, _, spec, splits, _ = written
  train = layout.load(directory)["train"]
  choices = layout.read_rows(train, spec, slice(0, train.num_rows))
  heavy = train.users.index("heavy")
  assert np.sum(choices.user_index == heavy) == HEAVY
  assert choices.option_mask.sum(axis=-1).min() == 2 and splits["train"][0] == "heavy"


def test_the_layout_lists_every_sessions_start_prompt(written, tmp_path):
  directory, records, *_ = written
  prompts = layout.start_prompts(directory)
  assert prompts == sorted({r.start_prompt for r in records if r.turn == 0}) and len(prompts) > 1
  copy = _copy(written, tmp_path)
  path = os.path.join(copy, layout.LAYOUT)
  with open(path) as f:
    entry = json.load(f)
  entry["start_prompts"][1] = 7
  with open(path, "w") as f:
    json.dump(entry, f)
  with pytest.raises(schema.RecordError, match=r"layout.json: field 'start_prompts': expected"):
    layout.start_prompts(copy)


def test_a_block_decodes_only_its_own_records(written, monkeypatch):
  directory, _, spec, _, _ = written
  train = layout.load(directory)["train"]
  _, _, count = train.rows()
  decoded = []
  real_decode = io.decode
  monkeypatch.setattr(io, "decode", lambda data: decoded.append(1) or real_decode(data))
  layout.read_rows(train, spec, slice(2, 6))
  assert len(decoded) == count[2:6].sum() < count.sum()


def test_a_block_of_users_reads_their_records_in_row_order_and_only_theirs(written, monkeypatch):
  directory, records, _, splits, _ = written
  train = layout.load(directory)["train"]
  block = slice(1, 5)
  expected = [r for user in splits["train"][block] for r in records if r.user_id == user]
  decoded = []
  real_decode = io.decode
  monkeypatch.setattr(io, "decode", lambda data: decoded.append(1) or real_decode(data))
  assert layout.read_users(train, block) == expected
  assert len(decoded) == len(expected) < train.choices.sum()
  assert layout.read_users(train, slice(3, 3)) == []


def test_a_block_of_users_rows_give_their_choices_and_session_turns(written):
  directory, records, spec, splits, turns = written
  train = layout.load(directory)["train"]
  expected, _ = schema.to_choices(records, spec, splits["train"], turns_per_row=turns)
  session_turns = schema.session_turns(records, splits["train"], turns)
  block = slice(0, 3)  # The heavy rater's HEAVY rows and two ordinary users'.
  rows = layout.user_rows(train, block)
  assert rows == slice(0, HEAVY + 2)
  row_records = layout.read_row_records(train, rows)
  _assert_same(layout.fill(train, spec, row_records), jax.tree.map(lambda x: x[rows], expected))
  np.testing.assert_array_equal(schema.row_turns(row_records, turns), session_turns[rows])
  assert layout.user_rows(train, slice(len(train.users), None)) == slice(
    train.num_rows, train.num_rows
  )


def test_global_choices_hold_the_padded_rows_split_over_the_mesh(written):
  directory, _, spec, _, _ = written
  mesh = parallel.make_mesh()
  train = layout.load(directory)["train"]
  choices = layout.global_choices(train, spec, 16, mesh)
  assert choices.num_users == layout.padded_rows(train, 16) == 16 * -(-train.num_rows // 16)
  assert choices.choice.sharding == parallel.data_sharding(mesh)
  _assert_same(choices, layout.read_rows(train, spec, slice(0, choices.num_users)))


def _copy(written, tmp_path) -> str:
  directory = str(tmp_path / "shards")
  os.makedirs(directory)
  for name in os.listdir(written[0]):
    with (
      open(os.path.join(written[0], name), "rb") as f,
      open(os.path.join(directory, name), "wb") as g,
    ):
      g.write(f.read())
  return directory


@pytest.mark.parametrize(
  "change, message",
  [
    (lambda e: e["splits"]["heldout"].pop("turns_per_row"), r"heldout: field 'turns_per_row'"),
    (
      lambda e: e["splits"]["train"].update(turns_per_row=0),
      r"train: field 'turns_per_row': 0 < 1",
    ),
    (lambda e: e["splits"]["train"].update(turns_per_row=True), r"train: field 'turns_per_row'"),
    (lambda e: e.update(max_images=0), r": field 'max_images': 0 < 1"),
    (lambda e: e["splits"]["train"]["choices"].__setitem__(2, 10.5), r"'choices', entry 2"),
    (lambda e: e["splits"]["train"]["types"].__setitem__(0, "a"), r"'types', entry 0"),
    (lambda e: e["splits"]["train"]["types"].pop(), r"'types': \d+ entries for \d+ users"),
    (lambda e: e["splits"]["train"]["files"].__setitem__(0, "x"), r"'files', entry 0"),
    (lambda e: e["splits"]["train"]["choices"].__setitem__(0, 1), r"'files': \d+ records for"),
  ],
)
def test_a_damaged_layout_names_the_file_and_the_field(written, tmp_path, change, message):
  directory = _copy(written, tmp_path)
  path = os.path.join(directory, layout.LAYOUT)
  with open(path) as f:
    entry = json.load(f)
  change(entry)
  with open(path, "w") as f:
    json.dump(entry, f)
  with pytest.raises(schema.RecordError, match=r"layout.json.*" + message):
    layout.load(directory)


def test_a_shard_of_other_users_names_the_file_the_record_and_the_field(written, tmp_path):
  directory = _copy(written, tmp_path)
  _, records, spec, splits, _ = written
  intruded = [
    dataclasses.replace(r, user_id="intruder") if r.user_id == splits["train"][1] else r
    for user in splits["train"]
    for r in records
    if r.user_id == user
  ]
  io.write_shards(os.path.join(directory, "train"), intruded, SHARDS)
  train = layout.load(directory)["train"]
  start = int(train.rows()[1][train.rows()[0].tolist().index(1)])
  with pytest.raises(
    schema.RecordError,
    match=rf"train-00000-of-0000{SHARDS}.array_record: record {start}: field 'user_id': "
    "'intruder'",
  ):
    layout.read_rows(train, spec, slice(0, train.num_rows))


def test_a_damaged_shard_names_the_file(written, tmp_path):
  directory = _copy(written, tmp_path)
  train = layout.load(directory)["train"]
  os.truncate(train.paths[1], os.path.getsize(train.paths[1]) // 2)
  with pytest.raises(schema.RecordError, match=r"train-00001-of-00003.array_record"):
    layout.read_rows(train, written[2], slice(0, train.num_rows))


def test_each_process_gets_a_contiguous_nonempty_block_of_users(monkeypatch):
  monkeypatch.setattr(parallel, "multiprocess", lambda: True)
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  blocks = []
  for p in range(3):
    monkeypatch.setattr(jax, "process_index", lambda p=p: p)
    blocks.append(parallel.process_block(10))
  assert blocks == [slice(0, 3), slice(3, 6), slice(6, 10)]
  with pytest.raises(ValueError, match="2 users cannot be shared by the job's 3 processes"):
    parallel.process_block(2)
