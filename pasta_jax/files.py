"""File writes that replace their target only once the new content is complete; JSON and .npz files;
digests.

In a job of several JAX processes only process 0 (`parallel.is_leader`) replaces a target: the
others write to a private scratch file that is removed, so every shared file is written once."""

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from pasta_jax import parallel

KIND_NAMES = {
  "b": "booleans",
  "i": "signed integers",
  "u": "unsigned integers",
  "f": "floats",
  "c": "complex numbers",
  "m": "timedeltas",
  "M": "datetimes",
  "O": "Python objects",
  "S": "byte strings",
  "U": "strings",
  "V": "raw bytes",
}
_NPZ_READ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile)


class OutsideRoot(ValueError):
  """A file reference that resolves outside the folder it must stay in; the message names where."""


def resolve_inside(root: str, ref: str, where: str) -> str:
  """The real path of `ref` (relative to `root`, or absolute) when it lies inside `root`.

  Symlinks of both are resolved (`os.path.realpath`) before the check, so neither `../` nor a link
  can lead out. Raises OutsideRoot "<where>: <ref> resolves to <path>, outside <root>" otherwise.
  """
  if "\0" in ref:
    raise OutsideRoot(f"{where}: {ref!r} holds a NUL character; expected a path under {root}")
  real_root = os.path.realpath(root)
  path = os.path.realpath(os.path.join(real_root, ref))
  if os.path.commonpath([real_root, path]) != real_root:
    raise OutsideRoot(f"{where}: {ref!r} resolves to {path}, outside {real_root}")
  return path


