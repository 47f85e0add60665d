"""The canonical record schema: JSON Lines round trip, validation messages, feature tables, padding."""

import dataclasses
import json
import re

import numpy as np
import pytest

from pasta_jax import types
from pasta_jax.data import schema

SOURCE = "bad_records.jsonl"


def _spec(config):
  return schema.RecordSpec.from_config(config)


def _replaced(records, i, **changes):
  """A copy of `records` whose record i has `changes`."""
  bad = list(records)
  bad[i] = dataclasses.replace(records[i], **changes)
  return bad


def _replaced_option(records, i, j, **changes):
  """A copy of `records` whose record i has option j replaced with `changes`."""
  options = list(records[i].options)
  options[j] = dataclasses.replace(options[j], **changes)
  return _replaced(records, i, options=tuple(options))


def _validation_error(config, records, table=None) -> str:
  with pytest.raises(schema.RecordError) as info:
    schema.validate_records(records, _spec(config), SOURCE, table)
  return str(info.value)


def _assert_names(message: str, record: int, field: str) -> None:
  assert SOURCE in message, message
  assert re.search(rf"record {record}\b", message), message
  assert f"field '{field}'" in message, message


def _preference(
  record: schema.ChoiceRecord, session_id: str, num_images: int = 1
) -> schema.ChoiceRecord:
  """A pairwise preference built from a real session turn (so its rows lie inside the feature table)."""
  options = tuple(
    dataclasses.replace(o, category=schema.PREFERENCE_CATEGORY, images=o.images[:num_images])
    for o in record.options[:2]
  )
  return dataclasses.replace(
    record,
    kind=schema.PREFERENCE,
    session_id=session_id,
    turn=0,
    options=options,
    choice=min(record.choice, 1),
  )


# JSON Lines.


def test_write_then_read_gives_equal_records(rater_log, tmp_path):
  path = str(tmp_path / "records.jsonl")
  schema.write_records(path, rater_log.records)
  assert schema.read_records(path) == rater_log.records
  assert sorted(p.name for p in tmp_path.iterdir()) == ["records.jsonl"]


def test_record_json_form_is_plain_json(rater_log):
  obj = schema.record_to_json(rater_log.records[0])
  assert schema.record_from_json(json.loads(json.dumps(obj))) == rater_log.records[0]


def _write_lines(path, lines):
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def test_read_records_reports_every_bad_line_with_path_line_and_field(rater_log, tmp_path):
  path = str(tmp_path / "records.jsonl")
  objs = [schema.record_to_json(r) for r in rater_log.records[:6]]
  del objs[2]["choice"]
  objs[3]["turn"] = "3"
  objs[4]["options"][1]["images"][0]["row"] = 1.5
  lines = [json.dumps(o) for o in objs]
  lines[1] = lines[1][:-10]  # Truncated JSON.
  _write_lines(path, lines)

  with pytest.raises(schema.RecordError) as info:
    schema.read_records(path)
  message = str(info.value)
  errors = message.splitlines()
  assert len(errors) == 4, message
  assert all(e.startswith(f"{path}: line ") for e in errors), message
  assert errors[0].startswith(f"{path}: line 2: ")
  assert errors[1] == f"{path}: line 3: field 'choice' is missing"
  assert errors[2].startswith(f"{path}: line 4: field 'turn': expected int")
  assert errors[3].startswith(f"{path}: line 5: field 'options[1].images[0].row': expected int")
  assert "line 1:" not in message and "line 6:" not in message


def test_read_records_skips_blank_lines(rater_log, tmp_path):
  path = str(tmp_path / "records.jsonl")
  _write_lines(
    path, [json.dumps(schema.record_to_json(r)) for r in rater_log.records[:2]] + ["", "  "]
  )
  assert schema.read_records(path) == rater_log.records[:2]


def test_read_records_rejects_a_bool_where_an_int_is_expected(rater_log, tmp_path):
  path = str(tmp_path / "records.jsonl")
  obj = schema.record_to_json(rater_log.records[0])
  obj["choice"] = True
  _write_lines(path, [json.dumps(obj)])
  with pytest.raises(schema.RecordError, match=r"line 1: field 'choice': expected int"):
    schema.read_records(path)


