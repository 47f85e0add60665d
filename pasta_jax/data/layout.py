"""The training and held-out users' records in array_record shards, laid out so that each process of
a job reads only the records of the rows its own devices hold.

The data stage writes, under data/shards/, each split's records in row order (the split's users in
order, each user's records in file order, as `schema.to_choices` lays them out) as
`<split>-0000i-of-0000n.array_record` files (`io.write_shards`; a user's records stay in one file),
and layout.json: per split the users, their numbers of choices and planted types, the turns per row
T (`schema.row_length`), the padded slate sizes L and M (`schema.slate_dims`) and each file with its
number of records. From the layout alone every process knows which records each row of the split
holds. A process reads, by random access through grain, the records of its own block of rows
(`parallel.process_rows`), and `parallel.global_users` joins the blocks into global arrays. The rows
are the same whatever the number of processes, so every sum over users is too
(`parallel.device_sums`).
"""

import dataclasses
import glob
import math
import os
from collections.abc import Sequence

import grain.python as grain
import jax
import numpy as np

from pasta_jax import files, parallel, types
from pasta_jax.data import io, schema

LAYOUT = "layout.json"
DEFAULT_SHARDS = 8  # Files per split (`config.data.shards`), at most one per user.
SPLITS = ("train", "heldout")
REMEDY = "re-run the data stage"


