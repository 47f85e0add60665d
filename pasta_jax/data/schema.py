"""Canonical choice records: one schema for multi-turn PASTA sessions and single-turn preferences.

A record is one choice: a user saw `options` (a slate of prompts, each rendered into images) and chose
one. A multi-turn session is the records sharing a `session_id`, turns 0..H-1 in order. A pairwise or
k-way preference (Pick-a-Pic style) is a one-turn record of kind "preference". Records live in JSON
Lines files; the features they reference live in a `FeatureTable` (`features.npz`).
"""

import collections
import dataclasses
import json
import math
from collections.abc import Iterable, Sequence

import numpy as np

from pasta_jax import files, parallel, types

SESSION_TURN = "session_turn"
PREFERENCE = "preference"
KINDS = (SESSION_TURN, PREFERENCE)
PREFERENCE_CATEGORY = "none"
MAX_REPORTED_ERRORS = 20


class RecordError(ValueError):
  """Invalid records; the message names the file, record and field of every problem found."""


@dataclasses.dataclass(frozen=True)
class Image:
  ref: str  # A file path, URI or content hash of the rendered image.
  row: int  # Row of `FeatureTable.image`; -1 when not embedded yet.


@dataclasses.dataclass(frozen=True)
class Option:
  text: str
  category: str
  text_row: int  # Row of `FeatureTable.text`; -1 when not embedded yet.
  images: tuple[Image, ...]


@dataclasses.dataclass(frozen=True)
class ChoiceRecord:
  kind: str
  user_id: str
  session_id: str
  turn: int
  start_prompt: str  # The prompt this turn started from.
  options: tuple[Option, ...]
  choice: int
  user_type: int | None = None  # Planted or simulated type, where known.
  start_text_row: int = -1  # Row of `FeatureTable.text` for start_prompt; -1 when not embedded.


@dataclasses.dataclass(frozen=True)
class RecordSpec:
  """What valid records look like for one run.

  A spec with session `categories` describes session data; one without describes preference data.
  `num_types`: user types are 0..num_types - 1 (None: any non-negative type).
  """

  categories: tuple[str, ...]
  slate_size: int
  images_per_option: int
  num_types: int | None = None

  @classmethod
  def from_config(cls, config, num_types: int | None = None) -> "RecordSpec":
    """The spec of `config.interaction`; user types below `num_types`, by default the planted
    world's type count on synthetic data (real data has no known type count)."""
    it = config.interaction
    if num_types is None and config.data.source == "synthetic":
      num_types = config.world.num_types
    return cls(tuple(it.categories), it.slate_size, it.images_per_prompt, num_types)


def record_to_json(record: ChoiceRecord) -> dict:
  return dataclasses.asdict(record)


def record_from_json(obj: dict) -> ChoiceRecord:
  """Builds a record from its JSON form; raises KeyError/TypeError/ValueError naming the field.

  Types are exact (an int is never a bool or a float); unknown keys and, for objects parsed with
  `_JsonObject.from_pairs`, duplicated keys are errors.
  """
  _require_object(obj, "", ChoiceRecord)
  options = []
  for i, opt in enumerate(_field(obj, "options", list)):
    field = f"options[{i}]"
    _require_object(opt, field, Option)
    images = []
    for j, image in enumerate(_field(opt, "images", list, field)):
      _require_object(image, f"{field}.images[{j}]", Image)
      images.append(
        Image(
          ref=_field(image, "ref", str, f"{field}.images[{j}]"),
          row=_field(image, "row", int, f"{field}.images[{j}]"),
        )
      )
    options.append(
      Option(
        text=_field(opt, "text", str, field),
        category=_field(opt, "category", str, field),
        text_row=_field(opt, "text_row", int, field),
        images=tuple(images),
      )
    )
  user_type = obj.get("user_type")
  if user_type is not None and (not _is_int(user_type) or user_type < 0):
    raise TypeError(f"field 'user_type': expected a non-negative int or null, got {user_type!r}")
  start_text_row = obj.get("start_text_row", -1)
  if not _is_int(start_text_row):
    raise TypeError(f"field 'start_text_row': expected int, got {start_text_row!r}")
  return ChoiceRecord(
    kind=_field(obj, "kind", str),
    user_id=_field(obj, "user_id", str),
    session_id=_field(obj, "session_id", str),
    turn=_field(obj, "turn", int),
    start_prompt=_field(obj, "start_prompt", str),
    options=tuple(options),
    choice=_field(obj, "choice", int),
    user_type=user_type,
    start_text_row=start_text_row,
  )