def test_read_records_caps_the_number_of_reported_errors(tmp_path):
  path = str(tmp_path / "records.jsonl")
  _write_lines(path, ["{}"] * (schema.MAX_REPORTED_ERRORS + 5))
  with pytest.raises(schema.RecordError) as info:
    schema.read_records(path)
  lines = str(info.value).splitlines()
  assert len(lines) == schema.MAX_REPORTED_ERRORS + 1
  assert lines[-1] == "... and 5 more"


def _record_json(**changes) -> dict:
  """The JSON form of a small valid session turn (2 options, 1 image each), with `changes`."""
  options = [
    {
      "text": f"prompt {j}",
      "category": "style",
      "text_row": j,
      "images": [{"ref": f"images/{j}.png", "row": j}],
    }
    for j in range(2)
  ]
  obj = {
    "kind": schema.SESSION_TURN,
    "user_id": "u0",
    "session_id": "s0",
    "turn": 0,
    "start_prompt": "p0",
    "options": options,
    "choice": 1,
    "user_type": 1,
    "start_text_row": -1,
  }
  obj.update(changes)
  return obj


def _with_option(j: int, **changes) -> dict:
  obj = _record_json()
  obj["options"][j].update(changes)
  return obj


def _with_image(**changes) -> dict:
  obj = _record_json()
  obj["options"][1]["images"][0].update(changes)
  return obj


def _line(obj: dict) -> bytes:
  return json.dumps(obj).encode()


_GOOD = _line(_record_json())
_DUPLICATED_CHOICE = _GOOD[:-1] + b', "choice": 0}'
_DUPLICATED_ROW = _GOOD.replace(b'"row": 1}', b'"row": 1, "row": 0}')

MALFORMED_JSONL = {
  "float start_text_row": ([_line(_record_json(start_text_row=2.0))], 1, "start_text_row"),
  "bool start_text_row": ([_GOOD, _line(_record_json(start_text_row=False))], 2, "start_text_row"),
  "bool image row": ([_line(_with_image(row=True))], 1, "options[1].images[0].row"),
  "float text_row": ([_line(_with_option(0, text_row=0.0))], 1, "options[0].text_row"),
  "bool user_type": ([_line(_record_json(user_type=True))], 1, "user_type"),
  "float user_type": ([_line(_record_json(user_type=1.0))], 1, "user_type"),
  "negative user_type": ([_line(_record_json(user_type=-1))], 1, "user_type"),
  "string user_type": ([_line(_record_json(user_type="1"))], 1, "user_type"),
  "unknown key": ([_line(_record_json(extra=1))], 1, "extra"),
  "unknown option key": ([_line(_with_option(1, colour="red"))], 1, "options[1].colour"),
  "unknown image key": ([_line(_with_image(width=64))], 1, "options[1].images[0].width"),
  "duplicated key": ([_GOOD, _GOOD, _DUPLICATED_CHOICE], 3, "choice"),
  "duplicated image key": ([_DUPLICATED_ROW], 1, "options[1].images[0].row"),
  "not an object": ([b"[1, 2]"], 1, "record"),
  "option not an object": ([_line(_record_json(options=[1, 2]))], 1, "options[0]"),
}


@pytest.mark.parametrize("lines, line, field", MALFORMED_JSONL.values(), ids=MALFORMED_JSONL.keys())
def test_read_records_names_file_line_and_field_of_a_malformed_record(tmp_path, lines, line, field):
  path = tmp_path / "records.jsonl"
  path.write_bytes(b"\n".join(lines) + b"\n")
  with pytest.raises(schema.RecordError) as info:
    schema.read_records(str(path))
  message = str(info.value)
  assert message.startswith(f"{path}: line {line}: field '{field}'"), message
  assert len(message.splitlines()) == 1, message


UNREADABLE_JSONL = {
  "empty": (b"", r"line 1: no records; the file is empty"),
  "blank lines": (
    b"\n  \n\t\n",
    r"line 3: no records; the file holds only blank lines \(lines 1\.\.3\)",
  ),
  "invalid utf-8": (
    _GOOD + b"\n" + _GOOD.replace(b"p0", b"p\xff") + b"\n",
    r"line 2: invalid UTF-8 at byte \d+ of the line",
  ),
  "deep nesting": (_GOOD + b"\n" + b"[" * 100_000 + b"\n", r"line 2: JSON nested too deeply"),
  "truncated": (_GOOD[:-5] + b"\n", r"line 1: Expecting"),
}


