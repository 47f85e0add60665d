"""The PASTA release loader on a fixture written in the assumed layout: records, errors, summary, export, CLI."""

import csv
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pasta_jax import files
from pasta_jax.config_checks import ConfigError
from pasta_jax.data import pasta_kaggle, schema

LAYOUT = pasta_kaggle.KAGGLE_LAYOUT
CATEGORIES = [release for release, _ in LAYOUT.categories]
TRAJECTORIES = (
  ("rater-a", "traj-0", None),
  ("rater-a", "traj-1", None),
  ("rater-b", "traj-2", None),
  ("sim-0", "sim-traj-0", 2),
  ("sim-1", "sim-traj-1", 0),
)


def _prompt(session: str, turn: int, j: int) -> str:
  return f'{session} t{turn} p{j}: a "red" fox, in snow'


def _rows(session_index: int, user: str, session: str, user_type: int | None) -> list[dict]:
  """The release rows of one trajectory (the fixture's ground truth, written independently of the exporter)."""
  rows = []
  for t in range(LAYOUT.turns):
    row = {
      "rater_id": user,
      "trajectory_id": session,
      "turn_index": str(t),
      "initial_prompt": f"{session} start\nwith a second line",
      "selected_index": str((session_index + t) % 4),
    }
    for j in range(LAYOUT.slate_size):
      row[f"prompt_{j}"] = _prompt(session, t, j)
      row[f"category_{j}"] = CATEGORIES[(t + j) % len(CATEGORIES)]
      for m in range(LAYOUT.images_per_prompt):
        row[f"image_{j}_{m}"] = f"images/{session}/{t}_{j}_{m}.png"
    if user_type is not None:
      row["user_type"] = str(user_type)
    rows.append(row)
  return rows