class _JsonObject(dict):
  """A parsed JSON object that remembers its duplicated keys."""

  duplicates: tuple[str, ...] = ()

  @classmethod
  def from_pairs(cls, pairs: list[tuple[str, object]]) -> "_JsonObject":
    """`object_pairs_hook` for `json.loads`."""
    obj = cls(pairs)
    if len(obj) < len(pairs):
      keys = [key for key, _ in pairs]
      obj.duplicates = tuple(sorted({key for key in keys if keys.count(key) > 1}))
    return obj


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _require_object(value, field: str, form: type) -> None:
  """Checks that `value` is a JSON object with the keys of the dataclass `form`, each once."""
  if not isinstance(value, dict):
    kind = type(value).__name__
    raise TypeError(f"field '{field or 'record'}': expected a JSON object, got {kind}")
  prefix = f"{field}." if field else ""
  for key in getattr(value, "duplicates", ()):
    raise ValueError(f"field '{prefix}{key}': duplicated key")
  known = [f.name for f in dataclasses.fields(form)]
  for key in value:
    if key not in known:
      raise ValueError(f"field '{prefix}{key}': unknown key; expected keys {known}")


def _field(obj: dict, name: str, kind: type, parent: str = ""):
  path = f"{parent}.{name}" if parent else name
  if name not in obj:
    raise KeyError(f"field '{path}' is missing")
  value = obj[name]
  if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
    raise TypeError(f"field '{path}': expected {kind.__name__}, got {value!r}")
  return value


def write_records(path: str, records: Iterable[ChoiceRecord]) -> None:
  """Writes JSON Lines atomically (a temp file renamed over `path`)."""
  with files.replacing(path) as tmp, open(tmp, "w") as f:
    for record in records:
      f.write(json.dumps(record_to_json(record), separators=(",", ":"), allow_nan=False) + "\n")


def _parse_line(raw: bytes) -> ChoiceRecord:
  """One JSON Lines line as a record; ValueError, KeyError or TypeError naming the field."""
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"invalid UTF-8 at byte {e.start} of the line") from None
  try:
    obj = json.loads(text, object_pairs_hook=_JsonObject.from_pairs)
  except RecursionError:
    raise ValueError("JSON nested too deeply") from None
  return record_from_json(obj)


def read_records(path: str) -> list[ChoiceRecord]:
  """Reads JSON Lines (blank lines skipped).

  Raises RecordError naming the file, the line and the field of every malformed line (invalid
  UTF-8 or JSON, absurd nesting, unknown or duplicated keys, missing fields, wrong types), and for a
  file that cannot be read or holds no record.
  """
  try:
    parsed, errors, lines = files.parse_json_lines(
      path, _parse_line, (KeyError, TypeError, ValueError)
    )
  except OSError as e:
    raise RecordError(f"{path}: cannot be read: {e}") from None
  raise_if_any(errors)
  if not parsed:
    raise RecordError(f"{path}: line {max(lines, 1)}: no records; {files.why_empty(lines)}")
  return [record for _, record in parsed]


def allowed_kinds(spec: RecordSpec, allow_preferences: bool = False) -> tuple[str, ...]:
  """The record kinds data of `spec` may hold: preferences only for a spec without categories,
  session turns (and preferences where allowed) otherwise."""
  if not spec.categories:
    return (PREFERENCE,)
  return KINDS if allow_preferences else (SESSION_TURN,)


