"""Pick-a-Pic v2, HPD v2 and Simulacra loaders on fixtures in their own layouts; errors; disjoint splits."""

import dataclasses
import datetime
import hashlib
import io
import json
import os
import re
import sqlite3

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pasta_jax.data import preferences, schema


def _jpeg(seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format="JPEG")
  return buffer.getvalue()


def _png(seed: int) -> bytes:
  buffer = io.BytesIO()
  Image.new("RGB", (4, 4), (seed % 256, 7, 9)).save(buffer, format="PNG")
  return buffer.getvalue()


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _ref(data: bytes, extension: str) -> str:
  digest = hashlib.sha256(data).hexdigest()
  return f"images/{digest[:2]}/{digest}.{extension}"


# Pick-a-Pic v2 (parquet with the dataset's columns and types).

PICKAPIC_ROWS = (  # (user_id, caption, label_0, label_1)
  (11, "a cat in a hat", 1.0, 0.0),
  (11, "a dog on a log", 0.0, 1.0),
  (12, "a cat in a hat", 0.5, 0.5),
  (13, "a castle at dusk", 0.0, 1.0),
)


def pickapic_table(rows=PICKAPIC_ROWS) -> pa.Table:
  n = len(rows)
  columns = {
    "are_different": pa.array([True] * n),
    "best_image_uid": pa.array([f"best-{i}" for i in range(n)]),
    "caption": pa.array([r[1] for r in rows]),
    "created_at": pa.array(
      [datetime.datetime(2023, 5, 1, 12, i) for i in range(n)], pa.timestamp("ns")
    ),
    "has_label": pa.array([True] * n),
    "image_0_uid": pa.array([f"u0-{i}" for i in range(n)]),
    "image_0_url": pa.array([f"https://example.invalid/{i}/0.jpg" for i in range(n)]),
    "image_1_uid": pa.array([f"u1-{i}" for i in range(n)]),
    "image_1_url": pa.array([f"https://example.invalid/{i}/1.jpg" for i in range(n)]),
    "jpg_0": pa.array([_jpeg(2 * i) for i in range(n)], pa.binary()),
    "jpg_1": pa.array([_jpeg(2 * i + 1) for i in range(n)], pa.binary()),
    "label_0": pa.array([r[2] for r in rows], pa.float64()),
    "label_1": pa.array([r[3] for r in rows], pa.float64()),
    "model_0": pa.array(["sdxl"] * n),
    "model_1": pa.array(["sd-2.1"] * n),
    "ranking_id": pa.array([1000 + i for i in range(n)], pa.int64()),
    "user_id": pa.array([r[0] for r in rows], pa.int64()),
    "num_example_per_prompt": pa.array([1] * n, pa.int64()),
    "__index_level_0__": pa.array(list(range(n)), pa.int64()),
  }
  assert tuple(columns) == preferences.PICKAPIC_COLUMNS
  return pa.table(columns)


def write_pickapic(path, table=None) -> str:
  pq.write_table(pickapic_table() if table is None else table, str(path))
  return str(path)


@pytest.fixture
def store(tmp_path):
  return preferences.ImageStore(str(tmp_path / "out"))


def _pickapic_error(path, store, **kwargs) -> str:
  with pytest.raises(schema.RecordError) as info:
    preferences.load_pickapic([str(path)], store, show_progress=False, **kwargs)
  return str(info.value)


def test_pickapic_rows_become_pairwise_preferences(tmp_path, store, config):
  path = write_pickapic(tmp_path / "train-00000.parquet")
  records = preferences.load_pickapic([path], store, show_progress=False)
  assert [r.choice for r in records] == [0, 1, 1]  # The tie (row 2) is dropped.
  assert [r.user_id for r in records] == ["pickapic:11", "pickapic:11", "pickapic:13"]
  assert [r.session_id for r in records] == ["pickapic:1000", "pickapic:1001", "pickapic:1003"]
  first = records[0]
  assert (
    first.kind == schema.PREFERENCE and first.turn == 0 and first.start_prompt == "a cat in a hat"
  )
  assert all(
    o.text == "a cat in a hat" and o.category == schema.PREFERENCE_CATEGORY for o in first.options
  )
  assert all(
    o.text_row == -1 and [im.row for im in o.images] == [-1] for r in records for o in r.options
  )
  table = pickapic_table()
  for j in range(2):
    data = table.column(f"jpg_{j}")[0].as_py()
    ref = first.options[j].images[0].ref
    assert ref == _ref(data, "jpg")
    assert _read(os.path.join(store.root, ref)) == data
  schema.validate_records(
    records, schema.RecordSpec.from_config(config), path, allow_preferences=True
  )