def write_release(directory, edit=None) -> dict[str, list[dict]]:
  """Writes the fixture release (CSV files and PNGs); `edit(file_name, rows)` may change rows first."""
  files = {LAYOUT.human_file: [], LAYOUT.simulated_file: []}
  for i, (user, session, user_type) in enumerate(TRAJECTORIES):
    name = LAYOUT.human_file if user_type is None else LAYOUT.simulated_file
    files[name] += _rows(i, user, session, user_type)
  for name, rows in files.items():
    if edit is not None:
      edit(name, rows)
    header = list(rows[0]) if rows else []
    with open(os.path.join(directory, name), "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=header)
      writer.writeheader()
      writer.writerows(rows)
    for row in rows:
      for key, ref in row.items():
        if key.startswith("image_") and ref:
          os.makedirs(os.path.dirname(os.path.join(directory, ref)), exist_ok=True)
          Image.new("RGB", (2, 2), (len(ref) % 256, 0, 0)).save(os.path.join(directory, ref))
  return files


def _expected(files: dict[str, list[dict]]) -> list[schema.ChoiceRecord]:
  categories = dict(LAYOUT.categories)
  records = []
  for name in (LAYOUT.human_file, LAYOUT.simulated_file):
    start = {}
    for row in files[name]:
      options = tuple(
        schema.Option(
          text=row[f"prompt_{j}"],
          category=categories[row[f"category_{j}"]],
          text_row=-1,
          images=tuple(schema.Image(ref=row[f"image_{j}_{m}"], row=-1) for m in range(4)),
        )
        for j in range(4)
      )
      turn, choice = int(row["turn_index"]), int(row["selected_index"])
      session = row["trajectory_id"]
      records.append(
        schema.ChoiceRecord(
          kind=schema.SESSION_TURN,
          user_id=row["rater_id"],
          session_id=session,
          turn=turn,
          start_prompt=row["initial_prompt"] if turn == 0 else start[session],
          options=options,
          choice=choice,
          user_type=int(row["user_type"]) if "user_type" in row else None,
          start_text_row=-1,
        )
      )
      start[session] = options[choice].text
  return records


@pytest.fixture
def release(tmp_path):
  directory = tmp_path / "release"
  directory.mkdir()
  return str(directory), write_release(str(directory))


def _load_error(directory, edit) -> str:
  write_release(directory, edit)
  with pytest.raises(schema.RecordError) as info:
    pasta_kaggle.load(directory, show_progress=False)
  return str(info.value)


def _assert_names(message: str, file_name: str, row: int, column: str) -> None:
  assert file_name in message, message
  assert re.search(rf"row {row}\b", message), message
  assert f"column '{column}'" in message, message


# Loading.


def test_the_fixture_loads_as_the_expected_records(release):
  directory, files = release
  records = pasta_kaggle.load(directory, show_progress=False)
  assert records == _expected(files)
  assert [r.user_type for r in records[-5:]] == [0] * 5
  assert records[1].start_prompt == records[0].options[records[0].choice].text
  assert all(
    im.row == pasta_kaggle.UNEMBEDDED for r in records for o in r.options for im in o.images
  )


def test_the_loaded_records_are_valid_canonical_records(release, config):
  records = pasta_kaggle.load(release[0], show_progress=False)
  schema.validate_records(records, schema.RecordSpec.from_config(config), "release")
  assert LAYOUT.spec() == dataclasses.replace(schema.RecordSpec.from_config(config), num_types=None)


def test_summary_counts_users_sessions_turns_and_choices(release):
  summary = pasta_kaggle.summarize(pasta_kaggle.load(release[0], show_progress=False))
  assert (summary.users, summary.sessions, summary.turns, summary.simulated_turns) == (4, 5, 25, 10)
  expected = [0] * 4
  for i in range(len(TRAJECTORIES)):
    for t in range(5):
      expected[(i + t) % 4] += 1
  assert summary.choices == tuple(expected) and sum(summary.choices) == 25


def test_a_release_with_only_the_human_file_loads(release):
  directory, files = release
  os.remove(os.path.join(directory, LAYOUT.simulated_file))
  assert pasta_kaggle.load(directory, show_progress=False) == _expected(files)[:15]


# Bad input.


def test_no_release_file_names_the_expected_files(tmp_path):
  with pytest.raises(schema.RecordError) as info:
    pasta_kaggle.load(str(tmp_path), show_progress=False)
  assert LAYOUT.human_file in str(info.value) and LAYOUT.simulated_file in str(info.value)


def test_a_missing_column_is_named_with_the_columns_found(tmp_path):
  def edit(name, rows):
    for row in rows:
      del row["selected_index"]

  message = _load_error(str(tmp_path), edit)
  assert LAYOUT.human_file in message and "row 0 (header)" in message, message
  assert "missing columns ['selected_index']" in message and "unknown columns []" in message, (
    message
  )
  assert "found columns ['rater_id', 'trajectory_id'" in message, message


def test_an_unknown_column_is_named_with_the_columns_found(tmp_path):
  def edit(name, rows):
    if name == LAYOUT.simulated_file:
      for row in rows:
        row["seed"] = "7"

  message = _load_error(str(tmp_path), edit)
  assert LAYOUT.simulated_file in message and "unknown columns ['seed']" in message, message
  assert "missing columns []" in message and "'user_type', 'seed']" in message, message


def test_a_user_type_column_in_the_human_file_is_unknown(tmp_path):
  def edit(name, rows):
    for row in rows:
      row.setdefault("user_type", "1")

  message = _load_error(str(tmp_path), edit)
  assert LAYOUT.human_file in message and "unknown columns ['user_type']" in message, message


@pytest.mark.parametrize(
  "file_name, row, column, value, expected",
  [
    (LAYOUT.human_file, 7, "selected_index", "4", ("field 'choice'", "out of range 0..3")),
    (LAYOUT.simulated_file, 3, "turn_index", "three", ("field 'turn'",)),
    (LAYOUT.human_file, 4, "category_2", "lighting", ("field 'options[2].category'", "'lighting'")),
    (LAYOUT.human_file, 3, "initial_prompt", "another start", ("differs from", "row 0")),
    (LAYOUT.simulated_file, 2, "user_type", "2147483648", ("field 'user_type'", "0..2147483647")),
    (LAYOUT.simulated_file, 6, "user_type", "9" * 30, ("field 'user_type'", "out of range")),
    (LAYOUT.simulated_file, 1, "user_type", "-1", ("field 'user_type'", "not a non-negative")),
    (LAYOUT.simulated_file, 1, "user_type", "1.0", ("field 'user_type'", "not a non-negative")),
    (LAYOUT.human_file, 2, "turn_index", "\u0662", ("field 'turn'", "not a non-negative")),
  ],
)
def test_a_bad_cell_is_named_by_file_row_and_column(
  tmp_path, file_name, row, column, value, expected
):
  def edit(name, rows):
    if name == file_name:
      rows[row][column] = value

  message = _load_error(str(tmp_path), edit)
  _assert_names(message, file_name, row, column)
  for text in expected:
    assert text in message, message


@pytest.mark.parametrize("file_name", [LAYOUT.human_file, LAYOUT.simulated_file])
def test_a_header_only_file_is_named(tmp_path, file_name):
  write_release(str(tmp_path))
  path = tmp_path / file_name
  path.write_text(path.read_text().splitlines()[0] + "\n")
  expected = rf"^{re.escape(str(path))}: row 0 \(line 2\): no rows"
  with pytest.raises(schema.RecordError, match=expected):
    pasta_kaggle.load(str(tmp_path), show_progress=False)


def test_a_trajectory_in_both_files_is_named_by_file_and_row(tmp_path):
  def edit(name, rows):
    if name == LAYOUT.simulated_file:
      for row in rows[5:]:
        row["trajectory_id"], row["rater_id"] = "traj-1", "rater-a"

  message = _load_error(str(tmp_path), edit)
  _assert_names(message, LAYOUT.simulated_file, 5, "trajectory_id")
  assert f"'traj-1' is also in {tmp_path / LAYOUT.human_file} (row 5)" in message, message
  assert len(message.splitlines()) == 1, message


def test_a_missing_turn_is_named(tmp_path):
  def edit(name, rows):
    if name == LAYOUT.human_file:
      del rows[7]  # traj-1 loses turn 2.

  message = _load_error(str(tmp_path), edit)
  _assert_names(message, LAYOUT.human_file, 7, "turn_index")
  assert "'traj-1' has turns [0, 1, 3, 4]" in message, message


def test_turns_out_of_order_are_named(tmp_path):
  def edit(name, rows):
    if name == LAYOUT.human_file:
      rows[1], rows[2] = rows[2], rows[1]

  message = _load_error(str(tmp_path), edit)
  _assert_names(message, LAYOUT.human_file, 1, "turn_index")
  assert "[0, 2, 1, 3, 4]" in message, message


def test_an_extra_turn_is_named(tmp_path):
  def edit(name, rows):
    if name == LAYOUT.human_file:
      rows.insert(5, dict(rows[4]))

  message = _load_error(str(tmp_path), edit)
  assert "'traj-0' has turns [0, 1, 2, 3, 4, 4]" in message, message


def test_an_empty_image_cell_and_a_missing_image_file_are_named(tmp_path):
  def edit(name, rows):
    if name == LAYOUT.human_file:
      rows[2]["image_1_3"] = ""
      rows[6]["image_3_0"] = "images/nowhere.png"

  write_release(str(tmp_path), edit)
  os.remove(os.path.join(str(tmp_path), "images/nowhere.png"))
  with pytest.raises(schema.RecordError) as info:
    pasta_kaggle.load(str(tmp_path), show_progress=False)
  first, second = str(info.value).splitlines()
  _assert_names(first, LAYOUT.human_file, 2, "image_1_3")
  assert "field 'options[1].images[3].ref'" in first and "empty" in first
  _assert_names(second, LAYOUT.human_file, 6, "image_3_0")
  assert "not found" in second


def test_image_files_are_not_checked_when_asked(tmp_path):
  def edit(name, rows):
    rows[0]["image_0_0"] = "images/elsewhere.png"

  write_release(str(tmp_path), edit)
  os.remove(os.path.join(str(tmp_path), "images/elsewhere.png"))
  records = pasta_kaggle.load(str(tmp_path), check_images=False, show_progress=False)
  assert records[0].options[0].images[0].ref == "images/elsewhere.png"


def test_a_ragged_csv_names_the_file(release):
  directory, _ = release
  with open(os.path.join(directory, LAYOUT.human_file), "a") as f:
    f.write("rater-z,traj-z\n")
  with pytest.raises(schema.RecordError, match=re.escape(LAYOUT.human_file)):
    pasta_kaggle.load(directory, show_progress=False)


def test_every_bad_row_is_reported(tmp_path):
  def edit(name, rows):
    if name == LAYOUT.human_file:
      rows[0]["selected_index"] = "9"
      rows[11]["category_0"] = "?"

  assert len(_load_error(str(tmp_path), edit).splitlines()) == 2


# Export.


def test_load_export_load_round_trips(release, tmp_path):
  directory, _ = release
  records = pasta_kaggle.load(directory, show_progress=False)
  out = str(tmp_path / "exported")
  written = pasta_kaggle.export(records, out, image_root=directory)
  assert sorted(os.path.basename(p) for p in written.values()) == sorted(
    [LAYOUT.human_file, LAYOUT.simulated_file]
  )
  assert pasta_kaggle.load(out, show_progress=False) == records
  with open(os.path.join(directory, LAYOUT.human_file)) as a, open(written[False]) as b:
    assert list(csv.DictReader(a)) == list(csv.DictReader(b))


def test_the_export_carries_the_cc_by_sa_licence(release, tmp_path):
  out = str(tmp_path / "exported")
  pasta_kaggle.export(pasta_kaggle.load(release[0], show_progress=False), out)
  with open(os.path.join(out, pasta_kaggle.LICENSE_FILE)) as f:
    text = f.read()
  assert "CC BY-SA 4.0" in text and "Attribution-ShareAlike 4.0 International" in text
  assert "Google" in text and "googleai/pasta-data" in text


def _unembedded(record: schema.ChoiceRecord) -> schema.ChoiceRecord:
  options = tuple(
    dataclasses.replace(
      o, text_row=-1, images=tuple(dataclasses.replace(im, row=-1) for im in o.images)
    )
    for o in record.options
  )
  return dataclasses.replace(record, options=options, start_text_row=-1)


def test_simulated_trajectories_export_to_the_simulated_file(rater_log, tmp_path):
  records = rater_log.records[:20]
  written = pasta_kaggle.export(records, str(tmp_path))
  assert list(written) == [True]
  loaded = pasta_kaggle.load(str(tmp_path), show_progress=False)
  assert loaded == [_unembedded(r) for r in records]
  assert {r.user_type for r in loaded} == {r.user_type for r in records}


def test_export_rejects_records_the_layout_cannot_hold(rater_log, tmp_path):
  records = list(rater_log.records[:10])
  records[3] = dataclasses.replace(records[3], start_prompt="a prompt nobody chose")
  with pytest.raises(schema.RecordError) as info:
    pasta_kaggle.export(records[:9], str(tmp_path))
  message = str(info.value)
  assert "record 3" in message and "field 'start_prompt'" in message, message
  assert f"session {records[5].session_id!r}: field 'turn': 4 turns" in message, message
  assert not os.listdir(tmp_path)


# CLI.


def test_the_cli_writes_records_manifest_and_licence(release, tmp_path):
  directory, _ = release
  out = str(tmp_path / "converted")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pasta_jax.data.pasta_kaggle",
      f"--input={directory}",
      f"--output={out}",
    ],
    capture_output=True,
    text=True,
    check=False,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr
  assert schema.read_records(os.path.join(out, "records.jsonl")) == pasta_kaggle.load(
    directory, show_progress=False
  )
  with open(os.path.join(out, "data_manifest.json")) as f:
    manifest = json.load(f)
  for name in (LAYOUT.human_file, LAYOUT.simulated_file):
    with open(os.path.join(directory, name), "rb") as f:
      assert manifest["inputs"][name]["sha256"] == hashlib.sha256(f.read()).hexdigest()
  assert manifest["records"]["count"] == 25 and manifest["licence"] == "CC BY-SA 4.0"
  assert manifest["summary"]["sessions"] == 5 and manifest["unembedded_row"] == -1
  assert os.path.isfile(os.path.join(out, "LICENSE"))
  assert json.loads(result.stdout.strip().splitlines()[-1])["turns"] == 25
  progress_bar = rf"reading {re.escape(LAYOUT.human_file)}: +0%\|.*\| 0/15 "
  assert re.search(progress_bar, result.stderr)


