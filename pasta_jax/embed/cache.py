"""Content-addressed feature store: (model id, kind, sha256 of the content bytes) -> one feature row.

Layout of a cache directory:
  index.sqlite   tables `models(model_id, dim)` and `rows(model_id, kind, key, row, checksum)`
  <model_id>.f32 the model's rows, f32[rows, dim] little-endian, appended

A batch is appended to the features file (flushed and fsynced) before its index rows are committed in one
transaction, so an interruption never leaves a committed row without its bytes. Every read checks the row
against the features file's length and the row's stored sha256 checksum. An index that sqlite cannot
read (truncated, overwritten) is a `CacheCorruption` naming it, raised when the store is opened or
queried; nothing is deleted.

`embed_folder` embeds a folder of images; its command is `python -m pasta_jax.embed --images=DIR`
(`pasta_jax/embed/__main__.py`).
"""

import contextlib
import dataclasses
import hashlib
import io
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import PIL.Image

from pasta_jax import errors, progress
from pasta_jax.embed import clip

IMAGE = "image"
TEXT = "text"
INDEX_FILE = "index.sqlite"
SQL_BATCH = 500
ROW_DTYPE = np.dtype("<f4")
SCHEMA = """
CREATE TABLE IF NOT EXISTS models (model_id TEXT PRIMARY KEY, dim INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rows (model_id TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL,
                                 row INTEGER NOT NULL, checksum TEXT NOT NULL,
                                 PRIMARY KEY (model_id, kind, key));
"""


CORRUPT_SQLITE_CODES = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


class CacheCorruption(errors.CorruptFileError):
  """A cache entry whose bytes are missing or do not match its checksum, or an index sqlite cannot
  read; names the file (and the key)."""


class ImageError(ValueError):
  """An input that cannot be decoded as an image; names the item."""


def content_key(data: bytes) -> str:
  """sha256 hex digest of the content bytes."""
  return hashlib.sha256(data).hexdigest()


def row_checksum(row: np.ndarray) -> str:
  """sha256 hex digest of a stored f32[D] row's bytes."""
  return hashlib.sha256(np.ascontiguousarray(row, ROW_DTYPE).tobytes()).hexdigest()


def _batches(items: Sequence, size: int) -> list:
  return [items[i : i + size] for i in range(0, len(items), size)]


@contextlib.contextmanager
def corrupt_index(path: str) -> Iterator[None]:
  """Turns sqlite's "file is not a database" and "database disk image is malformed" inside the
  block into a CacheCorruption naming the index file, chained `from` the sqlite error; other sqlite
  errors (a locked database, a full disk) pass unchanged."""
  try:
    yield
  except sqlite3.DatabaseError as e:
    if getattr(e, "sqlite_errorcode", 0) & 0xFF not in CORRUPT_SQLITE_CODES:
      raise
    raise CacheCorruption(
      f"{path}: the sqlite index is truncated or corrupted ({e}); {rebuild_hint(path)}"
    ) from e


def rebuild_hint(index_path: str) -> str:
  """What to do about a corrupt entry of the directory indexed by `index_path`."""
  return f"delete {index_path} and re-run: what it indexed is computed again"


