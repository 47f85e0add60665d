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
from typing import Iterable, Sequence

import numpy as np

from pasta_jax import files, types

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
  """What valid records look like for one run."""

  categories: tuple[str, ...]
  slate_size: int
  images_per_option: int

  @classmethod
  def from_config(cls, config) -> "RecordSpec":
    it = config.interaction
    return cls(tuple(it.categories), it.slate_size, it.images_per_prompt)


def record_to_json(record: ChoiceRecord) -> dict:
  return dataclasses.asdict(record)


def record_from_json(obj: dict) -> ChoiceRecord:
  """Builds a record from its JSON form; raises KeyError/TypeError/ValueError naming the field."""
  _require_object(obj, "record")
  options = []
  for i, opt in enumerate(_field(obj, "options", list)):
    field = f"options[{i}]"
    _require_object(opt, field)
    images = []
    for j, image in enumerate(_field(opt, "images", list, field)):
      _require_object(image, f"{field}.images[{j}]")
      images.append(Image(ref=_field(image, "ref", str, f"{field}.images[{j}]"),
                          row=_field(image, "row", int, f"{field}.images[{j}]")))
    options.append(Option(text=_field(opt, "text", str, field), category=_field(opt, "category", str, field),
                          text_row=_field(opt, "text_row", int, field), images=tuple(images)))
  user_type = obj.get("user_type")
  if user_type is not None and not isinstance(user_type, int):
    raise TypeError(f"field 'user_type': expected int or null, got {user_type!r}")
  return ChoiceRecord(kind=_field(obj, "kind", str), user_id=_field(obj, "user_id", str),
                      session_id=_field(obj, "session_id", str), turn=_field(obj, "turn", int),
                      start_prompt=_field(obj, "start_prompt", str), options=tuple(options),
                      choice=_field(obj, "choice", int), user_type=user_type,
                      start_text_row=obj.get("start_text_row", -1))


def _require_object(value, field: str) -> None:
  if not isinstance(value, dict):
    raise TypeError(f"field '{field}': expected a JSON object, got {type(value).__name__}")


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
      f.write(json.dumps(record_to_json(record), separators=(",", ":")) + "\n")


def read_records(path: str) -> list[ChoiceRecord]:
  """Reads JSON Lines; a malformed line raises RecordError naming the file, line and field."""
  records, errors = [], []
  with open(path) as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        records.append(record_from_json(json.loads(line)))
      except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) else str(e)
        errors.append(f"{path}: line {line_no}: {message}")
  raise_if_any(errors)
  return records


def validate_records(records: Sequence[ChoiceRecord], spec: RecordSpec, source: str,
                     table: types.FeatureTable | None = None) -> None:
  """Checks every record and every session; raises RecordError listing each problem found.

  Checks: known kind and category, slate size, images per option, choice in range, rows inside the
  feature table, one user per session, no duplicate (session, turn), turns 0..n-1 in order.
  """
  errors = []
  categories = set(spec.categories)
  n_img = None if table is None else table.image.shape[0]
  n_txt = None if table is None else table.text.shape[0]
  sessions = collections.defaultdict(list)
  session_user = {}
  for i, r in enumerate(records):
    where = f"{source}: record {i} (user {r.user_id!r}, session {r.session_id!r}, turn {r.turn})"
    fail = lambda field, msg: errors.append(f"{where}: field '{field}': {msg}")  # noqa: E731
    if r.kind not in KINDS:
      fail("kind", f"unknown kind {r.kind!r}; expected one of {KINDS}")
      continue
    if r.kind == SESSION_TURN and len(r.options) != spec.slate_size:
      fail("options", f"slate has {len(r.options)} options; expected {spec.slate_size}")
    if r.kind == PREFERENCE and len(r.options) < 2:
      fail("options", f"a preference needs at least 2 options, got {len(r.options)}")
    if not 0 <= r.choice < len(r.options):
      fail("choice", f"{r.choice} is out of range for {len(r.options)} options")
    for j, opt in enumerate(r.options):
      allowed = categories if r.kind == SESSION_TURN else {PREFERENCE_CATEGORY}
      if opt.category not in allowed:
        fail(f"options[{j}].category", f"unknown category {opt.category!r}; expected one of {sorted(allowed)}")
      if r.kind == SESSION_TURN and len(opt.images) != spec.images_per_option:
        fail(f"options[{j}].images", f"{len(opt.images)} images; expected {spec.images_per_option}")
      if n_txt is not None and not 0 <= opt.text_row < n_txt:
        fail(f"options[{j}].text_row", f"row {opt.text_row} outside the text table of {n_txt} rows")
      for m, image in enumerate(opt.images):
        if n_img is not None and not 0 <= image.row < n_img:
          fail(f"options[{j}].images[{m}].row", f"row {image.row} outside the image table of {n_img} rows")
    if n_txt is not None and not -1 <= r.start_text_row < n_txt:
      fail("start_text_row", f"row {r.start_text_row} outside the text table of {n_txt} rows (-1: not embedded)")
    if session_user.setdefault(r.session_id, r.user_id) != r.user_id:
      fail("session_id", f"session also belongs to user {session_user[r.session_id]!r}")
    sessions[r.session_id].append((i, r.turn))
  for session_id, turns in sessions.items():
    seen = [t for _, t in turns]
    first_record = {}
    for i, t in turns:
      if t in first_record:
        errors.append(f"{source}: record {i} (session {session_id!r}): field 'turn': duplicate turn {t} "
                      f"(first at record {first_record[t]})")
      first_record.setdefault(t, i)
    if len(first_record) < len(turns):
      continue
    for (i, t), expected in zip(turns, range(len(turns))):
      if t != expected:
        errors.append(f"{source}: record {i} (session {session_id!r}): field 'turn': turn {t} where turn "
                      f"{expected} was expected (turns missing or out of order: {seen})")
        break
  raise_if_any(errors)


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
      errors.append(f"{source}: field '{name}': {len(bad)} non-finite values, first at row {row}, "
                    f"column {col} ({array[row, col]})")
  raise_if_any(errors)