def test_the_cli_reports_bad_input_as_a_usage_error(tmp_path):
  def edit(name, rows):
    rows[0]["selected_index"] = "7"

  write_release(str(tmp_path), edit)
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pasta_jax.data.pasta_kaggle",
      f"--input={tmp_path}",
      f"--output={tmp_path / 'out'}",
    ],
    capture_output=True,
    text=True,
    check=False,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode != 0
  assert "row 0: column 'selected_index'" in result.stderr, result.stderr


# Layout mappings and the inspector.

RENAMED = {
  "rater_id": "RaterID",
  "trajectory_id": "session",
  "turn_index": "Turn Index",
  "selected_index": "chosen",
}


def _renamed(column: str) -> str:
  if column.startswith("image_"):
    return column.replace("image_", "img_")
  if column.startswith("prompt_"):
    return column.replace("prompt_", "Prompt-")
  return RENAMED.get(column, column)


def _typed(value: str):
  return int(value) if value.isdigit() else value


def write_variant(directory: str, human: str, simulated: str, rename=_renamed) -> None:
  """The fixture release with renamed columns, an extra column and typed numbers, its tables written
  as `human` and `simulated` (file names whose extensions pick CSV, Parquet, JSON or JSON Lines)."""
  tables = write_release(directory)
  for name, target in ((LAYOUT.human_file, human), (LAYOUT.simulated_file, simulated)):
    os.remove(os.path.join(directory, name))
    rows = [
      {rename(k): v for k, v in row.items()} | {"timestamp": "2024-05-01"} for row in tables[name]
    ]
    if target.endswith(".csv"):
      pasta_kaggle.write_table(os.path.join(directory, target), list(rows[0]), rows)
      continue
    typed = [{k: _typed(v) for k, v in row.items()} for row in rows]
    path = os.path.join(directory, target)
    if target.endswith(".parquet"):
      pq.write_table(pa.Table.from_pylist(typed), path)
    elif target.endswith(".jsonl"):
      with open(path, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in typed)
    else:
      with open(path, "w") as f:
        json.dump(typed, f)


