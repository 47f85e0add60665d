"""Content-addressed feature cache: embeds only new content, survives reopening, reports corruption."""

import ast
import inspect
import io
import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from pasta_jax import parallel
from pasta_jax.embed import cache, clip
from tests import test_clip


class CountingTower:
  """A ClipTower that counts the rows it embeds."""

  def __init__(self, tower):
    self.tower = tower
    self.images = 0
    self.texts = 0

  def __getattr__(self, name):
    return getattr(self.tower, name)

  def embed_images(self, pixels):
    self.images += len(pixels)
    return self.tower.embed_images(pixels)

  def embed_texts(self, token_ids, mask):
    self.texts += len(token_ids)
    return self.tower.embed_texts(token_ids, mask)


def png_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("clip"))
  test_clip.write_tiny_clip(directory)
  return directory


@pytest.fixture(scope="module")
def tower(checkpoint):
  return clip.load_clip(checkpoint, parallel.make_mesh())


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("images")
  for i, array in enumerate(test_clip.random_images(5, seed=3)):
    (directory / f"{i}.png").write_bytes(png_bytes(array))
  (directory / "notes.txt").write_text("not an image")
  return str(directory)


def test_cached_content_is_not_embedded_again(tower, image_dir, tmp_path):
  paths = cache.image_files(image_dir)
  with open(paths[0], "rb") as f:
    items = paths[:3] + [f.read(), paths[0]]
  counting = CountingTower(tower)
  with cache.FeatureStore(str(tmp_path)) as store:
    first = cache.embed_images(counting, store, items, batch_size=2, show_progress=False)
    assert first.num_computed == 3 and counting.images == 3
    again = cache.embed_images(counting, store, items, show_progress=False)
    assert again.num_computed == 0 and counting.images == 3
    more = cache.embed_images(counting, store, paths, show_progress=False)
    assert more.num_computed == 2 and counting.images == 5
  expected = tower.embed_images(tower.preprocess_images([PIL.Image.open(p) for p in paths]))
  np.testing.assert_allclose(first.features, expected[[0, 1, 2, 0, 0]], atol=1e-6)
  np.testing.assert_array_equal(again.features, first.features)
  np.testing.assert_array_equal(more.features[:3], first.features[:3])
  assert first.keys[0] == first.keys[3] == cache.content_key(items[3])
  with cache.FeatureStore(str(tmp_path)) as reopened:
    np.testing.assert_array_equal(
      reopened.get(tower.model_id, cache.IMAGE, more.keys), more.features
    )
    assert reopened.missing(tower.model_id, cache.TEXT, more.keys) == more.keys


def test_texts_are_keyed_by_their_utf8_bytes(tower, tmp_path):
  counting = CountingTower(tower)
  texts = ["the cat", "a sea", "the cat", "café"]
  with cache.FeatureStore(str(tmp_path)) as store:
    first = cache.embed_texts(counting, store, texts, show_progress=False)
    again = cache.embed_texts(counting, store, texts[::-1], show_progress=False)
    empty = cache.embed_texts(counting, store, [], show_progress=False)
  assert counting.texts == first.num_computed == 3 and again.num_computed == 0
  np.testing.assert_allclose(first.features, tower.embed_texts(*tower.tokenize(texts)), atol=1e-6)
  np.testing.assert_array_equal(again.features, first.features[::-1])
  assert first.keys[0] == cache.content_key(b"the cat") and empty.features.shape == (
    0,
    tower.dim,
  )


@pytest.fixture
def filled(tower, tmp_path):
  """A cache holding three text rows: (store directory, keys)."""
  with cache.FeatureStore(str(tmp_path)) as store:
    return str(tmp_path), cache.embed_texts(tower, store, ["a", "b", "c"], show_progress=False).keys


def _read(tower, directory, keys):
  with cache.FeatureStore(directory) as store:
    return store.get(tower.model_id, cache.TEXT, keys)


