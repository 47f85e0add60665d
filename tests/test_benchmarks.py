"""`python -m benchmarks.run --quick` writes results in the agreed schema (speed is never asserted)."""

import json
import os
import subprocess
import sys

NAMES = (
  "gemm_ceiling",
  "sim_mlp_n2048",
  "sim_table_n2048",
  "sim_table_n65536",
  "em_epoch",
  "iql_update",
)
NUMBERS = ("value", "reference_value", "ratio_vs_reference", "pct_of_ceiling")


def test_quick_benchmarks_write_every_row_in_the_schema(tmp_path):
  output = tmp_path / "results.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
    [sys.executable, "-m", "benchmarks.run", "--quick", f"--output={output}"],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  rows = json.loads(output.read_text())
  assert tuple(row["name"] for row in rows) == NAMES
  for row in rows:
    assert set(("name", "unit", "sizes", "device", "versions", *NUMBERS)) <= set(row), row["name"]
    assert isinstance(row["value"], float) and row["value"] > 0, row["name"]
    assert row["flops_per_call"] > 0 and row["seconds_per_call"] > 0, row["name"]
    assert isinstance(row["pct_of_ceiling"], float), row["name"]
    assert row["sizes"]["quick"] is True and "jax" in row["versions"], row["name"]
    assert row["compile_s"] is None or row["compile_s"] >= 0, row["name"]
  for row in rows:
    if row["name"] != "em_epoch":
      assert row["reference_value"] > 0 and row["ratio_vs_reference"] > 0, row["name"]
  assert all(name in done.stdout for name in NAMES)