@pytest.mark.parametrize(
  "human, simulated",
  [
    ("pasta_rater_data.csv", "pasta_simulated_data.csv"),
    ("pasta_rater_data.parquet", "Pasta Simulated Data.parquet"),
    ("rater_trajectories.json", "simulated_trajectories.jsonl"),
  ],
  ids=["csv", "parquet", "json"],
)
def test_the_inspector_maps_renamed_columns_and_its_mapping_loads_the_same_records(
  release, tmp_path, human, simulated
):
  expected = pasta_kaggle.load(release[0], show_progress=False)
  directory = str(tmp_path / "variant")
  os.makedirs(directory)
  write_variant(directory, human, simulated)
  inspection = pasta_kaggle.inspect(directory)
  found = {m.field: (m.value, m.how) for m in inspection.matches}
  assert found["human_file"][0] == human and found["simulated_file"][0] == simulated
  assert found["user_id"] == ("RaterID", "case/separators")
  assert found["session_id"] == ("session", "synonym")
  assert found["turn"] == ("Turn Index", "case/separators")
  assert found["choice"] == ("chosen", "synonym")
  assert found["image"] == ("img_{j}_{m}", "synonym")
  assert found["prompt"] == ("Prompt-{j}", "case/separators")
  assert found["category"] == ("category_{j}", "exact")
  assert inspection.mapping["ignored"] == ["timestamp"]
  text = pasta_kaggle.format_inspection(inspection)
  assert "not mapped: []" in text and "RaterID: " in text and "'rater-a'" in text, text
  mapping = str(tmp_path / "mapping.json")
  files.write_json(mapping, inspection.mapping)
  layout = pasta_kaggle.read_layout(mapping)
  assert pasta_kaggle.load(directory, layout, show_progress=False) == expected