def test_pickapic_ties_are_kept_as_two_mirrored_choices(tmp_path, store):
  path = write_pickapic(tmp_path / "train.parquet")
  records = preferences.load_pickapic([path], store, ties="keep", show_progress=False)
  ties = [r for r in records if r.user_id == "pickapic:12"]
  assert [(r.session_id, r.choice) for r in ties] == [
    ("pickapic:1002/tie0", 0),
    ("pickapic:1002/tie1", 1),
  ]
  assert ties[0].options == ties[1].options
  with pytest.raises(ValueError, match="ties"):
    preferences.load_pickapic([path], store, ties="half")


def test_identical_image_bytes_are_stored_once(tmp_path, store):
  table = pickapic_table()
  table = table.set_column(table.schema.get_field_index("jpg_1"), "jpg_1", table.column("jpg_0"))
  records = preferences.load_pickapic(
    [write_pickapic(tmp_path / "p.parquet", table)], store, show_progress=False
  )
  assert records[0].options[0].images == records[0].options[1].images
  stored = sum(len(files) for _, _, files in os.walk(store.root))
  assert stored == 3  # Rows 0, 1, 3 (the tie is dropped).


def test_pickapic_missing_column_is_named_with_the_columns_found(tmp_path, store):
  path = write_pickapic(tmp_path / "p.parquet", pickapic_table().drop_columns(["label_1"]))
  message = _pickapic_error(path, store)
  assert str(path) in message and "missing columns ['label_1']" in message, message
  assert "found columns ['are_different'" in message, message


def test_pickapic_unknown_column_is_named(tmp_path, store):
  table = pickapic_table()
  path = write_pickapic(
    tmp_path / "p.parquet", table.append_column("aesthetic", pa.array([0.1] * table.num_rows))
  )
  message = _pickapic_error(path, store)
  assert "unknown columns ['aesthetic']" in message and "missing columns []" in message, message


def test_pickapic_wrong_column_type_is_named(tmp_path, store):
  table = pickapic_table()
  table = table.set_column(
    table.schema.get_field_index("user_id"), "user_id", pa.array([str(r[0]) for r in PICKAPIC_ROWS])
  )
  message = _pickapic_error(write_pickapic(tmp_path / "p.parquet", table), store)
  assert "column 'user_id' has type string; expected integer" in message, message


