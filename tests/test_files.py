"""Replacing writes keep the old file until the new one is complete; .npz reads name the file and what is missing."""

import io
import json
import os
import pickle
import re

import numpy as np
import pytest
from rich.console import Console

from pasta_jax import candidates, files
from pasta_jax.evaluation import metrics, report


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
  with pytest.raises(
    ValueError, match=r"a\.npz: arrays \['y'\] are missing \(found \['x'\]\); re-run it"
  ):
    files.load_npz(path, ["x", "y"], "re-run it")


@pytest.mark.parametrize(
  "content", [None, b"", b"PK\x03\x04 truncated"], ids=["missing", "empty", "truncated"]
)
def test_an_unreadable_pool_names_the_file_and_the_stage_to_run(tmp_path, content):
  path = str(tmp_path / "pool.npz")
  if content is not None:
    with open(path, "wb") as f:
      f.write(content)
  with pytest.raises(
    ValueError, match=r"pool\.npz: cannot be read as \.npz .*; re-run the simulate stage"
  ):
    candidates.load_generator(path)


def test_a_pool_without_its_vocabulary_is_reported(tmp_path):
  path = str(tmp_path / "pool.npz")
  files.save_npz(path, expansions=np.zeros((1, 1, 25), np.int32))
  with pytest.raises(
    ValueError, match=r"pool\.npz: arrays \['category', .*'vocabulary', 'image_refs'\] are missing"
  ):
    candidates.load_generator(path)


def _strict_loads(text: str):
  """json.loads that refuses NaN and Infinity."""

  def refuse(constant):
    raise ValueError(f"non-standard JSON constant {constant}")

  return json.loads(text, parse_constant=refuse)


def test_json_ready_maps_non_finite_floats_to_null_at_any_depth():
  obj = {
    "a": float("nan"),
    "b": [1.5, float("inf"), {"c": np.float32("-inf")}],
    "d": np.array([1.0, np.nan]),
    "e": (np.int64(3), np.bool_(True)),
    np.int32(4): "key",
  }
  assert files.json_ready(obj) == {
    "a": None,
    "b": [1.5, None, {"c": None}],
    "d": [1.0, None],
    "e": [3, True],
    4: "key",
  }
  assert files.json_ready(float("nan")) is None


def test_write_json_writes_a_report_with_a_nan_metric_as_strict_json(tmp_path):
  path = tmp_path / "report.json"
  metric = {"ari": np.float64("nan"), "ci95": np.array([np.inf, 0.25]), "k": np.int64(4)}
  files.write_json(str(path), metric)
  assert _strict_loads(path.read_text()) == {"ari": None, "ci95": [None, 0.25], "k": 4}


def test_a_report_with_a_nan_metric_is_strict_json(tmp_path):
  estimate = metrics.Estimate(float("nan"), (float("-inf"), 1.0))
  report.write(str(tmp_path), _report(estimate), Console(file=io.StringIO()))
  loaded = _strict_loads((tmp_path / "report.json").read_text())
  assert loaded["user_model"]["ari_vs_planted"] is None
  assert loaded["agent"]["iql"]["ci95"] == [None, 1.0]


def _report(estimate: "metrics.Estimate") -> dict:
  """The smallest report `report.write` renders, with `estimate` as a policy's final utility."""
  row = {
    "mean_final_utility": estimate.mean,
    "ci95": estimate.ci95,
    "win_rate_vs_generator_order": 0.5,
    "win_rate_ci95": (0.4, 0.6),
  }
  sweep = [{"k": 1, "heldout_loglik_per_choice": -1.0, "bic": 10.0, "restart_ari": float("nan")}]
  comparison = {
    "policy": "iql",
    "baseline": "random",
    "diff_mean": float("nan"),
    "diff_ci95": (0.1, 0.2),
  }
  sim_vs_real = {
    "loglik": {"per_choice": estimate.to_json(), "uniform": estimate.to_json()},
    "calibration": {"overall": {"ece": estimate.to_json()}},
  }
  user_model = {
    "num_types": 1,
    "selected_k": 1,
    "ari_vs_planted": np.float32("nan"),
    "k_sweep": sweep,
  }
  return {
    "user_model": user_model,
    "agent_environment": "simulator",
    "agent": {"iql": row},
    "agent_comparisons": [comparison],
    "sim_vs_real": sim_vs_real,
  }


def test_read_json_accepts_a_remedy_and_names_the_file_of_a_truncated_file(tmp_path):
  path = tmp_path / "done.json"
  path.write_text('{"config_hash": "ab')
  expected = r"done\.json: cannot be read as JSON \(.*\); re-run the data stage"
  with pytest.raises(ValueError, match=expected):
    files.read_json(str(path), remedy="re-run the data stage")