@pytest.mark.parametrize("content, problem", UNREADABLE_JSONL.values(), ids=UNREADABLE_JSONL.keys())
def test_read_records_names_file_and_line_of_an_unreadable_file(tmp_path, content, problem):
  path = tmp_path / "records.jsonl"
  path.write_bytes(content)
  with pytest.raises(schema.RecordError, match=rf"^{re.escape(str(path))}: {problem}"):
    schema.read_records(str(path))


def test_a_valid_record_json_reads_back(tmp_path):
  path = tmp_path / "records.jsonl"
  path.write_bytes(_GOOD + b"\n")
  (record,) = schema.read_records(str(path))
  assert record.user_type == 1 and record.start_text_row == -1
  assert record.options[1].images[0].row == 1


# Record validation.


def test_synthetic_records_are_valid(config, rater_log):
  schema.validate_records(rater_log.records, _spec(config), "synthetic", rater_log.table)


def test_record_spec_comes_from_the_interaction_config(config):
  spec = _spec(config)
  assert spec.categories == tuple(config.interaction.categories)
  assert spec.slate_size == config.interaction.slate_size
  assert spec.images_per_option == config.interaction.images_per_prompt


def test_choice_out_of_range_is_named(config, rater_log):
  bad = _replaced(rater_log.records, 7, choice=config.interaction.slate_size)
  _assert_names(_validation_error(config, bad), 7, "choice")


def test_negative_choice_is_named(config, rater_log):
  bad = _replaced(rater_log.records, 8, choice=-1)
  _assert_names(_validation_error(config, bad), 8, "choice")


@pytest.mark.parametrize("kept", [1, "L + 1"])
def test_a_slate_outside_2_to_l_options_is_named(config, rater_log, kept):
  record = rater_log.records[3]
  options = record.options[:1] if kept == 1 else record.options + record.options[:1]
  bad = _replaced(rater_log.records, 3, options=options, choice=0)
  message = _validation_error(config, bad)
  _assert_names(message, 3, "options")
  assert f"expected 2..{config.interaction.slate_size}" in message and "choice" not in message


@pytest.mark.parametrize("count", [0, "M + 1"])
def test_an_image_count_outside_1_to_m_is_named(config, rater_log, count):
  images = rater_log.records[6].options[2].images
  images = () if count == 0 else images + images[:1]
  bad = _replaced_option(rater_log.records, 6, 2, images=images)
  message = _validation_error(config, bad)
  _assert_names(message, 6, "options[2].images")
  assert f"expected 1..{config.interaction.images_per_prompt}" in message


def _ragged(records):
  """`records` with record 1's slate short of its last option and record 2's option 0 short of
  its last image (both valid: an unavailable option, an option rendered fewer times)."""
  ragged = _replaced(records, 1, options=records[1].options[:-1], choice=0)
  return _replaced_option(ragged, 2, 0, images=records[2].options[0].images[:-1])


def test_unavailable_options_and_fewer_images_are_valid_and_masked(config, rater_log):
  records = _ragged(rater_log.records)
  schema.validate_records(records, _spec(config), SOURCE, rater_log.table)
  batch, users = schema.to_choices(records, _spec(config))
  it = config.interaction
  assert batch.image_mask.shape == batch.image_rows.shape
  assert batch.image_rows.shape[2:] == (it.slate_size, it.images_per_prompt)
  u = users.ids.index(records[1].user_id)
  np.testing.assert_array_equal(
    batch.option_mask[u, 1], np.arange(it.slate_size) < it.slate_size - 1
  )
  assert not batch.image_mask[u, 1, -1].any() and batch.image_mask[u, 1, :-1].all()
  np.testing.assert_array_equal(
    batch.image_mask[u, 2, 0], np.arange(it.images_per_prompt) < it.images_per_prompt - 1
  )
  assert batch.image_mask[u, 2, 1:].all()
  np.testing.assert_array_equal(batch.image_rows[u, 2, 0, -1], 0)
  assert batch.image_mask.sum() == batch.option_mask.sum() * it.images_per_prompt - 1
  padded = schema.pad_users(batch, 128)
  assert padded.image_mask.shape[0] == 128 and not padded.image_mask[batch.num_users :].any()


def test_turns_out_of_order_are_named(config, rater_log):
  bad = list(rater_log.records)
  bad[1], bad[2] = bad[2], bad[1]  # Session user000000-s0 now has turns 0, 2, 1, 3, 4.
  message = _validation_error(config, bad)
  _assert_names(message, 1, "turn")
  assert rater_log.records[0].session_id in message


