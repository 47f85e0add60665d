"""Open single-turn preference data as canonical "preference" records, with user- and prompt-disjoint splits.

Every record is one turn: the options are images of one prompt (one image per option, category
`schema.PREFERENCE_CATEGORY`), `choice` is the preferred one. Feature rows are `UNEMBEDDED` (-1) until the
embed stage fills them. Images are decoded once to check them, then stored by content in an `ImageStore`:
`<root>/images/<sha[:2]>/<sha256>.<ext>`, and `Image.ref` is that path relative to `<root>`.

Layouts read (errors name the file, the row/entry and the column/field):
- Pick-a-Pic v2, parquet shards with the dataset's columns (`PICKAPIC_COLUMNS`); used: caption, jpg_0, jpg_1
  (JPEG bytes), label_0, label_1 (1/0, 0/1, or 0.5/0.5 for a tie), user_id, ranking_id.
- HPD v2, a JSON annotation file: a list of objects with "prompt", the image paths ("image_path" or
  "file_path", relative to an image directory) and either "human_preference" (a 0/1 list with one 1 marking
  the preferred image; the training set) or "rank" (1 = best; the test set, which becomes the choices of a
  Plackett-Luce ranking: the best of all, then the best of the rest, ...). It has no annotator ids: each
  entry is its own user (docs/paper.md).
- Simulacra Aesthetic Captions, its sqlite database (`SIMULACRA_TABLES`): ratings 1-10 by rater session
  `ratings.sid`. The images of one generation (one prompt) rated by one rater are compared by rating,
  pairwise (a record per pair with different ratings) or k-way (one record over all of them, choosing the
  unique best); a rater's latest rating of an image counts.

`split_records` makes deterministic train/validation/test splits by hashing ids, with no user and no prompt
in two splits; `write_splits` writes `<split>.jsonl` files and a manifest.

CLI: `python -m pasta_jax.data.preferences --source=pickapic --input=SHARD.parquet [--input=...] --output=DIR`
(`--source=hpd --input=ANNOTATIONS.json --images=DIR`, `--source=simulacra --input=sac.sqlite --images=DIR`)
writes the splits and the image store under DIR, ready for `pasta_jax.user_model.pretrain`.
"""

import collections
import dataclasses
import hashlib
import io
import os
import sqlite3
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from absl import app, flags
from PIL import Image

from pasta_jax import files
from pasta_jax.data import schema
from pasta_jax.progress import progress

UNEMBEDDED = -1
SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
MANIFEST_FILE = "data_manifest.json"
TIE_MODES = ("drop", "keep")
SIMULACRA_MODES = ("pairwise", "kway")

PICKAPIC_COLUMNS = (
  "are_different",
  "best_image_uid",
  "caption",
  "created_at",
  "has_label",
  "image_0_uid",
  "image_0_url",
  "image_1_uid",
  "image_1_url",
  "jpg_0",
  "jpg_1",
  "label_0",
  "label_1",
  "model_0",
  "model_1",
  "ranking_id",
  "user_id",
  "num_example_per_prompt",
  "__index_level_0__",
)
EXTENSIONS = {"JPEG": "jpg"}


def _is_text(t: pa.DataType) -> bool:
  return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_bytes(t: pa.DataType) -> bool:
  return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _type_name(is_type) -> str:
  return is_type.__name__.removeprefix("_").removeprefix("is_")


PICKAPIC_USED = {
  "caption": _is_text,
  "jpg_0": _is_bytes,
  "jpg_1": _is_bytes,
  "label_0": pa.types.is_floating,
  "label_1": pa.types.is_floating,
  "user_id": pa.types.is_integer,
  "ranking_id": pa.types.is_integer,
}
PICKAPIC_LABELS = {(1.0, 0.0): 0, (0.0, 1.0): 1}
PICKAPIC_TIE = (0.5, 0.5)

HPD_KEYS = (
  "prompt",
  "image_path",
  "file_path",
  "human_preference",
  "rank",
  "raw_annotations",
  "user_hash",
)

SIMULACRA_TABLES = {
  "generations": ("id", "sid", "method", "prompt", "verified"),
  "images": ("id", "gid", "idx"),
  "paths": ("iid", "path"),
  "ratings": ("sid", "iid", "rating", "verified"),
}
SIMULACRA_RATINGS = range(1, 11)


