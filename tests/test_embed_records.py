"""Filling the feature rows of loaded records through CLIP and the content-addressed cache."""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from pasta_jax import parallel
from pasta_jax.data import schema
from pasta_jax.embed import cache, clip
from pasta_jax.embed import records as embed_records
from tests import test_clip, test_embed_cache

SPEC = schema.RecordSpec(categories=("style", "creative"), slate_size=2, images_per_option=2)


@pytest.fixture(scope="module")
def tower(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("clip"))
  test_clip.write_tiny_clip(directory)
  return clip.load_clip(directory, parallel.make_mesh())


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  """A folder of 6 PNGs and two turns of one session referencing them (rows -1, as loaders write them)."""
  root = tmp_path_factory.mktemp("release")
  (root / "images").mkdir()
  for i, array in enumerate(test_clip.random_images(6, seed=7)):
    (root / "images" / f"{i}.png").write_bytes(test_embed_cache.png_bytes(array))

  def option(text, category, first):
    return schema.Option(
      text=text,
      category=category,
      text_row=-1,
      images=tuple(schema.Image(ref=f"images/{first + m}.png", row=-1) for m in range(2)),
    )

  turns = [
    schema.ChoiceRecord(
      kind=schema.SESSION_TURN,
      user_id="r1",
      session_id="r1-0",
      turn=0,
      start_prompt="a cat",
      options=(option("a cat, watercolor", "style", 0), option("a cat astronaut", "creative", 2)),
      choice=1,
    ),
    schema.ChoiceRecord(
      kind=schema.SESSION_TURN,
      user_id="r1",
      session_id="r1-0",
      turn=1,
      start_prompt="a cat astronaut",
      options=(option("a cat astronaut, oil", "style", 4), option("a cat, watercolor", "style", 0)),
      choice=0,
    ),
  ]
  return str(root), turns


def test_records_get_rows_of_their_own_features(tower, release, tmp_path):
  root, turns = release
  with cache.FeatureStore(str(tmp_path / "cache")) as store:
    embedded, table = embed_records.embed_records(
      turns, tower, store, root, "fixture", show_progress=False
    )
  schema.validate_records(embedded, SPEC, "fixture", table)
  assert table.image.shape == (6, tower.dim) and table.text.shape == (4, tower.dim)
  texts = ["a cat", "a cat, watercolor", "a cat astronaut", "a cat astronaut, oil"]
  ids, mask = tower.tokenize(texts)
  direct_text = np.asarray(tower.embed_texts(ids, mask))
  for r in embedded:
    assert (
      table.text[r.start_text_row].tolist() == direct_text[texts.index(r.start_prompt)].tolist()
    )
    for o in r.options:
      np.testing.assert_allclose(
        table.text[o.text_row], direct_text[texts.index(o.text)], atol=1e-6
      )
  pixels = tower.preprocess_images(
    [PIL.Image.open(f"{root}/images/{i}.png").convert("RGB") for i in range(6)]
  )
  direct_image = np.asarray(tower.embed_images(pixels))
  for r in embedded:
    for o in r.options:
      for im in o.images:
        np.testing.assert_allclose(table.image[im.row], direct_image[int(im.ref[7:-4])], atol=1e-6)
  assert embedded[1].options[1] == embedded[0].options[0]  # The same prompt and images share rows.
  assert [dataclasses.replace(r, options=(), start_text_row=-1) for r in embedded] == [
    dataclasses.replace(r, options=()) for r in turns
  ]


def test_a_second_pass_reads_everything_from_the_cache(tower, release, tmp_path, monkeypatch):
  root, turns = release
  with cache.FeatureStore(str(tmp_path / "cache")) as store:
    first, table = embed_records.embed_records(
      turns, tower, store, root, "fixture", show_progress=False
    )
    computed, real = [], cache._embed

    def spy(*args, **kwargs):
      result = real(*args, **kwargs)
      computed.append(result.num_computed)
      return result

    monkeypatch.setattr(cache, "_embed", spy)
    again, table_again = embed_records.embed_records(
      turns, tower, store, root, "fixture", show_progress=False
    )
  assert computed == [0, 0]
  assert again == first
  np.testing.assert_array_equal(table_again.image, table.image)