def test_a_truncated_features_file_is_reported_with_path_and_key(tower, filled):
  directory, keys = filled
  path = os.path.join(directory, f"{tower.model_id}.f32")
  os.truncate(path, os.path.getsize(path) - 5)
  np.testing.assert_equal(_read(tower, directory, keys[:2]).shape, (2, tower.dim))
  with pytest.raises(
    cache.CacheCorruption, match=f"{path}: text key {keys[2]} .*row 2.*past the end .*2 rows"
  ):
    _read(tower, directory, keys)


def test_a_row_that_does_not_match_its_checksum_is_reported(tower, filled):
  directory, keys = filled
  path = os.path.join(directory, f"{tower.model_id}.f32")
  with open(path, "r+b") as f:
    f.seek(tower.dim * 4 + 3)
    f.write(b"\x7f")
  with pytest.raises(
    cache.CacheCorruption, match=f"{path}: text key {keys[1]} .*checksum does not match"
  ):
    _read(tower, directory, keys)


def test_an_index_row_past_the_end_or_a_missing_file_is_reported(tower, filled):
  directory, keys = filled
  with sqlite3.connect(os.path.join(directory, cache.INDEX_FILE)) as db:
    db.execute("UPDATE rows SET row = 7 WHERE key = ?", (keys[0],))
  with pytest.raises(
    cache.CacheCorruption, match=f"text key {keys[0]} .*row 7.*past the end of the file"
  ):
    _read(tower, directory, keys)
  os.remove(os.path.join(directory, f"{tower.model_id}.f32"))
  with pytest.raises(cache.CacheCorruption, match="features file of model .* is missing"):
    _read(tower, directory, keys[1:])
  with pytest.raises(KeyError, match="no text features"):
    _read(tower, directory, ["0" * 64])


def test_unreadable_images_are_named(tower, image_dir, tmp_path):
  with cache.FeatureStore(str(tmp_path)) as store:
    with pytest.raises(cache.ImageError, match="notes.txt: not a readable image"):
      cache.embed_images(tower, store, [os.path.join(image_dir, "notes.txt")], show_progress=False)
    with pytest.raises(cache.ImageError, match="3 bytes with sha256"):
      cache.embed_images(tower, store, [b"abc"], show_progress=False)


def test_the_cli_embeds_a_folder_of_images(checkpoint, tower, image_dir, tmp_path):
  out = str(tmp_path / "cache")
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pasta_jax.embed",
      f"--checkpoint={checkpoint}",
      f"--images={image_dir}",
      f"--cache={out}",
      "--batch_size=4",
    ],
    capture_output=True,
    text=True,
    check=False,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr
  assert "embed images:" in result.stderr  # The progress bar.
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary == {
    "images": 5,
    "embedded": 5,
    "cached": 0,
    "model_id": tower.model_id,
    "dim": tower.dim,
    "cache": out,
  }
  paths = cache.image_files(image_dir)
  with cache.FeatureStore(out) as store:
    rerun = cache.embed_images(CountingTower(tower), store, paths, show_progress=False)
  assert rerun.num_computed == 0
  both = subprocess.run(
    [
      sys.executable,
      "-m",
      "pasta_jax.embed",
      f"--checkpoint={checkpoint}",
      f"--images={image_dir}",
      f"--records={image_dir}/r.jsonl",
      f"--cache={out}",
    ],
    capture_output=True,
    text=True,
    check=False,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert (
    both.returncode != 0
    and "give either --images=DIR, or --records=FILE.jsonl with --output=DIR" in both.stderr
  )


def test_the_cache_imports_neither_the_records_module_nor_the_command_line():
  tree = ast.parse(inspect.getsource(cache))
  imported = {
    alias.name
    for node in ast.walk(tree)
    if isinstance(node, (ast.Import, ast.ImportFrom))
    for alias in node.names
  }
  assert not imported & {"records", "app", "flags"}, imported