def check_image(data: bytes) -> str:
  """Decodes the image (at the smallest JPEG scale) and returns its PIL format; ValueError if it is broken."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.draft(image.mode, (1, 1))
      image.load()
      return image.format
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f"not a readable image ({type(e).__name__}: {e})") from None


class ImageStore:
  """Checked image files named by the sha256 of their bytes, under `root/images`."""

  def __init__(self, root: str):
    self.root = root

  def put(self, data: bytes) -> str:
    """Stores `data` (once) and returns its ref, relative to `root`; ValueError if it is not an image."""
    image_format = check_image(data)
    digest = hashlib.sha256(data).hexdigest()
    ref = f"images/{digest[:2]}/{digest}.{EXTENSIONS.get(image_format, image_format.lower())}"
    path = os.path.join(self.root, ref)
    if not os.path.exists(path):
      os.makedirs(os.path.dirname(path), exist_ok=True)
      files.write_bytes(path, data)
    return ref


def store_file(store: ImageStore, image_dir: str, relative: str, where: str) -> str:
  """Stores the image file `relative` of `image_dir` and returns its ref.

  ValueError starting with `where` for a path that resolves outside `image_dir` (symlinks resolved),
  an unreadable file or one that is not an image.
  """
  path = files.resolve_inside(image_dir, relative, where)
  try:
    with open(path, "rb") as f:
      return store.put(f.read())
  except (OSError, ValueError) as e:
    raise ValueError(f"{where}: {relative!r}: {e}") from None


def _record(
  user_id: str, session_id: str, prompt: str, refs: Sequence[str], choice: int
) -> schema.ChoiceRecord:
  options = tuple(
    schema.Option(
      text=prompt,
      category=schema.PREFERENCE_CATEGORY,
      text_row=UNEMBEDDED,
      images=(schema.Image(ref=ref, row=UNEMBEDDED),),
    )
    for ref in refs
  )
  return schema.ChoiceRecord(
    kind=schema.PREFERENCE,
    user_id=user_id,
    session_id=session_id,
    turn=0,
    start_prompt=prompt,
    options=options,
    choice=choice,
    start_text_row=UNEMBEDDED,
  )


def _check_columns(
  path: str, found: Sequence[str], known: Sequence[str], used: Iterable[str]
) -> None:
  missing = [c for c in used if c not in found]
  unknown = [c for c in found if c not in known]
  if missing or unknown:
    raise schema.RecordError(
      f"{path}: missing columns {missing}, unknown columns {unknown}; found columns {list(found)}"
    )


# Pick-a-Pic v2.


def _pickapic_file(path: str) -> pq.ParquetFile:
  try:
    parquet = pq.ParquetFile(path)
  except (pa.ArrowInvalid, OSError) as e:
    raise schema.RecordError(
      f"{path}: not a readable parquet file (truncated or corrupt?): {e}"
    ) from None
  arrow_schema = parquet.schema_arrow
  _check_columns(path, arrow_schema.names, PICKAPIC_COLUMNS, PICKAPIC_USED)
  wrong = [
    f"column '{c}' has type {arrow_schema.field(c).type}; expected {_type_name(is_type)}"
    for c, is_type in PICKAPIC_USED.items()
    if not is_type(arrow_schema.field(c).type)
  ]
  if wrong:
    raise schema.RecordError(f"{path}: {'; '.join(wrong)}")
  return parquet


def _pickapic_rows(
  path: str, parquet: pq.ParquetFile, batch_size: int
) -> Iterable[tuple[int, dict]]:
  """(row, values) of every row; a read error names the file and the first row of the failing batch."""
  start = 0
  batches = parquet.iter_batches(batch_size=batch_size, columns=list(PICKAPIC_USED))
  while True:
    try:
      batch = next(batches, None)
    except (pa.ArrowException, OSError) as e:
      raise schema.RecordError(f"{path}: row {start}: unreadable rows from here on: {e}") from None
    if batch is None:
      return
    for offset, row in enumerate(batch.to_pylist()):
      yield start + offset, row
    start += batch.num_rows


def load_pickapic(
  paths: Sequence[str],
  store: ImageStore,
  ties: str = "drop",
  batch_size: int = 256,
  show_progress: bool = True,
) -> list[schema.ChoiceRecord]:
  """Pick-a-Pic v2 parquet shards as pairwise records, in file and row order.

  ties="drop" skips 0.5/0.5 rows; ties="keep" writes a tie as two records (sessions `<id>/tie0` and
  `<id>/tie1`) choosing each image once, which is the tie's Bradley-Terry likelihood at twice a decided pair's
  weight.
  """
  if ties not in TIE_MODES:
    raise ValueError(f"ties={ties!r}; expected one of {TIE_MODES}")
  records, errors = [], []
  for path in paths:
    parquet = _pickapic_file(path)
    for row_index, row in progress(
      _pickapic_rows(path, parquet, batch_size), f"reading {os.path.basename(path)}", show_progress
    ):
      where = f"{path}: row {row_index}"
      labels = (row["label_0"], row["label_1"])
      if labels == PICKAPIC_TIE and ties == "drop":
        continue
      if labels not in PICKAPIC_LABELS and labels != PICKAPIC_TIE:
        errors.append(
          f"{where}: columns 'label_0', 'label_1' (field 'choice'): labels {labels}; expected "
          f"{sorted(PICKAPIC_LABELS)} or a tie {PICKAPIC_TIE}"
        )
        continue
      bad = [c for c in ("caption", "user_id", "ranking_id") if row[c] is None or row[c] == ""]
      errors += [f"{where}: column '{c}': empty" for c in bad]
      refs = []
      for column in ("jpg_0", "jpg_1"):
        try:
          refs.append(store.put(row[column] or b""))
        except ValueError as e:
          errors.append(
            f"{where}: column '{column}' (field 'options[{column[-1]}].images[0]'): {e}"
          )
      if bad or len(refs) < 2:
        continue
      user, session = f"pickapic:{row['user_id']}", f"pickapic:{row['ranking_id']}"
      if labels == PICKAPIC_TIE:
        records += [_record(user, f"{session}/tie{c}", row["caption"], refs, c) for c in (0, 1)]
      else:
        records.append(_record(user, session, row["caption"], refs, PICKAPIC_LABELS[labels]))
  schema.raise_if_any(errors)
  return records


# HPD v2.


def _integer_list_problem(name: str, values, count: int) -> str | None:
  """Why `values` is not a list of `count` integers (never bools or floats), naming the field."""
  if not isinstance(values, list) or len(values) != count:
    return f"field '{name}': {values!r}; expected a list of {count} integers, one per image"
  for k, value in enumerate(values):
    if not isinstance(value, int) or isinstance(value, bool):
      return f"field '{name}[{k}]': {value!r} ({type(value).__name__}); expected an integer"
  return None


def _hpd_choices(entry: dict, where: str, errors: list[str]) -> list[tuple[tuple[int, ...], int]]:
  """(option image indices, chosen position) of each choice the entry holds."""
  count = len(entry.get("image_path", entry.get("file_path")))
  name = "human_preference" if "human_preference" in entry else "rank"
  labels = entry[name]
  problem = _integer_list_problem(name, labels, count)
  if problem is not None:
    errors.append(f"{where}: {problem}")
    return []
  if name == "human_preference":
    if sorted(labels) != [0] * (count - 1) + [1]:
      errors.append(
        f"{where}: field 'human_preference': {labels!r}; expected a 0/1 list with "
        f"one 1 for the {count} images"
      )
      return []
    return [(tuple(range(count)), labels.index(1))]
  if sorted(labels) != list(range(1, count + 1)):
    errors.append(f"{where}: field 'rank': {labels!r}; expected a permutation of 1..{count}")
    return []
  order = sorted(range(count), key=lambda i: labels[i])
  return [(tuple(sorted(order[s:])), sorted(order[s:]).index(order[s])) for s in range(count - 1)]


def _hpd_entry_errors(entry, where: str) -> list[str]:
  if not isinstance(entry, dict):
    return [f"{where}: expected a JSON object, got {type(entry).__name__}"]
  unknown = sorted(set(entry) - set(HPD_KEYS))
  errors = [f"{where}: unknown fields {unknown}; known fields {list(HPD_KEYS)}"] if unknown else []
  image_keys = [k for k in ("image_path", "file_path") if k in entry]
  label_keys = [k for k in ("human_preference", "rank") if k in entry]
  if len(image_keys) != 1:
    errors.append(
      f"{where}: field 'image_path': expected exactly one of 'image_path', 'file_path'; found "
      f"{sorted(entry)}"
    )
  elif (
    not isinstance(entry[image_keys[0]], list)
    or len(entry[image_keys[0]]) < 2
    or not all(isinstance(p, str) for p in entry[image_keys[0]])
  ):
    errors.append(f"{where}: field '{image_keys[0]}': expected a list of at least 2 paths")
  if len(label_keys) != 1:
    errors.append(
      f"{where}: field 'human_preference': expected exactly one of 'human_preference', 'rank'; "
      f"found {sorted(entry)}"
    )
  if not isinstance(entry.get("prompt"), str) or not entry.get("prompt", "").strip():
    errors.append(
      f"{where}: field 'prompt': expected a non-empty string, got {entry.get('prompt')!r}"
    )
  return errors


def load_hpd(
  json_path: str, image_dir: str, store: ImageStore, show_progress: bool = True
) -> list[schema.ChoiceRecord]:
  """An HPD v2 annotation file (train or test) as preference records; entry i is user `hpd:<file>:<i>`."""
  try:
    entries = files.read_json(json_path)
  except ValueError as e:
    raise schema.RecordError(str(e)) from None
  if not isinstance(entries, list):
    raise schema.RecordError(
      f"{json_path}: expected a JSON list of entries, got {type(entries).__name__}"
    )
  name = os.path.splitext(os.path.basename(json_path))[0]
  records, errors = [], []
  for i, entry in enumerate(
    progress(entries, f"reading {os.path.basename(json_path)}", show_progress)
  ):
    where = f"{json_path}: entry {i}"
    entry_errors = _hpd_entry_errors(entry, where)
    errors += entry_errors
    if entry_errors:
      continue
    key = "image_path" if "image_path" in entry else "file_path"
    choices = _hpd_choices(entry, where, errors)
    refs = []
    for j, relative in enumerate(entry[key]):
      try:
        refs.append(store_file(store, image_dir, relative, f"{where}: field '{key}[{j}]'"))
      except ValueError as e:
        errors.append(str(e))
    if len(refs) < len(entry[key]):
      continue
    user = f"hpd:{name}:{i}"
    records += [
      _record(user, f"{user}/{s}", entry["prompt"], [refs[k] for k in options], choice)
      for s, (options, choice) in enumerate(choices)
    ]
  schema.raise_if_any(errors)
  return records


# Simulacra Aesthetic Captions.


def _simulacra_tables(db_path: str, connection: sqlite3.Connection) -> None:
  found = [
    name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
  ]
  missing = [t for t in SIMULACRA_TABLES if t not in found]
  if missing:
    raise schema.RecordError(f"{db_path}: missing tables {missing}; found tables {found}")
  for table, columns in SIMULACRA_TABLES.items():
    found_columns = [row[1] for row in connection.execute(f"PRAGMA table_info({table})")]
    _check_columns(f"{db_path}: table '{table}'", found_columns, columns, columns)


_SIMULACRA_QUERY = """
SELECT ratings.rowid, ratings.sid, ratings.iid, ratings.rating, images.gid, generations.prompt, paths.path
FROM ratings
LEFT JOIN images ON images.id = ratings.iid
LEFT JOIN generations ON generations.id = images.gid
LEFT JOIN paths ON paths.iid = ratings.iid
WHERE ratings.rating IS NOT NULL
ORDER BY ratings.rowid
"""


def _simulacra_ratings(db_path: str, errors: list[str]) -> dict[tuple, dict[int, tuple[int, str]]]:
  """{(rater, generation, prompt): {image id: (rating, path)}}, a rater's latest rating of an image."""
  try:
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
      _simulacra_tables(db_path, connection)
      rows = connection.execute(_SIMULACRA_QUERY).fetchall()
    finally:
      connection.close()
  except sqlite3.DatabaseError as e:
    raise schema.RecordError(f"{db_path}: not a readable sqlite database: {e}") from None
  groups = collections.defaultdict(dict)
  for rowid, sid, iid, rating, gid, prompt, path in rows:
    where = f"{db_path}: table 'ratings' row {rowid}"
    if not isinstance(rating, int) or isinstance(rating, bool) or rating not in SIMULACRA_RATINGS:
      errors.append(f"{where}: column 'rating': {rating!r}; expected an integer in 1..10")
    elif gid is None or prompt is None:
      errors.append(f"{where}: column 'iid': image {iid} has no generation or prompt")
    elif path is None:
      errors.append(f"{where}: column 'iid': image {iid} has no row in table 'paths'")
    else:
      groups[(sid, gid, prompt)][iid] = (rating, path)
  return groups


