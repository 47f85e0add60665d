"""`python -m benchmarks.run --quick` and `python -m benchmarks.profile --quick` write results in the
agreed schema (speed is never asserted); the profile's attribution and op categories on known inputs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import profile

NAMES = (
  "gemm_ceiling",
  "sim_mlp_n2048",
  "sim_table_n2048",
  "sim_table_n65536",
  "em_epoch",
  "iql_update",
)
NUMBERS = ("value", "reference_value", "ratio_vs_reference", "pct_of_ceiling")


def run_module(module: str, *args: str) -> subprocess.CompletedProcess:
  """`python -m module args` from the repository root on one CPU device."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=root,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return done


def test_quick_benchmarks_write_every_row_in_the_schema(tmp_path):
  output = tmp_path / "results.json"
  done = run_module("benchmarks.run", "--quick", f"--output={output}")
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


PROGRAM_FIELDS = (
  "name",
  "module",
  "seconds_per_call",
  "traced_seconds_per_call",
  "share_pct",
  "ms_per_call",
  "mean_busy_threads",
  "unmatched_op_pct",
  "top_ops",
  "pct_of_ceiling",
  "cost_analysis",
  "roofline",
  "largest",
)


def test_quick_profile_shares_add_up_and_the_gemm_is_dot_bound(tmp_path):
  output = tmp_path / "profile.json"
  done = run_module(
    "benchmarks.profile", "--quick", "--only=gemm", "--calls=2", "--repeats=2", f"--output={output}"
  )
  report = json.loads(output.read_text())
  assert report["quick"] is True and report["categories"] == [*profile.CATEGORIES, profile.GAPS]
  assert report["gemm_flops_per_s"] > 0 and report["stream_bytes_per_s"] > 0
  assert [p["name"] for p in report["programs"]] == ["gemm_ceiling"]
  for program in report["programs"]:
    assert set(PROGRAM_FIELDS) <= set(program), program["name"]
    shares = program["share_pct"]
    assert list(shares) == report["categories"], program["name"]
    assert min(shares.values()) >= 0 and sum(shares.values()) <= 100 + 1e-6, (
      program["name"],
      shares,
    )
    assert sum(shares.values()) == pytest.approx(100), (program["name"], shares)
    assert program["unmatched_op_pct"] == 0, program["name"]
    assert program["roofline"]["bound"] in ("memory", "compute"), program["name"]
    assert program["cost_analysis"]["bytes_accessed_per_dispatch"] > 0, program["name"]
    assert program["name"] in done.stdout
  gemm = report["programs"][0]
  assert gemm["largest"] == "gemm" and max(gemm["share_pct"], key=gemm["share_pct"].get) == "gemm"
  assert gemm["cost_analysis"]["flops_per_dispatch"] == 2 * 1024**3
  assert gemm["top_ops"][0]["category"] == "gemm"


def thunk(tid: int, ts: float, dur: float, op: str) -> dict:
  args = {"hlo_module": "jit_f", "hlo_op": op}
  return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": op, "args": args}


def test_attribution_gives_the_innermost_op_its_time_and_splits_concurrent_threads():
  events = [
    thunk(1, 0.0, 10.0, "while.1"),
    thunk(1, 2.0, 3.0, "fusion.2"),
    thunk(2, 4.0, 4.0, "dot.3"),
    thunk(2, 20.0, 5.0, "dot.3"),
    {"ph": "X", "pid": 1, "tid": 3, "ts": 0.0, "dur": 12.0, "name": profile.CALL_ANNOTATION},
  ]
  windows = profile.call_windows(events)
  assert windows == [(0.0, 12.0)]
  owned, busy, thread_time = profile.attribute(events, windows)
  expected = {"while.1": 2 + 1.5 + 2, "fusion.2": 2 + 0.5, "dot.3": 0.5 + 1.5}
  assert {op: pytest.approx(us) for (_, op), us in owned.items()} == expected
  assert busy == pytest.approx(10.0) and thread_time == pytest.approx(7 + 3 + 4)
  categories = {"while.1": "control", "fusion.2": "elementwise", "dot.3": "gemm"}
  summary = profile.summarize(owned, busy, thread_time, 12.0, 1, "jit_f", categories)
  assert summary["share_pct"]["host_gaps"] == pytest.approx(100 * 2 / 12)
  assert summary["share_pct"]["gemm"] == pytest.approx(100 * 2 / 12)
  assert summary["mean_busy_threads"] == pytest.approx(1.4)


def test_an_asynchronous_op_owns_the_time_up_to_its_end_marker():
  def marker(tid: int, ts: float, op: str) -> dict:
    return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": 0.0, "name": f"end: {op}", "args": {}}

  events = [
    thunk(1, 0.0, 2.0, "dot.1"),
    thunk(2, 0.5, 1.0, "fusion.2"),
    thunk(1, 3.0, 2.0, "fusion.2"),
    marker(1, 5.0, "fusion.2"),
    marker(2, 8.0, "dot.1"),
    thunk(1, 20.0, 1.0, "dot.1"),
    marker(1, 21.0, "dot.1"),
    thunk(2, 22.0, 1.0, "while.3"),
    thunk(2, 23.0, 2.0, "fusion.2"),
    marker(2, 25.0, "while.3"),
    {"ph": "X", "pid": 1, "tid": 3, "ts": 0.0, "dur": 30.0, "name": profile.CALL_ANNOTATION},
  ]
  loops = frozenset({"while.3"})
  tails = profile.async_tails(events, loops)
  assert [(t["args"]["hlo_op"], t["ts"], t["dur"]) for t in tails] == [("dot.1", 2.0, 6.0)]
  owned, busy, _ = profile.attribute(events, profile.call_windows(events), loops)
  expected = {"dot.1": 1.5 + 1 + 1 + 3 + 1, "fusion.2": 0.5 + 1 + 2, "while.3": 1}
  assert {op: pytest.approx(us) for (_, op), us in owned.items()} == expected
  assert busy == pytest.approx(12.0)


def test_op_categories_of_a_compiled_program():
  def f(a, rows, key):
    noise = jax.random.uniform(key, (4096, 64))
    picked = a[rows] * 3.0 + 1.0
    return jnp.sort(picked @ a.T, axis=-1), noise, picked.T.copy()

  a = jnp.ones((64, 64))
  rows = jnp.arange(4096) % 64
  compiled = jax.jit(f).lower(a, rows, jax.random.key(0)).compile()
  module, categories = profile.op_categories(compiled.as_text())
  assert module == "jit_f"
  sorts = [
    ins.name
    for comp in profile.parse_hlo(compiled.as_text()).values()
    for ins in comp
    if ins.opcode == "sort"
  ]
  assert sorts and all(categories[name] == "reduce_sort" for name in sorts), sorts
  found = set(categories.values())
  assert {"gemm", "rng", "gather_scatter", "reduce_sort"} <= found, categories