class SqliteDirectory:
  """A directory (created if absent) indexed by a sqlite file with `schema`; a context manager that
  closes it. An index sqlite cannot read is a CacheCorruption naming it."""

  def __init__(self, directory: str, index_file: str, schema: str):
    os.makedirs(directory, exist_ok=True)
    self.directory = directory
    self.index_path = os.path.join(directory, index_file)
    self._db = sqlite3.connect(self.index_path)
    try:
      with corrupt_index(self.index_path):
        self._db.executescript(schema)
    except BaseException:
      self._db.close()
      raise

  def query(self, sql: str, parameters: Sequence = ()) -> list[tuple]:
    """Every row `sql` selects; CacheCorruption naming the index when sqlite cannot read it."""
    with corrupt_index(self.index_path):
      return self._db.execute(sql, parameters).fetchall()

  def close(self) -> None:
    self._db.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class FeatureStore(SqliteDirectory):
  """The feature rows of one cache directory (created if absent); one writer at a time."""

  def __init__(self, directory: str):
    super().__init__(directory, INDEX_FILE, SCHEMA)

  def features_path(self, model_id: str) -> str:
    return os.path.join(self.directory, f"{model_id}.f32")

  def dim(self, model_id: str) -> int | None:
    found = self.query("SELECT dim FROM models WHERE model_id = ?", (model_id,))
    return found[0][0] if found else None

  def lookup(self, model_id: str, kind: str, keys: Sequence[str]) -> dict[str, tuple[int, str]]:
    """{key: (row, checksum)} for the keys that are cached."""
    found = {}
    for batch in _batches(list(set(keys)), SQL_BATCH):
      query = (
        f"SELECT key, row, checksum FROM rows WHERE model_id = ? AND kind = ? AND key IN "
        f"({','.join('?' * len(batch))})"
      )
      rows = self.query(query, (model_id, kind, *batch))
      found.update({key: (row, checksum) for key, row, checksum in rows})
    return found

  def missing(self, model_id: str, kind: str, keys: Sequence[str]) -> list[str]:
    """The keys not cached yet, each once, in first-seen order."""
    cached = self.lookup(model_id, kind, keys)
    return [key for key in dict.fromkeys(keys) if key not in cached]

  def get(self, model_id: str, kind: str, keys: Sequence[str]) -> np.ndarray:
    """f32[N, D] rows of `keys`; KeyError naming a missing key, CacheCorruption on a bad entry."""
    entries = self.lookup(model_id, kind, keys)
    absent = [key for key in keys if key not in entries]
    if absent:
      raise KeyError(
        f"{self.directory}: no {kind} features for model {model_id} and key {absent[0]}"
      )
    dim = self.dim(model_id) or 0
    table = self._rows(model_id, dim) if keys else np.zeros((0, dim), ROW_DTYPE)
    out = np.empty((len(keys), dim), np.float32)
    for i, key in enumerate(keys):
      row, checksum = entries[key]
      where = f"{self.features_path(model_id)}: {kind} key {key} (model {model_id}, row {row})"
      if row >= len(table):
        raise CacheCorruption(
          f"{where}: the index points past the end of the file ({len(table)} rows); "
          f"{rebuild_hint(self.index_path)}"
        )
      if row_checksum(table[row]) != checksum:
        raise CacheCorruption(
          f"{where}: the stored checksum does not match the row's bytes; "
          f"{rebuild_hint(self.index_path)}"
        )
      out[i] = table[row]
    return out

  def _rows(self, model_id: str, dim: int) -> np.ndarray:
    """The features file as f32[rows, dim] (a memory map; trailing partial rows ignored)."""
    path = self.features_path(model_id)
    if not os.path.isfile(path):
      raise CacheCorruption(
        f"{path}: the features file of model {model_id} is missing; {rebuild_hint(self.index_path)}"
      )
    rows = os.path.getsize(path) // (dim * ROW_DTYPE.itemsize)
    if rows == 0:
      return np.zeros((0, dim), ROW_DTYPE)
    return np.memmap(path, ROW_DTYPE, mode="r", shape=(rows, dim))

  def put(self, model_id: str, kind: str, keys: Sequence[str], features: np.ndarray) -> None:
    """Appends f32[N, D] rows for new, distinct `keys` and commits their index entries."""
    features = np.ascontiguousarray(features, ROW_DTYPE)
    if features.ndim != 2 or len(features) != len(keys):
      raise ValueError(f"features of shape {features.shape} for {len(keys)} keys")
    dim = self.dim(model_id)
    if dim is not None and dim != features.shape[1]:
      raise ValueError(
        f"{self.directory}: model {model_id} has {dim}-wide features, got {features.shape[1]}"
      )
    ((end,),) = self.query(
      "SELECT COALESCE(MAX(row) + 1, 0) FROM rows WHERE model_id = ?", (model_id,)
    )
    path = self.features_path(model_id)
    with open(path, "r+b" if os.path.exists(path) else "wb") as f:
      f.seek(end * features.shape[1] * ROW_DTYPE.itemsize)
      f.write(features.tobytes())
      f.truncate()
      f.flush()
      os.fsync(f.fileno())
    with corrupt_index(self.index_path), self._db:
      self._db.execute("INSERT OR IGNORE INTO models VALUES (?, ?)", (model_id, features.shape[1]))
      self._db.executemany(
        "INSERT INTO rows VALUES (?, ?, ?, ?, ?)",
        [
          (model_id, kind, key, end + i, row_checksum(row))
          for i, (key, row) in enumerate(zip(keys, features))
        ],
      )