def test_a_missing_turn_is_named(config, rater_log):
  bad = list(rater_log.records)
  del bad[2]  # Session user000000-s0 now has turns 0, 1, 3, 4.
  message = _validation_error(config, bad)
  _assert_names(message, 2, "turn")
  assert "turn 3 where turn 2 was expected" in message


def test_a_duplicate_session_turn_is_named(config, rater_log):
  bad = _replaced(rater_log.records, 3, turn=2)  # Turns 0, 1, 2, 2, 4.
  message = _validation_error(config, bad)
  assert SOURCE in message and "field 'turn'" in message and "duplicate turn 2" in message, message
  assert re.search(r"record [23]\b", message), message  # One of the two records holding turn 2.


def test_a_session_shared_by_two_users_is_named(config, rater_log):
  record = rater_log.records[12]
  other_user = rater_log.records[0].user_id
  assert record.user_id != other_user and record.turn == 2
  bad = _replaced(rater_log.records, 12, user_id=other_user)
  message = _validation_error(config, bad)
  _assert_names(message, 12, "session_id")
  assert len(message.splitlines()) == 1, message


def test_an_unknown_category_is_named(config, rater_log):
  bad = _replaced_option(rater_log.records, 5, 1, category="lighting")
  message = _validation_error(config, bad)
  _assert_names(message, 5, "options[1].category")
  assert "'lighting'" in message


def test_an_image_row_outside_the_feature_table_is_named(config, rater_log):
  num_rows = rater_log.table.image.shape[0]
  option = rater_log.records[9].options[2]
  images = option.images[:3] + (dataclasses.replace(option.images[3], row=num_rows),)
  bad = _replaced_option(rater_log.records, 9, 2, images=images)
  message = _validation_error(config, bad, rater_log.table)
  _assert_names(message, 9, "options[2].images[3].row")
  # Without a table the rows cannot be checked.
  schema.validate_records(bad, _spec(config), SOURCE)


def test_a_text_row_outside_the_feature_table_is_named(config, rater_log):
  bad = _replaced_option(rater_log.records, 10, 0, text_row=-1)
  _assert_names(_validation_error(config, bad, rater_log.table), 10, "options[0].text_row")


def test_an_unknown_kind_is_named(config, rater_log):
  bad = _replaced(rater_log.records, 4, kind="pairwise")
  message = _validation_error(config, bad)
  _assert_names(message, 4, "kind")
  assert "'pairwise'" in message


def test_validation_reports_every_bad_record(config, rater_log):
  bad = _replaced(rater_log.records, 7, choice=99)
  bad = _replaced(bad, 4, kind="pairwise")
  bad = _replaced_option(bad, 5, 1, category="lighting")
  message = _validation_error(config, bad)
  assert len(message.splitlines()) == 3, message
  _assert_names(message, 4, "kind")
  _assert_names(message, 5, "options[1].category")
  _assert_names(message, 7, "choice")


SMALL_SPEC = schema.RecordSpec(
  categories=("style",), slate_size=2, images_per_option=1, num_types=3
)


def _small_record(**changes) -> schema.ChoiceRecord:
  return dataclasses.replace(schema.record_from_json(_record_json()), **changes)


def _small_validation_error(records, spec=SMALL_SPEC, **kwargs) -> str:
  with pytest.raises(schema.RecordError) as info:
    schema.validate_records(records, spec, SOURCE, **kwargs)
  return str(info.value)


def test_the_record_spec_knows_the_planted_type_count_on_synthetic_data(config):
  assert _spec(config).num_types == config.world.num_types
  assert schema.RecordSpec.from_config(config, num_types=7).num_types == 7
  real = config.copy_and_resolve_references()
  real.data.source = "pasta_kaggle"
  assert schema.RecordSpec.from_config(real).num_types is None


@pytest.mark.parametrize("user_type", [3, -1])
def test_a_user_type_out_of_range_is_named(user_type):
  records = [_small_record(), _small_record(session_id="s1", user_id="u1", user_type=user_type)]
  message = _small_validation_error(records)
  _assert_names(message, 1, "user_type")
  assert "0..2" in message, message