def validate_records(
  records: Sequence[ChoiceRecord],
  spec: RecordSpec,
  source: str,
  table: types.FeatureTable | None = None,
  allow_preferences: bool = False,
) -> None:
  """Checks every record and every session; raises RecordError listing each problem found.

  Checks: a kind that fits the data (`allowed_kinds`), known category, a session turn's slate of
  2..L options (fewer than L: options were unavailable) and 1..M images per option, choice in
  range, rows inside the feature table (or -1 without one), user type below `spec.num_types`, one
  user per session, one user type (or null) per user, no duplicate
  (session, turn), turns 0..n-1 in order.
  """
  errors = []
  kinds = allowed_kinds(spec, allow_preferences)
  rows = (None, None) if table is None else (table.image.shape[0], table.text.shape[0])
  sessions = collections.defaultdict(list)
  session_user, user_type = {}, {}
  for i, r in enumerate(records):
    where = f"{source}: record {i} (user {r.user_id!r}, session {r.session_id!r}, turn {r.turn})"
    problems = _record_problems(r, spec, kinds, *rows)
    if r.kind in kinds:
      if session_user.setdefault(r.session_id, r.user_id) != r.user_id:
        problems.append(
          ("session_id", f"session also belongs to user {session_user[r.session_id]!r}")
        )
      elif user_type.setdefault(r.user_id, (i, r.user_type))[1] != r.user_type:
        first, first_type = user_type[r.user_id]
        problems.append(
          (
            "user_type",
            f"{r.user_type!r} differs from the user's type {first_type!r} at record {first}",
          )
        )
      sessions[r.session_id].append((i, r.turn))
    errors += [f"{where}: field '{field}': {message}" for field, message in problems]
  for session_id, turns in sessions.items():
    seen = [t for _, t in turns]
    first_record = {}
    for i, t in turns:
      if t in first_record:
        errors.append(
          f"{source}: record {i} (session {session_id!r}): field 'turn': duplicate turn {t} "
          f"(first at record {first_record[t]})"
        )
      first_record.setdefault(t, i)
    if len(first_record) < len(turns):
      continue
    for (i, t), expected in zip(turns, range(len(turns))):
      if t != expected:
        errors.append(
          f"{source}: record {i} (session {session_id!r}): field 'turn': turn {t} where turn "
          f"{expected} was expected (turns missing or out of order: {seen})"
        )
        break
  raise_if_any(errors)


def _record_problems(
  r: ChoiceRecord, spec: RecordSpec, kinds: tuple[str, ...], n_img: int | None, n_txt: int | None
) -> list[tuple[str, str]]:
  """(field, message) of each problem one record has on its own (a kind outside `kinds` alone)."""
  if r.kind not in kinds:
    hint = (
      "; pass allow_preferences=True to mix preferences into session data"
      if r.kind == PREFERENCE and spec.categories
      else ""
    )
    return [("kind", f"kind {r.kind!r} does not fit this data; expected one of {kinds}{hint}")]
  problems = []
  if r.kind == SESSION_TURN and not 2 <= len(r.options) <= spec.slate_size:
    problems.append(
      ("options", f"slate has {len(r.options)} options; expected 2..{spec.slate_size}")
    )
  if r.kind == PREFERENCE and len(r.options) < 2:
    problems.append(("options", f"a preference needs at least 2 options, got {len(r.options)}"))
  if not 0 <= r.choice < len(r.options):
    problems.append(("choice", f"{r.choice} is out of range for {len(r.options)} options"))
  allowed = set(spec.categories) if r.kind == SESSION_TURN else {PREFERENCE_CATEGORY}
  for j, opt in enumerate(r.options):
    if opt.category not in allowed:
      problems.append(
        (
          f"options[{j}].category",
          f"unknown category {opt.category!r}; expected one of {sorted(allowed)}",
        )
      )
    if r.kind == SESSION_TURN and not 1 <= len(opt.images) <= spec.images_per_option:
      problems.append(
        (
          f"options[{j}].images",
          f"{len(opt.images)} images; expected 1..{spec.images_per_option}",
        )
      )
    problems.append((f"options[{j}].text_row", _row_problem(opt.text_row, n_txt, "text", True)))
    problems += [
      (f"options[{j}].images[{m}].row", _row_problem(image.row, n_img, "image", True))
      for m, image in enumerate(opt.images)
    ]
  problems.append(("start_text_row", _row_problem(r.start_text_row, n_txt, "text", False)))
  problems.append(("user_type", _type_problem(r.user_type, spec.num_types)))
  return [(field, message) for field, message in problems if message is not None]