def _simulacra_choices(
  rated: dict[int, tuple[int, str]], mode: str
) -> list[tuple[tuple[int, ...], int]]:
  """(image ids, chosen position) of the comparisons one rater's ratings of one generation give."""
  ids = sorted(rated)
  if mode == "pairwise":
    return [
      ((a, b), int(rated[b][0] > rated[a][0]))
      for i, a in enumerate(ids)
      for b in ids[i + 1 :]
      if rated[a][0] != rated[b][0]
    ]
  ratings = [rated[i][0] for i in ids]
  best = max(ratings)
  return [(tuple(ids), ratings.index(best))] if len(ids) > 1 and ratings.count(best) == 1 else []


def load_simulacra(
  db_path: str,
  image_dir: str,
  store: ImageStore,
  mode: str = "pairwise",
  show_progress: bool = True,
) -> list[schema.ChoiceRecord]:
  """Simulacra Aesthetic Captions ratings as pairwise or k-way preference records (users `sac:<sid>`)."""
  if mode not in SIMULACRA_MODES:
    raise ValueError(f"mode={mode!r}; expected one of {SIMULACRA_MODES}")
  errors = []
  groups = _simulacra_ratings(db_path, errors)
  refs, records = {}, []
  for (sid, gid, prompt), rated in progress(
    sorted(groups.items()), f"reading {os.path.basename(db_path)}", show_progress
  ):
    for ids, choice in _simulacra_choices(rated, mode):
      for iid in ids:
        if iid not in refs:
          where = f"{db_path}: table 'paths' row {iid}: column 'path'"
          try:
            refs[iid] = store_file(store, image_dir, rated[iid][1], where)
          except ValueError as e:
            refs[iid] = None
            errors.append(str(e))
      if all(refs[i] is not None for i in ids):
        records.append(
          _record(
            f"sac:{sid}",
            f"sac:{sid}:{gid}:{'-'.join(map(str, ids))}",
            prompt,
            [refs[i] for i in ids],
            choice,
          )
        )
  schema.raise_if_any(errors)
  return records