def test_the_inspector_names_an_unmapped_field_with_candidates(tmp_path):
  directory = str(tmp_path)
  write_variant(
    directory,
    LAYOUT.human_file,
    "sim.parquet",
    lambda c: {"selected_index": "winner_pos"}.get(c, c),
  )
  inspection = pasta_kaggle.inspect(directory)
  (choice,) = [m for m in inspection.matches if m.field == "choice"]
  assert choice.value is None and choice.how == "unmapped"
  assert "winner_pos" in inspection.mapping["ignored"]
  text = pasta_kaggle.format_inspection(inspection)
  assert "choice: UNMAPPED" in text and "'choice'" in text.splitlines()[-1], text
  files.write_json(str(tmp_path / "mapping.json"), inspection.mapping)
  with pytest.raises(ConfigError, match=r"mapping\.json: field 'choice': None"):
    pasta_kaggle.read_layout(str(tmp_path / "mapping.json"))


def test_the_inspector_maps_category_values_and_names_unknown_ones(tmp_path):
  def edit(name, rows):
    for row in rows:
      for j in range(LAYOUT.slate_size):
        row[f"category_{j}"] = {"subject change": "Subject_Change", "creative": "wild"}.get(
          row[f"category_{j}"], row[f"category_{j}"]
        )

  write_release(str(tmp_path), edit)
  inspection = pasta_kaggle.inspect(str(tmp_path))
  assert inspection.mapping["categories"]["Subject_Change"] == "subject_change"
  assert inspection.mapping["categories"]["wild"] is None
  assert inspection.unmapped_categories == ("wild",)