def test_null_user_types_are_valid_and_any_type_is_valid_without_a_type_count():
  records = [
    _small_record(user_type=None),
    _small_record(user_id="u1", session_id="s1", user_type=9),
  ]
  with pytest.raises(schema.RecordError):
    schema.validate_records(records, SMALL_SPEC, SOURCE)
  schema.validate_records(records, dataclasses.replace(SMALL_SPEC, num_types=None), SOURCE)


@pytest.mark.parametrize("other_type", [2, None])
def test_a_user_with_two_types_is_named(other_type):
  records = [_small_record(), _small_record(session_id="s1", user_type=other_type)]
  message = _small_validation_error(records)
  _assert_names(message, 1, "user_type")
  assert "at record 0" in message, message


def test_a_preference_in_session_data_needs_allow_preferences():
  option = schema.Option("a", schema.PREFERENCE_CATEGORY, -1, (schema.Image("x.png", -1),))
  preference = _small_record(
    kind=schema.PREFERENCE, session_id="p", options=(option, option), choice=0
  )
  records = [_small_record(), preference]
  message = _small_validation_error(records)
  _assert_names(message, 1, "kind")
  assert "allow_preferences" in message, message
  schema.validate_records(records, SMALL_SPEC, SOURCE, allow_preferences=True)
  preference_spec = schema.RecordSpec(categories=(), slate_size=2, images_per_option=1)
  schema.validate_records([preference], preference_spec, SOURCE)
  _assert_names(_small_validation_error(records, preference_spec), 0, "kind")


def _options(text_row: int, image_row: int) -> tuple[schema.Option, ...]:
  return (schema.Option("a", "style", text_row, (schema.Image("x.png", image_row),)),) * 2


@pytest.mark.parametrize(
  "field, changes",
  [
    ("start_text_row", {"start_text_row": -2}),
    ("options[0].text_row", {"options": _options(-5, 0)}),
    ("options[1].images[0].row", {"options": _options(0, -2)}),
  ],
)
def test_a_negative_row_other_than_unembedded_is_named_without_a_table(field, changes):
  _assert_names(_small_validation_error([_small_record(**changes)]), 0, field)


# Feature tables.


def _table_copy(table) -> types.FeatureTable:
  return types.FeatureTable(image=np.array(table.image), text=np.array(table.text))


def test_synthetic_features_are_valid(config, rater_log):
  schema.validate_features(rater_log.table, config.world.feature_dim, "features")


def test_nan_in_the_image_table_names_row_and_column(config, rater_log):
  table = _table_copy(rater_log.table)
  table.image[7, 3] = np.nan
  with pytest.raises(schema.RecordError) as info:
    schema.validate_features(table, config.world.feature_dim, "features.npz")
  message = str(info.value)
  assert "features.npz" in message and "field 'image'" in message, message
  assert "row 7" in message and "column 3" in message, message


def test_wrong_feature_width_is_named(config, rater_log):
  dim = config.world.feature_dim
  table = types.FeatureTable(
    image=np.zeros((4, dim + 1), np.float32), text=np.asarray(rater_log.table.text)
  )
  with pytest.raises(schema.RecordError) as info:
    schema.validate_features(table, dim, "features.npz")
  message = str(info.value)
  assert (
    "features.npz" in message and "field 'image'" in message and f"(4, {dim + 1})" in message
  ), message
  assert "field 'text'" not in message


def test_save_then_load_features_round_trips(config, rater_log, tmp_path):
  path = str(tmp_path / "features.npz")
  schema.save_features(path, rater_log.table)
  table = schema.load_features(path, config.world.feature_dim)
  np.testing.assert_array_equal(table.image, rater_log.table.image)
  np.testing.assert_array_equal(table.text, rater_log.table.text)
  assert table.image.dtype == np.float32 and table.text.dtype == np.float32


def test_load_features_rejects_the_wrong_width(config, rater_log, tmp_path):
  path = str(tmp_path / "features.npz")
  schema.save_features(path, rater_log.table)
  with pytest.raises(schema.RecordError) as info:
    schema.load_features(path, config.world.feature_dim + 1)
  message = str(info.value)
  assert path in message and "array 'image'" in message and "array 'text'" in message, message


def test_load_features_rejects_nan(config, rater_log, tmp_path):
  path = str(tmp_path / "features.npz")
  table = _table_copy(rater_log.table)
  table.text[2, 5] = np.inf
  schema.save_features(path, table)
  with pytest.raises(schema.RecordError) as info:
    schema.load_features(path, config.world.feature_dim)
  message = str(info.value)
  assert path in message and "array 'text'" in message, message
  assert "row 2" in message and "column 5" in message, message


