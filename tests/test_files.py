"""Replacing writes keep the old file until the new one is complete; .npz reads name the file and what is missing."""

import os

import numpy as np
import pytest

from pasta_jax import candidates, files


def test_replacing_keeps_the_old_content_when_the_write_fails(tmp_path):
  path = str(tmp_path / "out.json")
  files.write_json(path, {"b": 1, "a": [2]})
  with open(path) as f:
    assert f.read() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'
  with pytest.raises(RuntimeError, match="disk full"):
    with files.replacing(path) as tmp, open(tmp, "w") as f:
      f.write("half")
      raise RuntimeError("disk full")
  assert files.read_json(path) == {"a": [2], "b": 1}
  assert os.listdir(tmp_path) == ["out.json"]


def test_sha256_of_a_file(tmp_path):
  path = str(tmp_path / "x.bin")
  files.write_bytes(path, b"abc")
  assert files.sha256(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_save_npz_writes_exactly_the_named_path(tmp_path):
  path = str(tmp_path / "a.npz")
  files.save_npz(path, x=np.arange(3), y=np.ones((2, 2), np.float32))
  assert os.listdir(tmp_path) == ["a.npz"]
  loaded = files.load_npz(path, ["y", "x"], "unused")
  np.testing.assert_array_equal(loaded["x"], np.arange(3))
  assert loaded["y"].dtype == np.float32 and loaded["y"].shape == (2, 2)


def test_load_npz_names_the_file_the_missing_arrays_and_the_remedy(tmp_path):
  path = str(tmp_path / "a.npz")
  files.save_npz(path, x=np.arange(3))
  with pytest.raises(ValueError, match=r"a\.npz: arrays \['y'\] are missing \(found \['x'\]\); re-run it"):
    files.load_npz(path, ["x", "y"], "re-run it")


@pytest.mark.parametrize("content", [None, b"", b"PK\x03\x04 truncated"], ids=["missing", "empty", "truncated"])
def test_an_unreadable_pool_names_the_file_and_the_stage_to_run(tmp_path, content):
  path = str(tmp_path / "pool.npz")
  if content is not None:
    with open(path, "wb") as f:
      f.write(content)
  with pytest.raises(ValueError, match=r"pool\.npz: cannot be read as \.npz .*; re-run the simulate stage"):
    candidates.load_generator(path)


def test_a_pool_without_its_vocabulary_is_reported(tmp_path):
  path = str(tmp_path / "pool.npz")
  files.save_npz(path, expansions=np.zeros((1, 1, 25), np.int32))
  with pytest.raises(ValueError, match=r"pool\.npz: arrays \['category', .*'vocabulary', 'image_refs'\] are missing"):
    candidates.load_generator(path)