def _layout_error(tmp_path, **changes) -> str:
  obj = pasta_kaggle.layout_to_json(LAYOUT) | changes
  obj = {k: v for k, v in obj.items() if v is not ...}
  path = str(tmp_path / "layout.json")
  files.write_json(path, obj)
  with pytest.raises(ConfigError) as info:
    pasta_kaggle.read_layout(path)
  assert str(info.value).startswith(path), info.value
  return str(info.value)


@pytest.mark.parametrize(
  "changes, expected",
  [
    ({"seed_column": "seed"}, "field 'seed_column': unknown layout field"),
    ({"choice": ...}, "field 'choice': missing (required)"),
    ({"turns": "5"}, "field 'turns': '5': str; expected a positive integer"),
    ({"slate_size": True}, "field 'slate_size'"),
    ({"prompt": "prompt"}, "field 'prompt': 'prompt': expected a column name with {j}"),
    ({"image": "image_{j}"}, "field 'image'"),
    ({"user_id": "rater_{j}"}, "field 'user_id'"),
    ({"human_file": "../elsewhere.csv"}, "field 'human_file'"),
    ({"human_file": "/data/rater.csv"}, "field 'human_file'"),
    ({"simulated_file": "sim.xlsx"}, "field 'simulated_file': 'sim.xlsx': unknown extension"),
    ({"categories": []}, "field 'categories'"),
    ({"ignored": "seed"}, "field 'ignored'"),
    ({"choice": "rater_id"}, "field 'choice': column 'rater_id' is named by more than one"),
  ],
)
def test_a_bad_layout_mapping_names_the_field(tmp_path, changes, expected):
  assert expected in _layout_error(tmp_path, **changes)


def test_a_layout_mapping_keeps_defaults_for_the_fields_it_leaves_out(tmp_path):
  path = str(tmp_path / "layout.json")
  required = {f: getattr(LAYOUT, f) for f in pasta_kaggle.REQUIRED_FIELDS}
  files.write_json(path, required)
  assert pasta_kaggle.read_layout(path) == LAYOUT
  assert pasta_kaggle.read_layout("") == LAYOUT
  files.write_json(path, pasta_kaggle.layout_to_json(LAYOUT))
  read = pasta_kaggle.read_layout(path)
  assert dataclasses.replace(read, categories=LAYOUT.categories) == LAYOUT
  assert dict(read.categories) == dict(LAYOUT.categories)
  (tmp_path / "broken.json").write_text("{")
  with pytest.raises(ConfigError, match="broken.json: cannot be read as JSON"):
    pasta_kaggle.read_layout(str(tmp_path / "broken.json"))


@pytest.mark.parametrize("extension", [".parquet", ".json", ".jsonl"])
def test_export_writes_the_table_format_of_the_layout_and_loads_back(release, tmp_path, extension):
  records = pasta_kaggle.load(release[0], show_progress=False)
  layout = dataclasses.replace(
    LAYOUT, human_file=f"human{extension}", simulated_file=f"sub/sim{extension}"
  )
  out = str(tmp_path / "exported")
  written = pasta_kaggle.export(records, out, layout, image_root=release[0])
  assert written[True] == os.path.realpath(os.path.join(out, "sub", f"sim{extension}"))
  assert pasta_kaggle.load(out, layout, show_progress=False) == records