def test_missing_files_and_uris_name_the_record_and_field(tower, release, tmp_path):
  root, turns = release
  broken = dataclasses.replace(
    turns[1],
    options=(
      dataclasses.replace(
        turns[1].options[0],
        images=(schema.Image("gs://bucket/x.png", -1), schema.Image("images/missing.png", -1)),
      ),
      turns[1].options[1],
    ),
  )
  with cache.FeatureStore(str(tmp_path / "cache")) as store:
    with pytest.raises(schema.RecordError) as info:
      embed_records.embed_records(
        [turns[0], broken], tower, store, root, "rater.csv", show_progress=False
      )
  message = str(info.value)
  assert re.search(
    r"rater\.csv: record 1 \(user 'r1', session 'r1-0', turn 1\): field 'options\[0\]\.images\[0\]\.ref'"
    r": 'gs://bucket/x.png' is a URI",
    message,
  )
  assert "field 'options[0].images[1].ref': 'images/missing.png' no file" in message


def test_the_cli_fills_the_rows_of_a_records_file(tower, release, tmp_path):
  root, turns = release
  root = shutil.copytree(root, tmp_path / "release")
  checkpoint = str(tmp_path / "clip")
  test_clip.write_tiny_clip(checkpoint)
  records_path = str(root / "turns.jsonl")
  schema.write_records(records_path, turns)
  out = str(tmp_path / "out")
  command = [
    sys.executable,
    "-m",
    "pasta_jax.embed",
    f"--checkpoint={checkpoint}",
    f"--records={records_path}",
    f"--cache={tmp_path / 'cache'}",
    f"--output={out}",
  ]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  assert result.returncode == 0, result.stderr
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary == {
    "records": 2,
    "images": 6,
    "texts": 4,
    "model_id": tower.model_id,
    "dim": tower.dim,
    "output": out,
  }
  with cache.FeatureStore(str(tmp_path / "direct")) as store:
    expected, expected_table = embed_records.embed_records(
      turns, tower, store, str(root), "fixture", show_progress=False
    )
  assert schema.read_records(os.path.join(out, "records.jsonl")) == expected
  table = schema.load_features(os.path.join(out, "features.npz"), tower.dim)
  np.testing.assert_allclose(table.image, expected_table.image, atol=1e-6)
  np.testing.assert_allclose(table.text, expected_table.text, atol=1e-6)
  os.remove(root / "images" / "5.png")
  failed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
  assert failed.returncode != 0
  assert re.search(
    r"turns\.jsonl: record 1 .* field 'options\[0\]\.images\[1\]\.ref': 'images/5\.png' no file",
    failed.stderr,
  )


@pytest.mark.parametrize(
  "ref", ["../outside.png", "images/../../outside.png", "ABSOLUTE", "link/0.png"]
)
def test_a_reference_outside_the_image_root_names_the_record_and_field(release, tmp_path, ref):
  root, turns = release
  root = shutil.copytree(root, tmp_path / "release")
  (tmp_path / "elsewhere").mkdir()
  shutil.copy(root / "images" / "0.png", tmp_path / "outside.png")
  shutil.copy(root / "images" / "0.png", tmp_path / "elsewhere" / "0.png")
  (root / "link").symlink_to(tmp_path / "elsewhere")
  ref = str(tmp_path / "outside.png") if ref == "ABSOLUTE" else ref
  option = turns[1].options[1]
  broken = dataclasses.replace(
    turns[1],
    options=(
      turns[1].options[0],
      dataclasses.replace(option, images=(schema.Image(ref, -1),) + option.images[1:]),
    ),
  )
  with pytest.raises(schema.RecordError) as info:
    embed_records.image_files([turns[0], broken], str(root), "turns.jsonl")
  message = str(info.value)
  assert message.startswith(
    "turns.jsonl: record 1 (user 'r1', session 'r1-0', turn 1): "
    f"field 'options[1].images[0].ref': {ref!r} resolves to "
  ), message
  assert "outside" in message and len(message.splitlines()) == 1, message


def test_an_absolute_reference_inside_the_image_root_is_kept(release):
  root, turns = release
  absolute = os.path.join(root, "images", "0.png")
  option = turns[0].options[0]
  moved = dataclasses.replace(
    turns[0],
    options=(dataclasses.replace(option, images=(schema.Image(absolute, -1),) + option.images[1:]),)
    + turns[0].options[1:],
  )
  paths = embed_records.image_files([moved], root, "turns.jsonl")
  assert paths[absolute] == os.path.realpath(absolute)