@pytest.mark.parametrize(
  "content, problem",
  [
    (b'{"a": 1,', "JSONDecodeError"),
    (b"", "JSONDecodeError"),
    (b'{"a": "\xff"}', "UnicodeDecodeError"),
    (b'{"a": 1, "a": 2}', r"duplicated keys \['a'\]"),
    (b"[" * 100_000, "nested too deeply"),
    (None, "FileNotFoundError"),
  ],
  ids=["truncated", "empty", "bad-utf8", "duplicate-key", "deep", "missing"],
)
def test_read_json_names_the_file_of_a_corrupt_one(tmp_path, content, problem):
  path = tmp_path / "split.json"
  if content is not None:
    path.write_bytes(content)
  expected = rf"^{re.escape(str(path))}: cannot be read as JSON .*{problem}"
  with pytest.raises(ValueError, match=expected) as info:
    files.read_json(str(path))
  assert not isinstance(info.value, json.JSONDecodeError)


def _write_npz_case(path: str, case: str) -> None:
  """Writes the malformed file `case` at `path`."""
  good = {"x": np.ones((3, 4), np.float32)}
  if case == "truncated":
    files.save_npz(path, **good)
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[: len(data) // 2])
  elif case == "pickle":
    with open(path, "wb") as f:
      pickle.dump(good, f)
  elif case == "npy":
    with open(path, "wb") as f:
      np.save(f, good["x"])
  elif case == "object":
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
  else:
    bad = {
      "strings": np.array([["a"] * 4]),
      "complex": np.ones((3, 4), np.complex64),
      "nan": np.array([[0.0, 1.0, 2.0, np.nan]] * 2),
      "width": np.ones((3, 5), np.float32),
      "rank": np.ones(4, np.float32),
    }[case]
    np.savez(path, x=bad)


@pytest.mark.parametrize(
  "case, problem",
  [
    ("truncated", r"cannot be read as \.npz"),
    ("pickle", r"cannot be read as \.npz \(.*pickled"),
    ("npy", r"cannot be read as \.npz \(it is one \.npy array of shape \(3, 4\)"),
    ("object", r"array 'x' cannot be read \(Object arrays"),
    ("strings", r"array 'x' holds strings \(<U1\); expected floats"),
    ("complex", r"array 'x' holds complex numbers \(complex64\); expected floats"),
    ("nan", r"array 'x' has 2 non-finite values, first at row 0, column 3 \(nan\)"),
    ("width", r"array 'x' has shape \(3, 5\); expected \(rows, 4\)"),
    ("rank", r"array 'x' has shape \(4,\); expected \(rows, 4\)"),
  ],
)
def test_load_npz_names_the_file_the_array_and_the_problem(tmp_path, case, problem):
  path = str(tmp_path / "features.npz")
  _write_npz_case(path, case)
  expected = rf"^{re.escape(path)}: .*{problem}.*; re-run the data stage$"
  with pytest.raises(ValueError, match=expected):
    files.load_npz(path, ["x"], "re-run the data stage", kinds="f", width=4, finite=True)


def test_load_npz_checks_only_what_it_is_asked_to(tmp_path):
  path = str(tmp_path / "a.npz")
  np.savez(path, x=np.array(["a", "b"]), y=np.array([np.inf]))
  loaded = files.load_npz(path, ["x", "y"], "unused")
  assert loaded["x"].tolist() == ["a", "b"] and np.isinf(loaded["y"][0])


# Paths inside their root.


def test_resolve_inside_gives_the_real_path_of_a_reference_inside_the_root(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "a.png").write_bytes(b"x")
  root = str(tmp_path)
  expected = os.path.realpath(tmp_path / "images" / "a.png")
  assert files.resolve_inside(root, "images/a.png", "here") == expected
  assert files.resolve_inside(root, "images/../images/a.png", "here") == expected
  assert files.resolve_inside(root, expected, "here") == expected
  assert files.resolve_inside(root, "not/yet/written.png", "here").startswith(
    os.path.realpath(root)
  )


@pytest.mark.parametrize("ref", ["../secret.txt", "images/../../secret.txt", "/etc/passwd", "a\0b"])
def test_resolve_inside_rejects_an_escape_naming_where(tmp_path, ref):
  root = tmp_path / "root"
  root.mkdir()
  with pytest.raises(files.OutsideRoot, match=r"^record 3: field 'ref': ") as info:
    files.resolve_inside(str(root), ref, "record 3: field 'ref'")
  assert repr(ref) in str(info.value)


def test_resolve_inside_resolves_symlinks_before_the_check(tmp_path):
  root, outside = tmp_path / "root", tmp_path / "outside"
  root.mkdir()
  outside.mkdir()
  (outside / "secret.png").write_bytes(b"x")
  (root / "link").symlink_to(outside)
  (root / "inner").mkdir()
  (root / "alias").symlink_to(root / "inner")
  with pytest.raises(files.OutsideRoot, match="outside"):
    files.resolve_inside(str(root), "link/secret.png", "where")
  assert files.resolve_inside(str(root), "alias/x.png", "where") == os.path.realpath(
    root / "inner" / "x.png"
  )
  linked_root = tmp_path / "linked_root"
  linked_root.symlink_to(root)
  assert files.resolve_inside(str(linked_root), "inner/x.png", "where") == os.path.realpath(
    root / "inner" / "x.png"
  )