def _type_problem(user_type: int | None, num_types: int | None) -> str | None:
  """What is wrong with a user type: null (unknown) or 0..num_types - 1 (any non-negative type
  where `num_types` is None)."""
  if user_type is None or (user_type >= 0 and (num_types is None or user_type < num_types)):
    return None
  expected = "a non-negative type" if num_types is None else f"0..{num_types - 1}"
  return f"type {user_type} is out of range; expected {expected} or null"


def _row_problem(row: int, num_rows: int | None, name: str, embedded: bool) -> str | None:
  """What is wrong with a feature row: without a table only -1 (not embedded) or >= 0; with one,
  a row of the table (or -1 where `embedded` is not required)."""
  if num_rows is None:
    return None if row >= -1 else f"row {row}; expected -1 (not embedded) or a row index"
  lowest = 0 if embedded else -1
  if lowest <= row < num_rows:
    return None
  unembedded = "" if embedded else " (-1: not embedded)"
  return f"row {row} outside the {name} table of {num_rows} rows{unembedded}"


def validate_features(table: types.FeatureTable, dim: int, source: str) -> None:
  """Checks feature width and finiteness; raises RecordError naming the table, row and column."""
  errors = []
  for name in ("image", "text"):
    array = np.asarray(getattr(table, name))
    if array.ndim != 2 or array.shape[1] != dim:
      errors.append(f"{source}: field '{name}': shape {array.shape}; expected (rows, {dim})")
      continue
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
      row, col = bad[0]
      errors.append(
        f"{source}: field '{name}': {len(bad)} non-finite values, first at row {row}, "
        f"column {col} ({array[row, col]})"
      )
  raise_if_any(errors)


def raise_if_any(errors: list[str]) -> None:
  if errors:
    shown = errors[:MAX_REPORTED_ERRORS]
    more = len(errors) - len(shown)
    raise RecordError("\n".join(shown + ([f"... and {more} more"] if more else [])))


def save_features(path: str, table: types.FeatureTable) -> None:
  files.save_npz(path, image=np.asarray(table.image), text=np.asarray(table.text))


def load_features(
  path: str, dim: int, remedy: str = "re-run the stage that wrote it"
) -> types.FeatureTable:
  """The float32 feature table in `path`; RecordError naming the file and the array (and `remedy`)
  for an unreadable file, missing arrays, non-float arrays, a width other than `dim`, non-finite
  values, or float64 values beyond float32's range."""
  try:
    arrays = files.load_npz(path, ("image", "text"), remedy, kinds="f", width=dim, finite=True)
  except ValueError as e:
    raise RecordError(str(e)) from None
  with np.errstate(over="ignore"):
    table = types.FeatureTable(
      image=arrays["image"].astype(np.float32), text=arrays["text"].astype(np.float32)
    )
  validate_features(table, dim, path)
  return table


@dataclasses.dataclass(frozen=True)
class UserIndex:
  """The users of a `Choices` batch: row u holds user `ids[u]`; `types[u]` is planted truth or -1."""

  ids: tuple[str, ...]
  types: np.ndarray


def history_lengths(records: Sequence[ChoiceRecord], user_ids: Sequence[str]) -> np.ndarray:
  """i64[U]: each listed user's number of records (choices)."""
  counts = collections.Counter(r.user_id for r in records)
  return np.asarray([counts[u] for u in user_ids], np.int64)


def row_length(lengths: np.ndarray, turns_per_row: int = 0) -> int:
  """Turns per row of `to_choices` for users with histories of `lengths` choices: `turns_per_row`
  when positive, else the 95th percentile of the lengths (rounded up), so that 19 users in 20 fit
  one row and only the longest histories are split over several rows."""
  if turns_per_row > 0:
    return turns_per_row
  if lengths.size == 0:
    return 1
  return max(1, int(np.ceil(np.percentile(lengths, 95, method="higher"))))


