"""File writes that replace their target only once the new content is complete; JSON and .npz files; digests."""

import contextlib
import hashlib
import json
import os
import zipfile
from typing import Any, Iterator, Sequence

import numpy as np


@contextlib.contextmanager
def replacing(path: str, suffix: str = "") -> Iterator[str]:
  """Yields a temporary path beside `path` (ending in `suffix`, for writers that add an extension, e.g.
  ".npz"); renames it over `path` when the block completes and removes it when the block raises."""
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


def write_json(path: str, obj: Any) -> None:
  """Indented, keys sorted, newline-terminated."""
  write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def sha256(path: str) -> str:
  """Hex sha256 of the file's bytes."""
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def save_npz(path: str, **arrays) -> None:
  """`np.savez` that replaces `path` only once every array is written."""
  with replacing(path, ".npz") as tmp:
    np.savez(tmp, **arrays)


def load_npz(path: str, names: Sequence[str], remedy: str) -> dict[str, np.ndarray]:
  """The arrays `names` of an .npz file; a missing file, a truncated or corrupt one, or a missing array raises
  ValueError naming the file and what is missing, followed by `remedy` (what to re-run)."""
  try:
    with np.load(path) as z:
      missing = [name for name in names if name not in z.files]
      if missing:
        raise ValueError(f"{path}: arrays {missing} are missing (found {sorted(z.files)}); {remedy}")
      return {name: z[name] for name in names}
  except (OSError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path}: cannot be read as .npz ({e}); {remedy}") from e