def test_pickapic_corrupt_jpeg_bytes_are_named(tmp_path, store):
  table = pickapic_table()
  images = table.column("jpg_1").to_pylist()
  images[3] = images[3][: len(images[3]) // 2]  # Truncated JPEG.
  images[1] = b"not an image"
  table = table.set_column(
    table.schema.get_field_index("jpg_1"), "jpg_1", pa.array(images, pa.binary())
  )
  message = _pickapic_error(write_pickapic(tmp_path / "p.parquet", table), store)
  lines = message.splitlines()
  assert len(lines) == 2, message
  for line, row in zip(lines, (1, 3)):
    assert str(tmp_path / "p.parquet") in line and re.search(rf"row {row}\b", line), line
    assert (
      "column 'jpg_1' (field 'options[1].images[0]')" in line and "not a readable image" in line
    ), line


def test_pickapic_bad_labels_are_named(tmp_path, store):
  rows = list(PICKAPIC_ROWS)
  rows[1] = (11, "a dog on a log", 0.7, 0.3)
  message = _pickapic_error(write_pickapic(tmp_path / "p.parquet", pickapic_table(rows)), store)
  assert re.search(
    r"p\.parquet: row 1: columns 'label_0', 'label_1' \(field 'choice'\): labels \(0\.7, 0\.3\)",
    message,
  ), message


def test_a_truncated_parquet_file_is_named(tmp_path, store):
  path = write_pickapic(tmp_path / "p.parquet")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: len(data) // 2])
  message = _pickapic_error(path, store)
  assert path in message and "not a readable parquet file" in message, message


# HPD v2 (JSON annotation list plus an image directory).


def write_hpd(directory, entries=None) -> tuple[str, str, list[dict]]:
  """An HPD v2 style annotation file and its images; returns (json path, image dir, entries)."""
  image_dir = os.path.join(directory, "images")
  os.makedirs(image_dir, exist_ok=True)
  if entries is None:
    entries = [
      {
        "prompt": "a red bicycle",
        "image_path": ["00000.jpg", "00001.jpg"],
        "human_preference": [0, 1],
      },
      {
        "prompt": "a red bicycle",
        "image_path": ["00002.jpg", "00003.png"],
        "human_preference": [1, 0],
      },
      {
        "prompt": "a lighthouse",
        "image_path": ["00004.jpg", "00005.jpg", "00006.jpg", "00007.jpg"],
        "rank": [3, 1, 4, 2],
        "user_hash": ["h1"],
        "raw_annotations": [[3, 1, 4, 2]],
      },
    ]
  for entry in entries:
    for name in entry.get("image_path", []):
      with open(os.path.join(image_dir, name), "wb") as f:
        f.write(_png(len(name) + int(name[:5])) if name.endswith(".png") else _jpeg(int(name[:5])))
  path = os.path.join(directory, "train.json")
  with open(path, "w") as f:
    json.dump(entries, f)
  return path, image_dir, entries


def _hpd_error(tmp_path, store, entries, remove=()) -> str:
  path, image_dir, _ = write_hpd(str(tmp_path), entries)
  for name in remove:
    os.remove(os.path.join(image_dir, name))
  with pytest.raises(schema.RecordError) as info:
    preferences.load_hpd(path, image_dir, store, show_progress=False)
  return str(info.value)


def test_hpd_pairs_and_rankings_become_preferences(tmp_path, store, config):
  path, image_dir, entries = write_hpd(str(tmp_path))
  records = preferences.load_hpd(path, image_dir, store, show_progress=False)
  assert len(records) == 2 + 3  # Two pairs, and a ranking of 4 as 3 Plackett-Luce choices.
  assert [r.choice for r in records[:2]] == [1, 0]
  assert [r.user_id for r in records] == ["hpd:train:0", "hpd:train:1"] + ["hpd:train:2"] * 3
  assert len({r.session_id for r in records}) == 5
  refs = lambda r: [o.images[0].ref for o in r.options]  # noqa: E731
  assert refs(records[1])[1] == _ref(_read(os.path.join(image_dir, "00003.png")), "png")
  ranking = records[2:]
  lighthouse = [_ref(_read(os.path.join(image_dir, n)), "jpg") for n in entries[2]["image_path"]]
  # rank [3, 1, 4, 2]: image 1 beats all, then image 3 beats {0, 2}, then image 0 beats image 2.
  assert [refs(r) for r in ranking] == [
    lighthouse,
    [lighthouse[i] for i in (0, 2, 3)],
    [lighthouse[i] for i in (0, 2)],
  ]
  assert [r.choice for r in ranking] == [1, 2, 0]
  schema.validate_records(
    records, schema.RecordSpec.from_config(config), path, allow_preferences=True
  )


def test_hpd_accepts_file_path_as_the_image_list(tmp_path, store):
  entries = [
    {"prompt": "a fox", "file_path": ["00010.jpg", "00011.jpg"], "human_preference": [1, 0]}
  ]
  path, image_dir, _ = write_hpd(
    str(tmp_path),
    [{"prompt": "a fox", "image_path": entries[0]["file_path"], "human_preference": [1, 0]}],
  )
  with open(path, "w") as f:
    json.dump(entries, f)
  (record,) = preferences.load_hpd(path, image_dir, store, show_progress=False)
  assert record.choice == 0 and record.start_prompt == "a fox"


def test_hpd_bad_entries_are_named(tmp_path, store):
  entries = [
    {"prompt": "a", "image_path": ["00000.jpg", "00001.jpg"], "human_preference": [1, 1]},
    {"prompt": "b", "image_path": ["00002.jpg", "00003.jpg"], "rank": [1, 1]},
    {
      "prompt": "c",
      "image_path": ["00004.jpg", "00005.jpg"],
      "human_preference": [0, 1],
      "score": 3,
    },
    {"image_path": ["00006.jpg", "00007.jpg"], "human_preference": [0, 1]},
    {"prompt": "e", "image_path": ["00008.jpg", "00009.jpg"], "human_preference": [0, 1]},
  ]
  lines = _hpd_error(tmp_path, store, entries, remove=["00009.jpg"]).splitlines()
  assert len(lines) == 5, lines
  assert all("train.json: entry " in line for line in lines)
  assert "entry 0: field 'human_preference'" in lines[0]
  assert "entry 1: field 'rank'" in lines[1]
  assert "entry 2: unknown fields ['score']" in lines[2]
  assert "entry 3: field 'prompt'" in lines[3]
  assert "entry 4: field 'image_path[1]': '00009.jpg'" in lines[4]


HPD_WRONG_LABELS = {
  "float preference": ({"human_preference": [0.0, 1.0]}, "human_preference[0]"),
  "bool preference": ({"human_preference": [False, True]}, "human_preference[0]"),
  "string in preference": ({"human_preference": [0, "1"]}, "human_preference[1]"),
  "string preference": ({"human_preference": "01"}, "human_preference"),
  "long preference": ({"human_preference": [0, 1, 0]}, "human_preference"),
  "float rank": ({"rank": [2.0, 1.0]}, "rank[0]"),
  "bool rank": ({"rank": [True, 2]}, "rank[0]"),
  "null in rank": ({"rank": [1, None]}, "rank[1]"),
  "object rank": ({"rank": {"0": 1, "1": 2}}, "rank"),
}


@pytest.mark.parametrize("labels, field", HPD_WRONG_LABELS.values(), ids=HPD_WRONG_LABELS.keys())
def test_hpd_labels_of_the_wrong_type_are_named(tmp_path, store, labels, field):
  good = {"prompt": "a", "image_path": ["00000.jpg", "00001.jpg"], "human_preference": [1, 0]}
  bad = {"prompt": "b", "image_path": ["00002.jpg", "00003.jpg"], **labels}
  message = _hpd_error(tmp_path, store, [good, bad])
  assert message.startswith(f"{tmp_path / 'train.json'}: entry 1: field '{field}': "), message
  assert len(message.splitlines()) == 1, message


@pytest.mark.parametrize(
  "content, problem",
  [
    (b'[{"prompt": "a", ', "JSONDecodeError"),
    (b'[{"prompt": "\xff"}]', "UnicodeDecodeError"),
    (b'[{"prompt": "a", "prompt": "b"}]', r"duplicated keys \['prompt'\]"),
    (b"[" * 100_000, "nested too deeply"),
  ],
  ids=["truncated", "bad-utf8", "duplicate-key", "deep"],
)
def test_an_unreadable_hpd_file_is_named(tmp_path, store, content, problem):
  path = tmp_path / "train.json"
  path.write_bytes(content)
  expected = rf"^{re.escape(str(path))}: cannot be read as JSON .*{problem}"
  with pytest.raises(schema.RecordError, match=expected):
    preferences.load_hpd(str(path), str(tmp_path), store, show_progress=False)


def test_hpd_corrupt_image_file_is_named(tmp_path, store):
  path, image_dir, _ = write_hpd(str(tmp_path))
  with open(os.path.join(image_dir, "00006.jpg"), "r+b") as f:
    f.truncate(40)
  with pytest.raises(
    schema.RecordError, match=r"entry 2: field 'image_path\[2\]': '00006.jpg': not a readable"
  ):
    preferences.load_hpd(path, image_dir, store, show_progress=False)


# Simulacra Aesthetic Captions (sqlite with the release's tables).

SIMULACRA_SCHEMA = """
CREATE TABLE survey (id INTEGER PRIMARY KEY, qid INTEGER, rating INTEGER);
CREATE TABLE generations (id INTEGER PRIMARY KEY, sid INTEGER, method TEXT, prompt TEXT, verified INTEGER);
CREATE TABLE images (id INTEGER PRIMARY KEY, gid INTEGER, idx INTEGER);
CREATE TABLE paths (iid INTEGER PRIMARY KEY, path TEXT UNIQUE);
CREATE TABLE ratings (sid INTEGER, iid INTEGER, rating INTEGER, verified INTEGER);
CREATE TABLE upscales (iid INTEGER, method TEXT);
"""
SIMULACRA_RATINGS = (  # (rater sid, image id, rating); images 1-3 are generation 1, images 4-5 generation 2.
  (7, 1, 8),
  (7, 2, 3),
  (7, 3, 8),
  (7, 1, 9),  # Rater 7 re-rates image 1: 9 counts.
  (8, 4, 5),
  (8, 5, 6),
  (8, 1, 4),  # Rater 8's single rating of generation 1 compares nothing.
  (9, 4, 2),
  (9, 5, 2),  # A tie compares nothing.
)


def write_simulacra(
  directory, ratings=SIMULACRA_RATINGS, schema_sql=SIMULACRA_SCHEMA
) -> tuple[str, str]:
  image_dir = os.path.join(directory, "sac")
  os.makedirs(image_dir, exist_ok=True)
  path = os.path.join(directory, "sac_public_2022_06_29.sqlite")
  connection = sqlite3.connect(path)
  connection.executescript(schema_sql)
  connection.executemany(
    "INSERT INTO generations VALUES (?, ?, 'cc12m', ?, 1)",
    [(1, 100, "a forest spirit, oil painting"), (2, 101, "neon city at night")],
  )
  for iid, gid in ((1, 1), (2, 1), (3, 1), (4, 2), (5, 2)):
    connection.execute("INSERT INTO images VALUES (?, ?, ?)", (iid, gid, iid))
    connection.execute("INSERT INTO paths VALUES (?, ?)", (iid, f"{gid}/{iid}.png"))
    os.makedirs(os.path.join(image_dir, str(gid)), exist_ok=True)
    with open(os.path.join(image_dir, f"{gid}/{iid}.png"), "wb") as f:
      f.write(_png(iid))
  connection.executemany("INSERT INTO ratings VALUES (?, ?, ?, 1)", ratings)
  connection.commit()
  connection.close()
  return path, image_dir


def test_simulacra_ratings_become_pairwise_preferences(tmp_path, store, config):
  path, image_dir = write_simulacra(str(tmp_path))
  records = preferences.load_simulacra(path, image_dir, store, show_progress=False)
  ref = {iid: _ref(_png(iid), "png") for iid in range(1, 6)}
  got = [
    (r.user_id, [o.images[0].ref for o in r.options], r.choice, r.start_prompt) for r in records
  ]
  forest, city = "a forest spirit, oil painting", "neon city at night"
  assert got == [
    ("sac:7", [ref[1], ref[2]], 0, forest),
    ("sac:7", [ref[1], ref[3]], 0, forest),
    ("sac:7", [ref[2], ref[3]], 1, forest),
    ("sac:8", [ref[4], ref[5]], 1, city),
  ]
  schema.validate_records(
    records, schema.RecordSpec.from_config(config), path, allow_preferences=True
  )


def test_simulacra_kway_chooses_the_unique_best(tmp_path, store):
  path, image_dir = write_simulacra(str(tmp_path))
  records = preferences.load_simulacra(path, image_dir, store, mode="kway", show_progress=False)
  assert [(r.user_id, len(r.options), r.choice) for r in records] == [
    ("sac:7", 3, 0),
    ("sac:8", 2, 1),
  ]
  with pytest.raises(ValueError, match="mode"):
    preferences.load_simulacra(path, image_dir, store, mode="listwise")


def test_simulacra_rating_out_of_range_is_named(tmp_path, store):
  path, image_dir = write_simulacra(str(tmp_path), SIMULACRA_RATINGS + ((9, 5, 11),))
  with pytest.raises(schema.RecordError) as info:
    preferences.load_simulacra(path, image_dir, store, show_progress=False)
  message = str(info.value)
  assert path in message and "table 'ratings' row 10: column 'rating': 11" in message, message


@pytest.mark.parametrize("rating", [8.5, "eight", b"8"], ids=["float", "text", "blob"])
def test_a_simulacra_rating_of_the_wrong_type_is_named(tmp_path, store, rating):
  path, image_dir = write_simulacra(str(tmp_path), SIMULACRA_RATINGS + ((9, 5, rating),))
  with pytest.raises(schema.RecordError) as info:
    preferences.load_simulacra(path, image_dir, store, show_progress=False)
  message = str(info.value)
  assert message.startswith(f"{path}: table 'ratings' row 10: column 'rating': "), message
  assert len(message.splitlines()) == 1, message


def test_simulacra_missing_and_unknown_columns_are_named(tmp_path, store):
  bad = SIMULACRA_SCHEMA.replace(
    "rating INTEGER, verified INTEGER)", "score INTEGER, verified INTEGER)"
  )
  path, image_dir = write_simulacra(str(tmp_path), ratings=(), schema_sql=bad)
  with pytest.raises(schema.RecordError) as info:
    preferences.load_simulacra(path, image_dir, store, show_progress=False)
  message = str(info.value)
  assert "table 'ratings'" in message and "missing columns ['rating']" in message, message
  assert (
    "unknown columns ['score']" in message
    and "found columns ['sid', 'iid', 'score', 'verified']" in message
  )


def test_simulacra_missing_table_and_image_file_are_named(tmp_path, store):
  path, image_dir = write_simulacra(str(tmp_path / "a"))
  os.remove(os.path.join(image_dir, "1/2.png"))
  with pytest.raises(schema.RecordError, match=r"table 'paths' row 2: column 'path': '1/2.png'"):
    preferences.load_simulacra(path, image_dir, store, show_progress=False)
  path, image_dir = write_simulacra(str(tmp_path / "b"))
  with sqlite3.connect(path) as connection:
    connection.execute("ALTER TABLE paths RENAME TO paths_old")
  with pytest.raises(
    schema.RecordError, match=r"missing tables \['paths'\]; found tables \['survey'"
  ):
    preferences.load_simulacra(path, image_dir, store, show_progress=False)


def _outside_image_dir(directory: str, image_dir: str, kind: str) -> str:
  """A reference that leads out of `image_dir` to a real image: by `..`, absolute, or by a symlink."""
  outside = os.path.join(directory, "outside")
  os.makedirs(outside, exist_ok=True)
  with open(os.path.join(outside, "secret.png"), "wb") as f:
    f.write(_png(99))
  if kind == "symlink":
    os.symlink(outside, os.path.join(image_dir, "link"))
    return "link/secret.png"
  return "../outside/secret.png" if kind == "dotdot" else os.path.join(outside, "secret.png")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_an_hpd_image_path_outside_the_image_dir_is_named(tmp_path, store, kind):
  path, image_dir, entries = write_hpd(str(tmp_path))
  ref = _outside_image_dir(str(tmp_path), image_dir, kind)
  entries[1]["image_path"][1] = ref
  with open(path, "w") as f:
    json.dump(entries, f)
  with pytest.raises(schema.RecordError) as info:
    preferences.load_hpd(path, image_dir, store, show_progress=False)
  message = str(info.value)
  assert message.startswith(f"{path}: entry 1: field 'image_path[1]': {ref!r} resolves to ")
  assert "outside" in message and len(message.splitlines()) == 1, message
  assert not os.path.exists(os.path.join(store.root, _ref(_png(99), "png")))


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_a_simulacra_path_outside_the_image_dir_is_named(tmp_path, store, kind):
  path, image_dir = write_simulacra(str(tmp_path))
  ref = _outside_image_dir(str(tmp_path), image_dir, kind)
  with sqlite3.connect(path) as connection:
    connection.execute("UPDATE paths SET path = ? WHERE iid = 2", (ref,))
  with pytest.raises(schema.RecordError) as info:
    preferences.load_simulacra(path, image_dir, store, show_progress=False)
  message = str(info.value)
  assert message.startswith(f"{path}: table 'paths' row 2: column 'path': {ref!r} resolves to ")
  assert "outside" in message and len(message.splitlines()) == 1, message


# Splits.


def _preference(user: str, prompt: str, i: int) -> schema.ChoiceRecord:
  options = tuple(
    schema.Option(
      text=prompt,
      category=schema.PREFERENCE_CATEGORY,
      text_row=-1,
      images=(schema.Image(ref=f"images/{i}-{j}.jpg", row=-1),),
    )
    for j in range(2)
  )
  return schema.ChoiceRecord(
    kind=schema.PREFERENCE,
    user_id=user,
    session_id=f"s{i}",
    turn=0,
    start_prompt=prompt,
    options=options,
    choice=i % 2,
  )


def _many(num_users=60, num_prompts=200, count=2000, seed=0) -> list[schema.ChoiceRecord]:
  rng = np.random.default_rng(seed)
  # Mostly a user's own prompts, sometimes a shared popular one (as in Pick-a-Pic).
  records = []
  for i in range(count):
    user = int(rng.integers(num_users))
    prompt = int(rng.integers(5)) if rng.random() < 0.1 else 5 + user * 3 + int(rng.integers(3))
    records.append(_preference(f"user{user}", f"Prompt  {prompt % num_prompts}", i))
  return records


def _assert_disjoint(splits: preferences.Splits) -> None:
  for key in (lambda r: r.user_id, preferences.prompt_key):
    owners = {}
    for name, records in splits.records.items():
      for r in records:
        assert owners.setdefault(key(r), name) == name, (key(r), owners[key(r)], name)


def test_splits_are_user_and_prompt_disjoint_and_deterministic():
  records = _many()
  splits = preferences.split_records(records, by="user")
  _assert_disjoint(splits)
  assert set(splits.records) == set(preferences.SPLITS)
  sizes = {k: len(v) for k, v in splits.records.items()}
  assert sum(sizes.values()) + splits.dropped == len(records)
  assert sizes["train"] > sizes["validation"] > 0 and sizes["test"] > 0, sizes
  assert splits.dropped < 0.1 * len(records), splits.dropped
  assert preferences.split_records(records[::-1], by="user").records == {
    k: v[::-1] for k, v in splits.records.items()
  }
  assert preferences.split_records(records, by="user", salt="other").records != splits.records


def test_prompt_splits_keep_every_single_comparison_user():
  records = [dataclasses.replace(r, user_id=f"hpd:train:{i}") for i, r in enumerate(_many())]
  splits = preferences.split_records(records, by="prompt")
  _assert_disjoint(splits)
  assert splits.dropped == 0


def test_prompt_keys_ignore_case_and_spacing():
  a, b = _preference("u", "A  Cat\tin a hat ", 0), _preference("v", "a cat in a HAT", 1)
  assert preferences.prompt_key(a) == preferences.prompt_key(b) == "a cat in a hat"


def test_hash_split_follows_the_fractions():
  counts = np.bincount(
    [preferences.hash_split(str(i), (0.7, 0.2, 0.1)) for i in range(20000)], minlength=3
  )
  np.testing.assert_allclose(counts / 20000, [0.7, 0.2, 0.1], atol=0.015)
  assert preferences.hash_split("x", (0.0, 0.0, 1.0)) == 2
  with pytest.raises(ValueError, match="fractions"):
    preferences.split_records([], fractions=(0.5, 0.5))


def test_write_splits_writes_jsonl_and_a_manifest(tmp_path):
  splits = preferences.split_records(_many(count=300), by="user")
  manifest = preferences.write_splits(splits, str(tmp_path), source="fixture")
  for name in preferences.SPLITS:
    assert schema.read_records(str(tmp_path / f"{name}.jsonl")) == splits.records[name]
    assert manifest["splits"][name]["count"] == len(splits.records[name])
  with open(tmp_path / "data_manifest.json") as f:
    assert json.load(f) == manifest
  assert manifest["dropped"] == splits.dropped and manifest["unembedded_row"] == -1