def test_a_nested_cell_is_named(tmp_path):
  write_variant(str(tmp_path), "rater.json", "sim.jsonl", lambda c: c)
  with open(tmp_path / "rater.json") as f:
    rows = json.load(f)
  rows[2]["prompt_1"] = ["a", "list"]
  with open(tmp_path / "rater.json", "w") as f:
    json.dump(rows, f)
  layout = dataclasses.replace(
    LAYOUT, human_file="rater.json", simulated_file="sim.jsonl", ignored=("timestamp",)
  )
  with pytest.raises(schema.RecordError) as info:
    pasta_kaggle.load(str(tmp_path), layout, show_progress=False)
  _assert_names(str(info.value), "rater.json", 2, "prompt_1")
  assert "a list; expected text or a number" in str(info.value)


# References that leave their folder.


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("check_images", [True, False])
def test_an_image_reference_outside_the_release_is_named(tmp_path, kind, check_images):
  directory = tmp_path / "release"
  directory.mkdir()
  outside = tmp_path / "outside"
  outside.mkdir()
  Image.new("RGB", (2, 2)).save(outside / "secret.png")
  (directory / "link").symlink_to(outside)
  ref = {
    "dotdot": "images/../../outside/secret.png",
    "absolute": str(outside / "secret.png"),
    "symlink": "link/secret.png",
  }[kind]

  def edit(name, rows):
    if name == LAYOUT.human_file:
      rows[4]["image_2_1"] = ref

  write_release(str(directory), edit)
  with pytest.raises(schema.RecordError) as info:
    pasta_kaggle.load(str(directory), check_images=check_images, show_progress=False)
  message = str(info.value)
  _assert_names(message, LAYOUT.human_file, 4, "image_2_1")
  assert f"field 'options[2].images[1].ref'): {ref!r} resolves to " in message, message
  assert "outside" in message and len(message.splitlines()) == 1, message


def test_an_absolute_image_reference_inside_the_release_loads(tmp_path):
  def edit(name, rows):
    rows[0]["image_0_0"] = os.path.join(str(tmp_path), "images", "traj-0", "0_0_0.png")

  write_release(str(tmp_path), edit)
  records = pasta_kaggle.load(str(tmp_path), show_progress=False)
  assert os.path.isabs(records[0].options[0].images[0].ref)


def test_export_writes_nothing_outside_its_folder(release, tmp_path):
  records = pasta_kaggle.load(release[0], show_progress=False)
  out = tmp_path / "exported"
  escaping = dataclasses.replace(LAYOUT, human_file="../escaped.csv")
  with pytest.raises(schema.RecordError, match=r"layout field 'human_file': '\.\./escaped\.csv'"):
    pasta_kaggle.export(records, str(out), escaping)
  absolute = os.path.join(release[0], records[0].options[0].images[0].ref)
  moved = dataclasses.replace(
    records[0].options[0],
    images=(schema.Image(absolute, -1),) + records[0].options[0].images[1:],
  )
  changed = [dataclasses.replace(records[0], options=(moved,) + records[0].options[1:])]
  with pytest.raises(schema.RecordError) as info:
    pasta_kaggle.export(changed + records[1:], str(out), image_root=release[0])
  assert "export: record 0 (session 'traj-0', turn 0): field 'options[0].images[0].ref'" in str(
    info.value
  )
  assert sorted(os.listdir(tmp_path)) == ["exported", "release"]
  assert os.listdir(out) == []


# The inspect command.


def _cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "pasta_jax.data.pasta_kaggle", *args],
    capture_output=True,
    text=True,
    check=False,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )


def test_the_inspect_command_suggests_a_mapping_the_convert_command_reads(release, tmp_path):
  directory = str(tmp_path / "variant")
  os.makedirs(directory)
  write_variant(directory, "pasta_rater_data.parquet", "simulated.jsonl")
  mapping = str(tmp_path / "mapping.json")
  result = _cli("inspect", directory, f"--suggest={mapping}")
  assert result.returncode == 0, result.stderr
  assert "not mapped: []" in result.stdout and "img_{j}_{m}" in result.stdout, result.stdout
  out = str(tmp_path / "converted")
  result = _cli(f"--input={directory}", f"--output={out}", f"--layout={mapping}")
  assert result.returncode == 0, result.stderr
  assert schema.read_records(os.path.join(out, "records.jsonl")) == pasta_kaggle.load(
    release[0], show_progress=False
  )
  files.write_json(mapping, {"turns": 5})
  result = _cli(f"--input={directory}", f"--output={out}", f"--layout={mapping}")
  assert result.returncode != 0 and "field 'human_file': missing" in result.stderr, result.stderr
