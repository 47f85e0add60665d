"""Ahead-of-time checks (pasta_jax/aot.py) on a small TPU topology, compiled by libtpu on this CPU."""

import json
import os
import subprocess
import sys

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