# Splits.


@dataclasses.dataclass(frozen=True)
class Splits:
  """Records by split name; `dropped` records would have put a user or prompt into two splits."""

  records: dict[str, list[schema.ChoiceRecord]]
  dropped: int


def prompt_key(record: schema.ChoiceRecord) -> str:
  """The prompt a preference record is about, case- and whitespace-normalised."""
  return " ".join(record.start_prompt.lower().split())


def hash_split(key: str, fractions: Sequence[float] = DEFAULT_FRACTIONS, salt: str = "") -> int:
  """The split index of `key`: a uniform number from sha256(salt, key) cut at the cumulative fractions."""
  u = int.from_bytes(hashlib.sha256(f"{salt}\0{key}".encode()).digest()[:8], "big") / 2.0**64
  total, edge = sum(fractions), 0.0
  for i, fraction in enumerate(fractions):
    edge += fraction / total
    if u < edge:
      return i
  return len(fractions) - 1


def split_records(
  records: Sequence[schema.ChoiceRecord],
  by: str = "user",
  fractions: Sequence[float] = DEFAULT_FRACTIONS,
  salt: str = "",
) -> Splits:
  """Deterministic splits with no user and no prompt in two splits.

  by="user": a record's split is the hash split of its user; a prompt then belongs to the split holding
  most of its records (ties: the earlier split) and its records elsewhere are dropped. by="prompt" swaps
  the roles (for sources whose users are single comparisons, such as HPD v2: nothing is dropped there).
  """
  if (
    by not in ("user", "prompt")
    or len(fractions) != len(SPLITS)
    or min(fractions) < 0
    or sum(fractions) <= 0
  ):
    raise ValueError(
      f"by={by!r}, fractions={tuple(fractions)}; expected by 'user' or 'prompt' and "
      f"{len(SPLITS)} non-negative fractions {SPLITS}"
    )
  keys = [
    (r.user_id, prompt_key(r)) if by == "user" else (prompt_key(r), r.user_id) for r in records
  ]
  split = [hash_split(primary, fractions, salt) for primary, _ in keys]
  votes = collections.defaultdict(collections.Counter)
  for (_, secondary), s in zip(keys, split):
    votes[secondary][s] += 1
  owner = {key: min(counts, key=lambda s: (-counts[s], s)) for key, counts in votes.items()}
  out = {name: [] for name in SPLITS}
  for record, (_, secondary), s in zip(records, keys, split):
    if owner[secondary] == s:
      out[SPLITS[s]].append(record)
  return Splits(records=out, dropped=len(records) - sum(len(v) for v in out.values()))