@contextlib.contextmanager
def replacing(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside `path` (ending in `suffix`, for writers that add an extension,
  e.g. ".npz"); renames it over `path` when the block completes and removes it when the block
  raises. On a process other than the leader it yields a scratch path and leaves `path` alone."""
  if not parallel.is_leader():
    scratch = tempfile.mkdtemp(prefix="pasta_not_leader_")
    try:
      yield os.path.join(scratch, f"{os.path.basename(path)}.tmp{suffix}")
    finally:
      shutil.rmtree(scratch, ignore_errors=True)
    return
  tmp = f"{path}.tmp{suffix}"
  try:
    yield tmp
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  os.replace(tmp, path)


def write_bytes(path: str, data: bytes) -> None:
  with replacing(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  with replacing(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def json_ready(obj: Any) -> Any:
  """A copy of `obj` that strict JSON can hold: NaN and ±inf floats become None, NumPy scalars
  and arrays become Python numbers and lists, tuples become lists, at any depth."""
  if isinstance(obj, dict):
    return {_json_key(k): json_ready(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_ready(v) for v in obj]
  if isinstance(obj, (np.ndarray, np.generic)):
    return json_ready(obj.tolist())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def _json_key(key: Any) -> Any:
  return key.item() if isinstance(key, np.generic) else key


def dumps_json(obj: Any, **kwargs) -> str:
  """`json.dumps` of `json_ready(obj)` with `allow_nan=False`; `kwargs` go to `json.dumps`."""
  return json.dumps(json_ready(obj), allow_nan=False, **kwargs)


def write_json(path: str, obj: Any) -> None:
  """Strict JSON (non-finite floats written as null), indented, keys sorted, newline-terminated."""
  write_text(path, dumps_json(obj, indent=2, sort_keys=True) + "\n")


def _failure(path: str, problem: str, remedy: str) -> str:
  return f"{path}: {problem}; {remedy}" if remedy else f"{path}: {problem}"


def unique_keys(pairs: list[tuple[str, Any]]) -> dict:
  """`object_pairs_hook` for `json.load`: a dict; ValueError naming duplicated keys."""
  obj = dict(pairs)
  if len(obj) < len(pairs):
    duplicated = sorted({key for key, _ in pairs if sum(k == key for k, _ in pairs) > 1})
    raise ValueError(f"duplicated keys {duplicated}")
  return obj


def read_json(path: str, remedy: str = "") -> Any:
  """The JSON value in `path`.

  A missing or unreadable file, invalid UTF-8, malformed or truncated JSON, duplicated keys or
  absurd nesting raise ValueError naming the file, followed by `remedy` (what to re-run).
  """
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f, object_pairs_hook=unique_keys)
  except (OSError, ValueError, RecursionError) as e:
    problem = (
      "JSON nested too deeply" if isinstance(e, RecursionError) else f"{type(e).__name__}: {e}"
    )
    raise ValueError(_failure(path, f"cannot be read as JSON ({problem})", remedy)) from e


def parse_json_lines(
  path: str, parse: Callable[[bytes], Any], catch: tuple[type[Exception], ...]
) -> tuple[list[tuple[int, Any]], list[str], int]:
  """Parses every non-blank line of the JSON Lines file `path`: ([(line number, parse(line bytes))],
  ["path: line N: message" of every line whose `parse` raised one of `catch`], lines read). Raises
  OSError when the file cannot be read."""
  parsed, errors, line_no = [], [], 0
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, start=1):
      if not raw.strip():
        continue
      try:
        parsed.append((line_no, parse(raw)))
      except catch as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        errors.append(f"{path}: line {line_no}: {message}")
  return parsed, errors, line_no


def why_empty(lines: int) -> str:
  """Why a JSON Lines file of `lines` lines yielded nothing: "the file is empty" or "... holds only
  blank lines (lines 1..N)"."""
  return (
    "the file is empty" if lines == 0 else f"the file holds only blank lines (lines 1..{lines})"
  )


def sha256(path: str) -> str:
  """Hex sha256 of the file's bytes."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def save_npz(path: str, **arrays) -> None:
  """`np.savez` that replaces `path` only once every array is written."""
  with replacing(path, ".npz") as tmp:
    np.savez(tmp, **arrays)


def _read_npz(path: str, names: Sequence[str], remedy: str) -> dict[str, np.ndarray]:
  """The arrays `names`, loaded without pickle; ValueError naming the file and the failing array."""
  try:
    loaded = np.load(path, allow_pickle=False)
  except _NPZ_READ_ERRORS as e:
    raise ValueError(_failure(path, f"cannot be read as .npz ({e})", remedy)) from e
  if not isinstance(loaded, np.lib.npyio.NpzFile):
    problem = f"it is one .npy array of shape {loaded.shape}, not an archive of named arrays"
    raise ValueError(_failure(path, f"cannot be read as .npz ({problem})", remedy))
  with loaded as z:
    missing = [name for name in names if name not in z.files]
    if missing:
      problem = f"arrays {missing} are missing (found {sorted(z.files)})"
      raise ValueError(_failure(path, problem, remedy))
    arrays = {}
    for name in names:
      try:
        arrays[name] = z[name]
      except _NPZ_READ_ERRORS as e:
        raise ValueError(_failure(path, f"array '{name}' cannot be read ({e})", remedy)) from e
  return arrays


def _array_problems(
  name: str, array: np.ndarray, kinds: str | None, width: int | None, finite: bool
) -> list[str]:
  """What is wrong with one array against the checks asked for."""
  kind = array.dtype.kind
  if kinds is not None and kind not in kinds:
    expected = " or ".join(KIND_NAMES[k] for k in kinds)
    return [f"array '{name}' holds {KIND_NAMES[kind]} ({array.dtype}); expected {expected}"]
  problems = []
  if width is not None and (array.ndim != 2 or array.shape[1] != width):
    problems.append(f"array '{name}' has shape {array.shape}; expected (rows, {width})")
  if finite and kind in "fc":
    bad = np.argwhere(~np.isfinite(array))
    if bad.size:
      at = tuple(int(i) for i in bad[0])
      where = f"row {at[0]}, column {at[1]}" if array.ndim == 2 else f"index {at}"
      problems.append(
        f"array '{name}' has {len(bad)} non-finite values, first at {where} ({array[at]})"
      )
  return problems


def load_npz(
  path: str,
  names: Sequence[str],
  remedy: str,
  *,
  kinds: str | None = None,
  width: int | None = None,
  finite: bool = False,
) -> dict[str, np.ndarray]:
  """The arrays `names` of an .npz file, loaded without pickle.

  Raises ValueError naming the file and the array, followed by `remedy` (what to re-run), for a
  missing, truncated or corrupt file, a pickle or a lone .npy array instead of an .npz archive, a
  missing array or an object array, and where asked for: a dtype kind outside `kinds` (NumPy kind
  letters, e.g. "f" for floats, "iu" for integers), a shape other than (rows, `width`), non-finite
  values (`finite`).
  """
  arrays = _read_npz(path, names, remedy)
  problems = [
    problem
    for name in names
    for problem in _array_problems(name, arrays[name], kinds, width, finite)
  ]
  if problems:
    raise ValueError(_failure(path, "; ".join(problems), remedy))
  return arrays