def test_load_features_names_a_missing_array(config, rater_log, tmp_path):
  path = str(tmp_path / "features.npz")
  np.savez(path, image=np.asarray(rater_log.table.image))
  with pytest.raises(schema.RecordError) as info:
    schema.load_features(path, config.world.feature_dim)
  message = str(info.value)
  assert path in message and "'text'" in message, message


@pytest.mark.parametrize(
  "image, text, problem",
  [
    (np.array([["a"] * 4]), np.zeros((1, 4)), r"array 'image' holds strings"),
    (np.zeros((1, 4)), np.zeros((1, 4), np.complex64), r"array 'text' holds complex"),
    (np.zeros((1, 4)), np.zeros((1, 4), np.int32), r"array 'text' holds signed"),
    (np.array([None, 1.0], object), np.zeros((1, 4)), r"array 'image' cannot be read"),
    (np.zeros((1, 4)), np.full((2, 4), 1e300), r"field 'text': 8 non-finite values"),
  ],
  ids=["strings", "complex", "integers", "objects", "float32-overflow"],
)
def test_load_features_names_the_file_and_the_array(tmp_path, image, text, problem):
  path = str(tmp_path / "features.npz")
  np.savez(path, image=image, text=text)
  with pytest.raises(schema.RecordError, match=rf"^{re.escape(path)}: .*{problem}"):
    schema.load_features(path, 4)


def test_load_features_names_a_truncated_file_and_the_remedy(config, rater_log, tmp_path):
  path = tmp_path / "features.npz"
  schema.save_features(str(path), rater_log.table)
  path.write_bytes(path.read_bytes()[:1000])
  expected = rf"^{re.escape(str(path))}: cannot be read as \.npz .*; re-run the data stage$"
  with pytest.raises(schema.RecordError, match=expected):
    schema.load_features(str(path), config.world.feature_dim, "re-run the data stage")


# Padded choices.


def test_to_choices_shapes_and_masks(config, rater_log, choices):
  batch, users = choices
  it = config.interaction
  num_users, turns = config.world.num_users, config.world.sessions_per_user * it.turns
  assert batch.image_rows.shape == (num_users, turns, it.slate_size, it.images_per_prompt)
  assert (
    batch.text_rows.shape
    == batch.category.shape
    == batch.option_mask.shape
    == (num_users, turns, it.slate_size)
  )
  assert batch.choice.shape == batch.turn_mask.shape == (num_users, turns)
  assert batch.option_mask.all() and batch.turn_mask.all() and batch.image_mask.all()
  assert batch.image_mask.shape == batch.image_rows.shape
  np.testing.assert_array_equal(batch.user_index, np.arange(num_users))
  assert len(users.ids) == num_users == len(set(users.ids))
  np.testing.assert_array_equal(users.types, rater_log.user_types)


def test_to_choices_holds_each_users_records_in_file_order(config, rater_log, choices):
  batch, users = choices
  by_user = {}
  for r in rater_log.records:
    by_user.setdefault(r.user_id, []).append(r)
  categories = list(config.interaction.categories)
  for u, user_id in enumerate(users.ids):
    records = by_user[user_id]
    np.testing.assert_array_equal(batch.choice[u], [r.choice for r in records])
    np.testing.assert_array_equal(
      batch.image_rows[u], [[[im.row for im in o.images] for o in r.options] for r in records]
    )
    np.testing.assert_array_equal(
      batch.text_rows[u], [[o.text_row for o in r.options] for r in records]
    )
    np.testing.assert_array_equal(
      batch.category[u], [[categories.index(o.category) for o in r.options] for r in records]
    )


def test_to_choices_pads_short_users_and_follows_the_given_user_order(config, rater_log):
  records = rater_log.records
  turns = config.interaction.turns
  short = records[turns : 2 * turns]  # User 0's second session only.
  others = [r for r in records if r.user_id != records[0].user_id]
  ids = [records[0].user_id, others[0].user_id]
  batch, users = schema.to_choices(short + others, _spec(config), ids)
  assert users.ids == tuple(ids)
  full = config.world.sessions_per_user * turns
  assert batch.choice.shape == (2, full)
  np.testing.assert_array_equal(batch.turn_mask[0], np.arange(full) < turns)
  assert batch.turn_mask[1].all()
  assert not batch.option_mask[0, turns:].any() and batch.option_mask[0, :turns].all()
  np.testing.assert_array_equal(batch.choice[0, :turns], [r.choice for r in short])
  np.testing.assert_array_equal(batch.choice[0, turns:], 0)