@dataclasses.dataclass(frozen=True)
class SplitLayout:
  """One split's users and where their records lie.

  users: ids in row order; choices: i64[U] each user's number of records; types: i32[U] planted
  types (-1: none); turns_per_row: T; max_options, max_images: L and M of the rows; paths: the shard
  files in order, holding the split's records in row order; file_records: the records in each.
  """

  users: tuple[str, ...]
  choices: np.ndarray
  types: np.ndarray
  turns_per_row: int
  max_options: int
  max_images: int
  paths: tuple[str, ...]
  file_records: tuple[int, ...]

  @property
  def user_index(self) -> schema.UserIndex:
    return schema.UserIndex(ids=self.users, types=self.types)

  @property
  def num_rows(self) -> int:
    """R: each user fills ceil(n_u / T) rows (one for a user without records)."""
    return int(np.sum(self._rows_per_user()))

  def _rows_per_user(self) -> np.ndarray:
    return np.maximum(1, -(-self.choices // self.turns_per_row))

  def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i64[R] each row's user position, i64[R] the position of its first record in the split's
    record order, i64[R] its number of records)."""
    per_user = self._rows_per_user()
    user = np.repeat(np.arange(len(self.users)), per_user)
    within = np.arange(user.size) - (np.cumsum(per_user) - per_user)[user]
    first_record = np.cumsum(self.choices) - self.choices
    start = first_record[user] + within * self.turns_per_row
    count = np.clip(self.choices[user] - within * self.turns_per_row, 0, self.turns_per_row)
    return user, start, count


def write(
  directory: str,
  records: Sequence[schema.ChoiceRecord],
  spec: schema.RecordSpec,
  splits: dict[str, Sequence[str]],
  turns_per_row: int,
  num_shards: int,
) -> None:
  """Writes each split's records in row order as at most `num_shards` shards (no more than its users)
  and `layout.json` under `directory` (removing shards of an earlier layout); T is
  `schema.row_length(lengths, turns_per_row)` of each split; layout.json also lists the distinct
  start prompts of every session (`start_prompts`). Process 0 alone calls it."""
  os.makedirs(directory, exist_ok=True)
  by_user = {}
  for r in records:
    by_user.setdefault(r.user_id, []).append(r)
  max_options, max_images = schema.slate_dims(records, spec)
  entry = {
    "max_options": max_options,
    "max_images": max_images,
    "start_prompts": sorted({r.start_prompt for r in records if r.turn == 0}),
    "splits": {},
  }
  for split, users in splits.items():
    ordered = [r for user in users for r in by_user[user]]
    shards = min(num_shards, len(users))
    paths = io.write_shards(os.path.join(directory, split), ordered, shards) if users else []
    for stale in set(glob.glob(os.path.join(directory, f"{split}-*.array_record"))) - set(paths):
      os.remove(stale)
    counts = np.bincount(io.user_shards(ordered, shards), minlength=shards) if users else []
    lengths = schema.history_lengths(records, users)
    entry["splits"][split] = {
      "users": list(users),
      "choices": lengths.tolist(),
      "types": schema.planted_types(by_user, users).tolist(),
      "turns_per_row": schema.row_length(lengths, turns_per_row),
      "files": [{"name": os.path.basename(p), "records": int(n)} for p, n in zip(paths, counts)],
    }
  files.write_json(os.path.join(directory, LAYOUT), entry)


def _field(obj, name: str, kind: type, where: str):
  """obj[name] of type `kind` (an int field takes no bool); else a RecordError naming the field."""
  value = obj.get(name) if isinstance(obj, dict) else None
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    found = value if isinstance(obj, dict) else obj
    raise schema.RecordError(
      f"{where}: field '{name}': expected {kind.__name__}, got {found!r}; {REMEDY}"
    )
  return value


def _count(obj, name: str, where: str, at_least: int) -> int:
  """An int field of at least `at_least`; else a RecordError naming the field."""
  value = _field(obj, name, int, where)
  if value < at_least:
    raise schema.RecordError(f"{where}: field '{name}': {value} < {at_least}; {REMEDY}")
  return value


def _counts(obj, name: str, where: str, at_least: int, length: int) -> np.ndarray:
  """i64[length]: a list field of ints of at least `at_least`; else a RecordError naming it."""
  values = _field(obj, name, list, where)
  if len(values) != length:
    raise schema.RecordError(
      f"{where}: field '{name}': {len(values)} entries for {length} users; {REMEDY}"
    )
  for i, value in enumerate(values):
    if not isinstance(value, int) or isinstance(value, bool) or value < at_least:
      raise schema.RecordError(
        f"{where}: field '{name}', entry {i}: expected an int >= {at_least}, got {value!r}; {REMEDY}"
      )
  return np.asarray(values, np.int64)


def load(directory: str) -> dict[str, SplitLayout]:
  """{split: SplitLayout} from `directory/layout.json`; RecordError naming the file and the field of
  a missing or malformed entry."""
  path = os.path.join(directory, LAYOUT)
  entry = files.read_json(path, remedy=REMEDY)
  if not isinstance(entry, dict):
    raise schema.RecordError(f"{path}: expected a JSON object, got {entry!r}; {REMEDY}")
  dims = [_count(entry, name, path, 1) for name in ("max_options", "max_images")]
  splits = _field(entry, "splits", dict, path)
  out = {}
  for split in SPLITS:
    where = f"{path}: splits.{split}"
    one = _field(splits, split, dict, f"{path}: splits")
    users = _field(one, "users", list, where)
    listed = _field(one, "files", list, where)
    for i, f in enumerate(listed):
      if not isinstance(f, dict):
        raise schema.RecordError(
          f"{where}: field 'files', entry {i}: expected an object with 'name' and 'records', "
          f"got {f!r}; {REMEDY}"
        )
    out[split] = SplitLayout(
      users=tuple(users),
      choices=_counts(one, "choices", where, 0, len(users)),
      types=_counts(one, "types", where, -1, len(users)).astype(np.int32),
      turns_per_row=_count(one, "turns_per_row", where, 1),
      max_options=dims[0],
      max_images=dims[1],
      paths=tuple(os.path.join(directory, _field(f, "name", str, where)) for f in listed),
      file_records=tuple(_count(f, "records", where, 0) for f in listed),
    )
    if sum(out[split].file_records) != int(out[split].choices.sum()):
      raise schema.RecordError(
        f"{where}: field 'files': {sum(out[split].file_records)} records for the users' "
        f"{int(out[split].choices.sum())} choices; {REMEDY}"
      )
  return out


def start_prompts(directory: str) -> list[str]:
  """The distinct start prompts of every user's sessions, sorted, from `directory/layout.json`;
  RecordError naming the file and the field when they are missing or not strings."""
  path = os.path.join(directory, LAYOUT)
  prompts = _field(files.read_json(path, remedy=REMEDY), "start_prompts", list, path)
  if not all(isinstance(p, str) for p in prompts):
    raise schema.RecordError(f"{path}: field 'start_prompts': expected strings; {REMEDY}")
  return prompts


def _file_bounds(layout: SplitLayout) -> tuple[np.ndarray, np.ndarray]:
  """(i64[F] the position of each file's first record in the split's record order, i64[F] the
  position after its last)."""
  ends = np.cumsum(layout.file_records, dtype=np.int64)
  return ends - np.asarray(layout.file_records, np.int64), ends


def _where(layout: SplitLayout, position: int) -> str:
  """'<file>: record <i>' of the split's record at `position` (in row order)."""
  begins, ends = _file_bounds(layout)
  shard = int(np.searchsorted(ends, position, side="right"))
  return f"{layout.paths[shard]}: record {position - begins[shard]}"


def _read_file(path: str, expected: int, positions: range) -> list[schema.ChoiceRecord]:
  """The records at `positions` of the shard `path` (of `expected` records), by random access."""
  try:
    source = grain.ArrayRecordDataSource([path])
    if len(source) != expected:
      raise ValueError(f"{len(source)} records where the layout has {expected}")
    raw = source.__getitems__(positions)
  except Exception as e:  # array_record raises bare RuntimeErrors and ValueErrors.
    raise schema.RecordError(f"{path}: cannot be read as array_record ({e!r}); {REMEDY}") from None
  out = []
  for position, data in zip(positions, raw):
    try:
      out.append(io.decode(data))
    except (KeyError, TypeError, ValueError) as e:
      raise schema.RecordError(f"{path}: record {position}: {e}; {REMEDY}") from None
  return out


def _read(layout: SplitLayout, start: int, stop: int) -> list[schema.ChoiceRecord]:
  """The split's records at positions [start, stop) (row order), from the files that hold them."""
  out = []
  for path, expected, begin, end in zip(layout.paths, layout.file_records, *_file_bounds(layout)):
    first, last = max(start, int(begin)), min(stop, int(end))
    if first < last:
      out += _read_file(path, expected, range(first - int(begin), last - int(begin)))
  return out


def _owned(
  layout: SplitLayout, records: list[schema.ChoiceRecord], first: int, user: int
) -> list[schema.ChoiceRecord]:
  """`records` (the split's from position `first`) unchanged when they are all `user`'s (a
  position in `layout.users`); else a RecordError naming the file, the record and the field."""
  for i, record in enumerate(records):
    if record.user_id != layout.users[user]:
      raise schema.RecordError(
        f"{_where(layout, first + i)}: field 'user_id': {record.user_id!r}, where the layout has "
        f"user {layout.users[user]!r}; {REMEDY}"
      )
  return records


def read_users(layout: SplitLayout, users: slice) -> list[schema.ChoiceRecord]:
  """The records of the split's users [users.start, users.stop) (positions in `layout.users`), in
  row order, reading only theirs (a record of another user is a RecordError, see `read_rows`)."""
  first = np.cumsum(layout.choices) - layout.choices
  chosen = range(len(layout.users))[users]
  if not chosen:
    return []
  begin = int(first[chosen.start])
  records = _read(layout, begin, int(first[chosen.stop - 1] + layout.choices[chosen.stop - 1]))
  out = []
  for u in chosen:
    start = int(first[u]) - begin
    out += _owned(layout, records[start : start + int(layout.choices[u])], int(first[u]), u)
  return out


def read_row_records(
  layout: SplitLayout, rows: slice
) -> list[tuple[int, list[schema.ChoiceRecord]]]:
  """(user position, that row's records in order) of each row [rows.start, rows.stop) of the split,
  as `schema.fill_rows` takes them; rows past its R rows are padding (-1, []). Reads only those
  rows' records; a record of another user than the layout says is a RecordError naming the file,
  the record and the field."""
  user, start, count = layout.rows()
  real = range(rows.start, min(rows.stop, user.size))
  first = int(start[real.start]) if real else 0
  records = _read(layout, first, int(start[real.stop - 1] + count[real.stop - 1]) if real else 0)
  out = []
  for r in real:
    own = records[start[r] - first : start[r] - first + count[r]]
    out.append((int(user[r]), _owned(layout, own, int(start[r]), int(user[r]))))
  return out + [(-1, [])] * (rows.stop - rows.start - len(out))


def fill(
  layout: SplitLayout, spec: schema.RecordSpec, row_records: list[tuple[int, list]]
) -> types.Choices:
  """`schema.fill_rows` of `read_row_records` rows in the split's T, L and M."""
  return schema.fill_rows(
    row_records, spec, layout.turns_per_row, layout.max_options, layout.max_images
  )


def read_rows(layout: SplitLayout, spec: schema.RecordSpec, rows: slice) -> types.Choices:
  """`types.Choices` (NumPy) of rows [rows.start, rows.stop) of the split (`read_row_records`)."""
  return fill(layout, spec, read_row_records(layout, rows))


def user_rows(layout: SplitLayout, users: slice) -> slice:
  """The rows of the split's users [users.start, users.stop) (a user's rows are consecutive)."""
  row_user = layout.rows()[0]
  chosen = range(len(layout.users))[users]
  return slice(
    int(np.searchsorted(row_user, chosen.start)), int(np.searchsorted(row_user, chosen.stop))
  )


def padded_rows(layout: SplitLayout, multiple: int) -> int:
  """The split's rows padded to a multiple of `multiple` (at least one multiple)."""
  return multiple * max(1, math.ceil(layout.num_rows / multiple))


def global_choices(
  layout: SplitLayout, spec: schema.RecordSpec, multiple: int, mesh: jax.sharding.Mesh
) -> types.Choices:
  """The split as global `types.Choices` of `padded_rows(layout, multiple)` rows split over the
  mesh's "data" axis, each process reading only its own block of rows (`read_rows`)."""
  num_rows = padded_rows(layout, multiple)
  local = parallel.together(read_rows, layout, spec, parallel.process_rows(num_rows, mesh))
  return parallel.global_users(local, num_rows, mesh)