def raise_if_any(errors: list[str]) -> None:
  if errors:
    shown = errors[:MAX_REPORTED_ERRORS]
    more = len(errors) - len(shown)
    raise RecordError("\n".join(shown + ([f"... and {more} more"] if more else [])))


def save_features(path: str, table: types.FeatureTable) -> None:
  files.save_npz(path, image=np.asarray(table.image), text=np.asarray(table.text))


def load_features(path: str, dim: int) -> types.FeatureTable:
  with np.load(path) as z:
    missing = {"image", "text"} - set(z.files)
    if missing:
      raise RecordError(f"{path}: fields {sorted(missing)} are missing; found {sorted(z.files)}")
    table = types.FeatureTable(image=z["image"].astype(np.float32), text=z["text"].astype(np.float32))
  validate_features(table, dim, path)
  return table


@dataclasses.dataclass(frozen=True)
class UserIndex:
  """The users of a `Choices` batch: row u holds user `ids[u]`; `types[u]` is planted truth or -1."""

  ids: tuple[str, ...]
  types: np.ndarray


def to_choices(records: Sequence[ChoiceRecord], spec: RecordSpec,
               user_ids: Sequence[str] | None = None) -> tuple[types.Choices, UserIndex]:
  """Pads validated records into per-user arrays (NumPy); see `types.Choices` for the shapes.

  A user's turns are all of their records in file order (sessions concatenated). L is the largest
  slate (smaller slates are masked); every option must have the same number of images M.
  """
  by_user = collections.defaultdict(list)
  for r in records:
    by_user[r.user_id].append(r)
  ids = tuple(user_ids) if user_ids is not None else tuple(by_user)
  num_users = len(ids)
  max_turns = max((len(by_user[u]) for u in ids), default=1)
  max_options = max((len(r.options) for r in records), default=spec.slate_size)
  image_counts = {len(o.images) for r in records for o in r.options} or {spec.images_per_option}
  if len(image_counts) != 1:
    raise RecordError(f"field 'options[].images': options have different image counts {sorted(image_counts)}; "
                      "one batch needs one M")
  (max_images,) = image_counts
  category_index = {c: i for i, c in enumerate(spec.categories + (PREFERENCE_CATEGORY,))}

  image_rows = np.zeros((num_users, max_turns, max_options, max_images), np.int32)
  text_rows = np.zeros((num_users, max_turns, max_options), np.int32)
  category = np.zeros((num_users, max_turns, max_options), np.int32)
  choice = np.zeros((num_users, max_turns), np.int32)
  option_mask = np.zeros((num_users, max_turns, max_options), bool)
  turn_mask = np.zeros((num_users, max_turns), bool)
  user_types = np.full((num_users,), -1, np.int32)
  for u, user_id in enumerate(ids):
    for t, r in enumerate(by_user[user_id]):
      for j, opt in enumerate(r.options):
        image_rows[u, t, j] = [im.row for im in opt.images]
        text_rows[u, t, j] = opt.text_row
        category[u, t, j] = category_index[opt.category]
        option_mask[u, t, j] = True
      choice[u, t] = r.choice
      turn_mask[u, t] = True
      if r.user_type is not None:
        user_types[u] = r.user_type
  choices = types.Choices(image_rows=image_rows, text_rows=text_rows, category=category, choice=choice,
                          option_mask=option_mask, turn_mask=turn_mask,
                          user_index=np.arange(num_users, dtype=np.int32))
  return choices, UserIndex(ids=ids, types=user_types)


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
      image_rows=pad(choices.image_rows, 0), text_rows=pad(choices.text_rows, 0),
      category=pad(choices.category, 0), choice=pad(choices.choice, 0),
      option_mask=pad(choices.option_mask, False), turn_mask=pad(choices.turn_mask, False),
      user_index=pad(choices.user_index, -1))
