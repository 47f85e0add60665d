"""The PASTA release loader on a fixture written in the assumed layout: records, errors, summary, export, CLI."""

import csv
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image

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
