"""Ahead-of-time checks (pasta_jax/aot.py) on a small TPU topology, compiled by libtpu on this CPU."""

import json
import math
import os
import subprocess
import sys

import jax
import pytest

from configs import paper
from pasta_jax import aot, parallel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {
  "world.num_users": 64,
  "world.sessions_per_user": 2,
  "world.feature_dim": 16,
  "world.values_per_attribute": 3,
  "user_model.hidden": (8,),
  "select_k.ks": (1, 3),
  "em.batch_users": 16,
  "em.m_steps": 2,
  "em.restarts": 2,
  "simulate.num_users": 48,
  "agent.hidden": (16,),
  "agent.iql.batch_size": 32,
  "agent.iql.steps_per_dispatch": 10,
  "evaluate.num_users": 64,
}


def small_config(**overrides):
  """configs/paper.py at the SMALL sizes, then `overrides` ({"em.batch_users": 12})."""
  config = paper.get_config()
  for field, value in {**SMALL, **overrides}.items():
    *sections, name = field.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[name] = value
  return config


def test_cli_reports_every_program_and_fails_on_too_little_hbm(tmp_path):
  output = tmp_path / "aot.json"
  overrides = [f"--config.{field}={value}" for field, value in SMALL.items()]
  result = subprocess.run(
    [
      sys.executable,
      "launch/aot_check.py",
      "--config=configs/paper.py",
      *overrides,
      "--topology=v5e:2x2",
      "--hbm_gib=0.001",
      f"--output={output}",
    ],
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert result.returncode != 0
  assert "aot: em_epoch needs" in result.stderr and "more than the" in result.stderr
  assert "'padded_users': 64" in result.stderr
  report = json.loads(output.read_text())
  assert report["devices"] == 4 and report["device_kind"].startswith("TPU v5")
  assert list(report["programs"]) == ["em_epoch", "rollout", "iql_dispatch"]
  for program in report["programs"].values():
    assert program["cost"]["flops"] > 0
    assert program["memory"]["total"] > 0 and program["memory"]["arguments"] > 0
  fits = dict(report, hbm_bytes_per_device=aot.hbm_bytes_per_device("v5e:2x2", None, 4, 1))
  assert aot.over_budget(fits) == []
  assert "em_epoch" in result.stdout and "iql_dispatch" in result.stdout
  em_sizes = report["programs"]["em_epoch"]["sizes"]
  assert (em_sizes["users"], em_sizes["rows"], em_sizes["turns_per_row"]) == (51, 51, 10)
  assert "64 rows x 10 turns" in result.stdout


@pytest.mark.parametrize(
  "build, field", [(aot.em_program, "em.batch_users"), (aot.iql_program, "agent.iql.batch_size")]
)
def test_a_batch_that_does_not_split_over_the_data_axis_names_its_field(build, field):
  mesh = parallel.make_mesh()
  with pytest.raises(
    aot.AOTError, match=rf"config\.{field}=12 must be a multiple of the data axis size 8"
  ):
    build(small_config(**{field: 12}), mesh)


def test_hbm_per_device_defaults_to_the_chip_and_splits_over_its_devices():
  assert aot.hbm_bytes_per_device("v5e:4x4", None, 16, 1) == 16 * aot.GIB
  assert aot.hbm_bytes_per_device("v4:2x2x2", None, 16, 1) == 16 * aot.GIB
  assert aot.hbm_bytes_per_device("v5p:2x2x2", 10.0, 16, 2) == 10 * aot.GIB
  with pytest.raises(aot.AOTError, match="give --hbm_gib"):
    aot.hbm_bytes_per_device("v7x:2x2", None, 4, 1)


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of the abstract arrays of `tree` under their shardings."""
  return sum(
    math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree)
  )


def test_em_choices_follow_the_pipelines_rows_of_turns_per_row():
  """51 training users of n = 10 choices; turns_per_row=5 puts each in 2 rows: choices [112, 5, ...]
  (102 rows padded to 7 batches of 16) and the state's row table f32[2, 112, 8]. The epoch's
  arguments change by the row table and the choices' bytes per device (`category`, which the utility
  model does not read, is dropped by XLA)."""
  mesh = parallel.make_mesh()
  one = aot.em_program(small_config(), mesh)
  two = aot.em_program(small_config(**{"data.turns_per_row": 5}), mesh)
  keys = ("users", "turns", "turns_per_row", "rows", "padded_rows", "scan_trips")
  assert [one.sizes[k] for k in keys] == [51, 10, 10, 51, 64, "4 batches x 2 m_steps"]
  assert [two.sizes[k] for k in keys] == [51, 10, 5, 102, 112, "7 batches x 2 m_steps"]
  assert aot.layout(two.sizes) == "112 rows x 5 turns"
  one_state, _, one_choices = one.args
  two_state, _, two_choices = two.args
  assert two_choices.image_rows.shape == (112, 5, 4, 4) and two_choices.user_index.shape == (112,)
  assert one_state.row_loglik is None and two_state.row_loglik.shape == (2, 112, 8)
  arguments = [aot.compile_program(p)["memory"]["arguments"] for p in (one, two)]

  def read(choices):
    return _per_device_bytes(choices) - _per_device_bytes(choices.category)

  expected = _per_device_bytes(two_state.row_loglik) + read(two_choices) - read(one_choices)
  assert arguments[1] - arguments[0] == expected


def test_em_batches_and_padding_count_rows_not_users():
  """batch_users=64 exceeds the 51 training users but not their 102 rows of 5 turns; 112 does. Exact
  EM pads the rows to the data axis and keeps no row table."""
  mesh = parallel.make_mesh()

  def build(**overrides):
    return aot.em_program(small_config(**{"data.turns_per_row": 5, **overrides}), mesh)

  assert build(**{"em.batch_users": 64}).sizes["padded_rows"] == 128
  with pytest.raises(aot.AOTError, match=r"batch_users=112 exceeds the 102 rows of the 51 "):
    build(**{"em.batch_users": 112})
  exact = build(**{"em.mode": "exact"})
  assert exact.sizes["padded_rows"] == 104 and exact.args[0].row_loglik is None
  assert exact.args[2].choice.shape == (104, 5)