@dataclasses.dataclass(frozen=True)
class Embedded:
  """features: f32[N, D] in input order; keys: sha256 of each item; num_computed: items embedded now."""

  features: np.ndarray
  keys: list[str]
  num_computed: int


def _embed(
  tower: clip.ClipTower,
  store: FeatureStore,
  kind: str,
  keys: list[str],
  items: Sequence,
  embed_batch: Callable[[list], np.ndarray],
  batch_size: int,
  show_progress: bool,
) -> Embedded:
  """Embeds the items whose keys are not cached (each distinct key once), then reads every row back."""
  first = {}
  for item, key in zip(items, keys):
    first.setdefault(key, item)
  todo = store.missing(tower.model_id, kind, keys)
  for batch in progress.progress(_batches(todo, batch_size), f"embed {kind}s", show_progress):
    store.put(tower.model_id, kind, batch, embed_batch([first[key] for key in batch]))
  features = store.get(tower.model_id, kind, keys) if keys else np.zeros((0, tower.dim), np.float32)
  return Embedded(features=features, keys=keys, num_computed=len(todo))


def _image_bytes(item: str | bytes) -> bytes:
  if isinstance(item, bytes):
    return item
  with open(item, "rb") as f:
    return f.read()


def _decode(item: str | bytes) -> PIL.Image.Image:
  try:
    with PIL.Image.open(io.BytesIO(_image_bytes(item))) as image:
      return image.convert("RGB")
  except OSError as e:
    name = item if isinstance(item, str) else f"{len(item)} bytes with sha256 {content_key(item)}"
    raise ImageError(f"{name}: not a readable image ({e})") from None


def embed_images(
  tower: clip.ClipTower,
  store: FeatureStore,
  images: Sequence[str | bytes],
  batch_size: int = 64,
  show_progress: bool = True,
) -> Embedded:
  """Image features f32[N, D] of image files (paths) or encoded bytes, embedding only uncached content."""

  def embed_batch(batch):
    return tower.embed_images(tower.preprocess_images([_decode(item) for item in batch]))

  keys = [content_key(_image_bytes(item)) for item in images]
  return _embed(tower, store, IMAGE, keys, images, embed_batch, batch_size, show_progress)


def embed_texts(
  tower: clip.ClipTower,
  store: FeatureStore,
  texts: Sequence[str],
  batch_size: int = 256,
  show_progress: bool = True,
) -> Embedded:
  """Text features f32[N, D] (keys: sha256 of the UTF-8 text), embedding only uncached texts."""

  def embed_batch(batch):
    return tower.embed_texts(*tower.tokenize(batch))

  keys = [content_key(text.encode()) for text in texts]
  return _embed(tower, store, TEXT, keys, texts, embed_batch, batch_size, show_progress)


def image_files(directory: str) -> list[str]:
  """Sorted paths of the files in `directory` (not recursive) whose extension PIL can open."""
  extensions = PIL.Image.registered_extensions()
  return sorted(
    os.path.join(directory, name)
    for name in os.listdir(directory)
    if os.path.splitext(name)[1].lower() in extensions
    and os.path.isfile(os.path.join(directory, name))
  )


def embed_folder(
  checkpoint_dir: str, images_dir: str, cache_dir: str, batch_size: int = 64
) -> dict:
  """Embeds every image of a folder into the cache; returns a summary (counts, model id, width)."""
  clip.require_directory(images_dir, "images")
  tower = clip.load_clip(checkpoint_dir)
  paths = image_files(images_dir)
  with FeatureStore(cache_dir) as store:
    result = embed_images(tower, store, paths, batch_size)
  return {
    "images": len(paths),
    "embedded": result.num_computed,
    "cached": len(paths) - result.num_computed,
    "model_id": tower.model_id,
    "dim": tower.dim,
    "cache": os.path.abspath(cache_dir),
  }