def _user_rows(
  by_user: dict[str, list], ids: Sequence[str], turns_per_row: int
) -> Iterable[tuple[int, int, list]]:
  """(row, user position, that row's slice of the user's items in order): user u's items cut into
  ceil(n_u / turns_per_row) consecutive rows (one row for a user without items)."""
  row = 0
  for u, user_id in enumerate(ids):
    items = by_user[user_id]
    for start in range(0, max(len(items), 1), turns_per_row):
      yield row, u, items[start : start + turns_per_row]
      row += 1


def slate_dims(records: Sequence[ChoiceRecord], spec: RecordSpec) -> tuple[int, int]:
  """(L, M): the largest slate and the most images of an option among `records` (the spec's when
  there are none): the padded option and image axes of `to_choices`."""
  max_options = max((len(r.options) for r in records), default=spec.slate_size)
  max_images = max(
    (len(o.images) for r in records for o in r.options), default=spec.images_per_option
  )
  return max_options, max_images


def fill_rows(
  rows: Sequence[tuple[int, Sequence[ChoiceRecord]]],
  spec: RecordSpec,
  num_turns: int,
  max_options: int,
  max_images: int,
) -> types.Choices:
  """`types.Choices` (NumPy) of `rows`, each (the row's `user_index`, its records in order: at most
  `num_turns`, slates of at most `max_options` options of at most `max_images` images); a row of
  user -1 is padding. Smaller slates, options and rows are padded (row 0) and masked."""
  category_index = {c: i for i, c in enumerate(spec.categories + (PREFERENCE_CATEGORY,))}
  num_rows = len(rows)
  image_rows = np.zeros((num_rows, num_turns, max_options, max_images), np.int32)
  text_rows = np.zeros((num_rows, num_turns, max_options), np.int32)
  category = np.zeros((num_rows, num_turns, max_options), np.int32)
  choice = np.zeros((num_rows, num_turns), np.int32)
  option_mask = np.zeros((num_rows, num_turns, max_options), bool)
  image_mask = np.zeros((num_rows, num_turns, max_options, max_images), bool)
  turn_mask = np.zeros((num_rows, num_turns), bool)
  user_index = np.zeros((num_rows,), np.int32)
  for row, (u, user_records) in enumerate(rows):
    user_index[row] = u
    for t, r in enumerate(user_records):
      for j, opt in enumerate(r.options):
        image_rows[row, t, j, : len(opt.images)] = [im.row for im in opt.images]
        image_mask[row, t, j, : len(opt.images)] = True
        text_rows[row, t, j] = opt.text_row
        category[row, t, j] = category_index[opt.category]
        option_mask[row, t, j] = True
      choice[row, t] = r.choice
      turn_mask[row, t] = True
  return types.Choices(
    image_rows=image_rows,
    text_rows=text_rows,
    category=category,
    choice=choice,
    option_mask=option_mask,
    turn_mask=turn_mask,
    user_index=user_index,
    image_mask=image_mask,
  )


def to_choices(
  records: Sequence[ChoiceRecord],
  spec: RecordSpec,
  user_ids: Sequence[str] | None = None,
  turns_per_row: int | None = None,
) -> tuple[types.Choices, UserIndex]:
  """Lays validated records out as rows of turns (NumPy); see `types.Choices` for the shapes.

  A user's turns are all of their records in file order (sessions concatenated), cut into rows of
  T = `turns_per_row` turns (None: the longest history, one row per user): a user with n_u choices
  fills ceil(n_u / T) consecutive rows, each with `user_index` u (the user's position in the
  returned `UserIndex`), so a long history costs rows in proportion to its length instead of
  setting T for everyone. L and M are `slate_dims(records, spec)`; see `fill_rows` for the padding.
  """
  by_user = collections.defaultdict(list)
  for r in records:
    by_user[r.user_id].append(r)
  ids = tuple(user_ids) if user_ids is not None else tuple(by_user)
  longest = max((len(by_user[u]) for u in ids), default=1)
  max_turns = longest if turns_per_row is None else turns_per_row
  rows = [(u, user_records) for _, u, user_records in _user_rows(by_user, ids, max_turns)]
  choices = fill_rows(rows, spec, max_turns, *slate_dims(records, spec))
  return choices, UserIndex(ids=ids, types=planted_types(by_user, ids))