def write_splits(splits: Splits, output_dir: str, source: str) -> dict:
  """Writes output_dir/<split>.jsonl and data_manifest.json (counts, sha256s); returns the manifest."""
  os.makedirs(output_dir, exist_ok=True)
  entries = {}
  for name, records in splits.records.items():
    path = os.path.join(output_dir, f"{name}.jsonl")
    schema.write_records(path, records)
    entries[name] = {
      "path": f"{name}.jsonl",
      "count": len(records),
      "sha256": files.sha256(path),
      "users": len({r.user_id for r in records}),
      "prompts": len({prompt_key(r) for r in records}),
    }
  manifest = {
    "source": source,
    "splits": entries,
    "dropped": splits.dropped,
    "image_root": os.path.abspath(output_dir),
    "unembedded_row": UNEMBEDDED,
  }
  files.write_json(os.path.join(output_dir, MANIFEST_FILE), manifest)
  return manifest


SOURCES = ("pickapic", "hpd", "simulacra")
DEFAULT_SPLIT_BY = {"pickapic": "user", "hpd": "prompt", "simulacra": "user"}


def load_source(
  source: str,
  inputs: Sequence[str],
  image_dir: str,
  store: ImageStore,
  ties: str = "drop",
  simulacra_mode: str = "pairwise",
) -> list[schema.ChoiceRecord]:
  """Preference records of one source: Pick-a-Pic parquet shards, or one HPD v2 / Simulacra file."""
  if source == "pickapic":
    return load_pickapic(inputs, store, ties)
  if len(inputs) != 1 or not image_dir:
    raise ValueError(
      f"--source={source} reads one --input file and the --images directory; got inputs "
      f"{list(inputs)} and images {image_dir!r}"
    )
  if source == "hpd":
    return load_hpd(inputs[0], image_dir, store)
  return load_simulacra(inputs[0], image_dir, store, simulacra_mode)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  records = load_source(f.source, f.input, f.images, ImageStore(f.output), f.ties, f.simulacra_mode)
  split_by = f.split_by or DEFAULT_SPLIT_BY[f.source]
  manifest = write_splits(split_records(records, by=split_by), f.output, f.source)
  print(files.dumps_json(manifest, indent=2, sort_keys=True))


if __name__ == "__main__":
  flags.DEFINE_enum("source", None, SOURCES, "Which preference set --input holds.")
  flags.DEFINE_multi_string(
    "input", None, "Pick-a-Pic parquet shards, or the HPD JSON / Simulacra sqlite file."
  )
  flags.DEFINE_string("images", "", "The image directory of HPD v2 or Simulacra.")
  flags.DEFINE_string("output", None, "Directory for <split>.jsonl, the manifest and images/.")
  flags.DEFINE_enum(
    "split_by", "", ["", "user", "prompt"], "Primary split key (default: per source)."
  )
  flags.DEFINE_enum("ties", "drop", TIE_MODES, "Pick-a-Pic ties.")
  flags.DEFINE_enum("simulacra_mode", "pairwise", SIMULACRA_MODES, "Simulacra comparisons.")
  flags.mark_flags_as_required(["source", "input", "output"])
  app.run(main)