def test_pad_users_appends_masked_users(choices):
  batch, _ = choices
  num_users = batch.num_users
  padded = schema.pad_users(batch, 48)
  assert padded.num_users == 96 and padded.num_users % 48 == 0
  np.testing.assert_array_equal(padded.user_index[:num_users], batch.user_index)
  np.testing.assert_array_equal(padded.user_index[num_users:], -1)
  np.testing.assert_array_equal(np.asarray(padded.user_mask), np.arange(96) < num_users)
  assert not padded.turn_mask[num_users:].any() and not padded.option_mask[num_users:].any()
  np.testing.assert_array_equal(padded.choice[:num_users], batch.choice)
  np.testing.assert_array_equal(padded.image_rows[:num_users], batch.image_rows)
  assert padded.image_rows.shape[1:] == batch.image_rows.shape[1:]
  assert int(padded.num_choices()) == int(batch.num_choices())


def test_pad_users_leaves_a_multiple_alone(choices):
  batch, _ = choices
  assert schema.pad_users(batch, 8) is batch


def test_pad_users_of_a_few_users(config, rater_log):
  batch, _ = schema.to_choices(rater_log.records[: 3 * 10], _spec(config))
  assert batch.num_users == 3
  padded = schema.pad_users(batch, 8)
  assert padded.num_users == 8
  np.testing.assert_array_equal(padded.user_index, [0, 1, 2, -1, -1, -1, -1, -1])


def test_a_preference_record_validates_and_pads(config, rater_log):
  prefs = [
    _preference(rater_log.records[0], "pref-0"),
    dataclasses.replace(_preference(rater_log.records[1], "pref-1"), user_id="rater-b"),
  ]
  spec = _spec(config)
  schema.validate_records(prefs, spec, "prefs.jsonl", rater_log.table, allow_preferences=True)
  batch, users = schema.to_choices(prefs, spec)
  assert users.ids == (rater_log.records[0].user_id, "rater-b")
  assert batch.image_rows.shape == (2, 1, 2, 1)
  preference_category_index = len(spec.categories)
  np.testing.assert_array_equal(batch.category, preference_category_index)
  np.testing.assert_array_equal(batch.choice[:, 0], [p.choice for p in prefs])
  assert batch.option_mask.all() and batch.turn_mask.all()


def test_a_preference_round_trips_through_json_lines(rater_log, tmp_path):
  path = str(tmp_path / "prefs.jsonl")
  prefs = [_preference(rater_log.records[0], "pref-0")]
  schema.write_records(path, prefs)
  assert schema.read_records(path) == prefs


def test_a_preference_with_a_session_category_is_rejected(config, rater_log):
  pref = _preference(rater_log.records[0], "pref-0")
  bad = _replaced_option([pref], 0, 1, category=config.interaction.categories[0])
  with pytest.raises(
    schema.RecordError, match=r"prefs.jsonl: record 0 .*field 'options\[1\].category'"
  ):
    schema.validate_records(bad, _spec(config), "prefs.jsonl", allow_preferences=True)


def test_a_preference_with_one_option_is_rejected(config, rater_log):
  pref = _preference(rater_log.records[0], "pref-0")
  bad = [dataclasses.replace(pref, options=pref.options[:1], choice=0)]
  with pytest.raises(schema.RecordError, match=r"prefs.jsonl: record 0 .*field 'options'"):
    schema.validate_records(bad, _spec(config), "prefs.jsonl", allow_preferences=True)


def test_a_batch_mixing_image_counts_pads_and_masks_the_images(config, rater_log):
  turns = config.interaction.turns
  mixed = list(rater_log.records[:turns]) + [_preference(rater_log.records[0], "pref-0")]
  schema.validate_records(
    mixed, _spec(config), "mixed.jsonl", rater_log.table, allow_preferences=True
  )
  batch, _ = schema.to_choices(mixed, _spec(config))
  assert batch.image_mask[0, :turns].all()
  np.testing.assert_array_equal(batch.image_mask[0, turns, :2], [[True] + [False] * 3] * 2)
  assert not batch.image_mask[0, turns, 2:].any()