def planted_types(by_user: dict[str, Sequence[ChoiceRecord]], ids: Sequence[str]) -> np.ndarray:
  """i32[U]: the planted `user_type` of each listed user (from the records that have one), -1 for
  users without one."""
  user_types = np.full((len(ids),), -1, np.int32)
  for u, user_id in enumerate(ids):
    for r in by_user[user_id]:
      if r.user_type is not None:
        user_types[u] = r.user_type
  return user_types


def session_turns(
  records: Sequence[ChoiceRecord], user_ids: Sequence[str], num_turns: int
) -> np.ndarray:
  """i32[R, T]: the `turn` (within its session) of every turn slot of `to_choices(records, spec,
  user_ids, turns_per_row=T)` with T = `num_turns` (0 on padded slots)."""
  by_user = collections.defaultdict(list)
  for r in records:
    by_user[r.user_id].append(r)
  return row_turns(
    [(u, rows) for _, u, rows in _user_rows(by_user, user_ids, num_turns)], num_turns
  )


def row_turns(rows: Sequence[tuple[int, Sequence[ChoiceRecord]]], num_turns: int) -> np.ndarray:
  """i32[R, T]: the `turn` (within its session) of every turn slot of `fill_rows(rows, ...)` with
  T = `num_turns` (0 on padded slots)."""
  out = np.zeros((len(rows), num_turns), np.int32)
  for row, (_, records) in enumerate(rows):
    out[row, : len(records)] = [r.turn for r in records]
  return out


def _host_rows(choices: types.Choices) -> tuple[np.ndarray, np.ndarray]:
  """(bool[R] the real rows, i[R] each row's user segment, `types.Choices.user_segments`) on the
  host, from `user_index` alone (gathered to every process when `choices` is a global array)."""
  index = parallel.host_array(choices.user_index)
  indexed = choices.replace(user_index=index)
  return index >= 0, np.asarray(indexed.user_segments())


def user_slots(choices: types.Choices) -> np.ndarray:
  """bool[R]: the slots of per-user arrays (`em.per_user`, slot u holding the u-th user in row
  order) that hold a user: the first U."""
  real, segments = _host_rows(choices)
  slots = np.zeros(real.shape[0], bool)
  slots[segments[real]] = True
  return slots


def per_user_sum(values: np.ndarray, choices: types.Choices) -> np.ndarray:
  """f[U, ...]: `values` f[R, ...] of every row summed over each user's rows, users in row order
  (host-side `em.per_user`, restricted to the real users)."""
  real, segments = _host_rows(choices)
  values = np.asarray(values)
  out = np.zeros((int(len(np.unique(segments[real]))),) + values.shape[1:], values.dtype)
  np.add.at(out, segments[real], values[real])
  return out


def pad_users(choices: types.Choices, multiple: int) -> types.Choices:
  """Appends masked users (user_index -1) so that U is a multiple of `multiple`."""
  num_users = choices.num_users
  padded = multiple * max(1, math.ceil(num_users / multiple))
  extra = padded - num_users
  if extra == 0:
    return choices

  def pad(x, fill):
    x = np.asarray(x)
    return np.concatenate([x, np.full((extra,) + x.shape[1:], fill, x.dtype)])

  return types.Choices(
    image_rows=pad(choices.image_rows, 0),
    text_rows=pad(choices.text_rows, 0),
    category=pad(choices.category, 0),
    choice=pad(choices.choice, 0),
    option_mask=pad(choices.option_mask, False),
    turn_mask=pad(choices.turn_mask, False),
    user_index=pad(choices.user_index, -1),
    image_mask=None if choices.image_mask is None else pad(choices.image_mask, False),
  )
