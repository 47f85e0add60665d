"""Many hosts, one program: the whole tiny pipeline (data -> user_model -> simulate -> agent -> evaluate
-> report) as 2 processes x 4 CPU devices joined by `jax.distributed` equals the session's tiny run on
one process x 8 devices (`conftest.tiny_workdir`), process 0 alone writes the workdir's files, no
process reads every record after the data stage (each reads its own block of rows or users from the
data stage's shards), and `parallel.ordered_sum` adds per-device sums bitwise alike on both layouts
(XLA's own all-reduce adds in another order over gloo than in one process)."""

import glob
import json
import math
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from pasta_jax import config as config_lib
from tests import conftest, multihost_sums

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
DATA_RECORDS = os.path.join("data", "records.jsonl")
TIMEOUT_S = 900

# Runs `pasta_jax.main` with os.replace logged (one line per replaced path) to PASTA_TEST_WRITE_LOG:
# every shared file but Orbax's checkpoints and clu's curves is written through `files.replacing`.
# PASTA_TEST_READ_LOG gets a JSON line for each read of a whole records file and for each block of
# rows or users read from the data stage's shards.
LOGGED_MAIN = """
import json
import os
import runpy
import sys

from pasta_jax.data import layout, schema

real_replace = os.replace
real_read_records = schema.read_records
real_read_row_records = layout.read_row_records
real_read_users = layout.read_users


def replace(src, dst, *args, **kwargs):
  real_replace(src, dst, *args, **kwargs)
  with open(os.environ["PASTA_TEST_WRITE_LOG"], "a") as log:
    log.write(os.path.abspath(os.fspath(dst)) + "\\n")


def log_read(entry):
  with open(os.environ["PASTA_TEST_READ_LOG"], "a") as log:
    log.write(json.dumps(entry) + "\\n")


def read_records(path):
  log_read({"records_file": path})
  return real_read_records(path)


def read_users(split, users):
  records = real_read_users(split, users)
  split_records = int(split.choices.sum())
  log_read({"users": [users.start, users.stop], "records": len(records), "split_records": split_records})
  return records


def read_row_records(split, rows):
  row_records = real_read_row_records(split, rows)
  log_read(
    {
      "first_user": split.users[0],
      "rows": [rows.start, rows.stop],
      "records": sum(len(records) for _, records in row_records),
      "split_records": int(split.choices.sum()),
    }
  )
  return row_records


os.replace = replace
schema.read_records = read_records
layout.read_row_records = read_row_records
layout.read_users = read_users
sys.argv = ["pasta_jax.main", *sys.argv[1:]]
runpy.run_module("pasta_jax.main", run_name="__main__")
"""


def test_ordered_sum_fits_moved_between_meshes_and_a_failure_elsewhere_on_2_processes(tmp_path):
  path = tmp_path / "sums.npz"
  address = f"localhost:{_free_port()}"
  procs = [
    subprocess.Popen(
      [sys.executable, "-m", "tests.multihost_sums", str(path)],
      cwd=REPO,
      env={**_process_env(address, i), "PYTHONPATH": REPO},
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(NUM_PROCESSES)
  ]
  logs = [p.communicate(timeout=300)[0].decode(errors="replace") for p in procs]
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-3000:]}"
  x, w = multihost_sums.summands()
  here = multihost_sums.sums(x, w)
  with np.load(path) as there:
    for name in ("ordered_sum", "ordered_grad"):
      np.testing.assert_array_equal(there[name], here[name], err_msg=name)
    np.testing.assert_array_equal(there["moved"], x)
    assert str(there["failure"]) == (
      "RuntimeError: process(es) [1] of the job failed in fail_on_the_last_process; their logs say "
      "why"
    )
  x64, w64 = x.astype(np.float64), w.astype(np.float64)
  np.testing.assert_allclose(here["ordered_sum"], x64.sum(axis=0), rtol=1e-5, atol=1e-5)
  reference_grad = x64.T @ (1.0 - np.tanh(x64 @ w64) ** 2)
  np.testing.assert_allclose(here["ordered_grad"], reference_grad, rtol=1e-5, atol=1e-5)


def _process_env(address: str, process_id: int) -> dict[str, str]:
  """The environment of process `process_id` of a 2-process, 4-CPU-device job at `address`."""
  return {
    **os.environ,
    "JAX_PLATFORMS": "cpu",
    "XLA_FLAGS": conftest.xla_flags(4),
    "JAX_COORDINATOR_ADDRESS": address,
    "JAX_NUM_PROCESSES": str(NUM_PROCESSES),
    "JAX_PROCESS_ID": str(process_id),
  }


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start_processes(workdir: str, scratch) -> list[tuple[subprocess.Popen, str, str]]:
  """(process, log path, write-log path) of each process of the job, started."""
  script = scratch / "logged_main.py"
  script.write_text(LOGGED_MAIN)
  address = f"localhost:{_free_port()}"
  started = []
  for process_id in range(NUM_PROCESSES):
    log, writes = (
      str(scratch / f"process{process_id}.log"),
      str(scratch / f"writes{process_id}.txt"),
    )
    env = {
      **_process_env(address, process_id),
      "PYTHONPATH": REPO,
      "PASTA_TEST_WRITE_LOG": writes,
      "PASTA_TEST_READ_LOG": str(scratch / f"reads{process_id}.jsonl"),
    }
    command = [
      sys.executable,
      str(script),
      "--config=configs/quickstart.py:tiny",
      f"--workdir={workdir}",
    ]
    with open(log, "w") as out:
      proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    started.append((proc, log, writes))
  return started


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
  """{"multi": workdir of the 2-process run, "single": the session's tiny run on 8 devices, "writes":
  [paths os.replace'd by process i]}; the 2-process job runs while the tiny run is built."""
  scratch = tmp_path_factory.mktemp("multihost")
  multi = str(scratch / "multi")
  started = _start_processes(multi, scratch)
  try:
    single = request.getfixturevalue("tiny_workdir")
    for proc, _, _ in started:
      proc.wait(timeout=TIMEOUT_S)
  finally:
    for proc, _, _ in started:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for process_id, (proc, log, _) in enumerate(started):
    assert proc.returncode == 0, f"process {process_id}:\n{open(log).read()[-5000:]}"
  writes = [open(w).read().split() if os.path.exists(w) else [] for _, _, w in started]
  reads = [
    [json.loads(line) for line in open(scratch / f"reads{i}.jsonl")] for i in range(NUM_PROCESSES)
  ]
  return {"multi": multi, "single": single, "writes": writes, "reads": reads}


def _partition(first: dict, second: dict, axis: str) -> None:
  """Two processes' reads of one split cover its `axis` (rows or users) and its records in two
  non-empty blocks, the first process's first."""
  assert first[axis][0] == 0 and first[axis][1] == second[axis][0] < second[axis][1]
  assert 0 < first["records"] < first["split_records"]
  assert first["records"] + second["records"] == first["split_records"]


def test_no_process_reads_every_record_after_the_data_stage(runs):
  for reads in runs["reads"]:
    whole = [r for r in reads if r.get("records_file", "").endswith("records.jsonl")]
    assert not [r for r in whole if r["records_file"].endswith(DATA_RECORDS)], whole
  first, second = ([r for r in reads if "users" in r] for reads in runs["reads"])
  assert len(first) == len(second) == 1  # The agent stage's training users.
  _partition(first[0], second[0], "users")
  blocks = [{}, {}]
  for process_blocks, reads in zip(blocks, runs["reads"]):
    for read in (r for r in reads if "rows" in r):
      process_blocks.setdefault(read["first_user"], []).append(read)
  assert blocks[0].keys() == blocks[1].keys() and len(blocks[0]) == 2  # Training, held-out users.
  # The user_model stage reads each split's rows; the evaluate stage the held-out users' again.
  assert sorted(len(reads) for reads in blocks[0].values()) == [1, 2]
  for split, reads in blocks[0].items():
    assert len(reads) == len(blocks[1][split])
    for mine, theirs in zip(reads, blocks[1][split]):
      _partition(mine, theirs, "rows")


def _differences(a, b, path: str = "") -> list[str]:
  """Where two JSON values differ: floats by more than 1e-5 (relative, or absolute near 0), anything
  else at all."""
  if isinstance(a, dict) and isinstance(b, dict):
    if set(a) != set(b):
      return [f"{path}: keys {sorted(set(a) ^ set(b))}"]
    return [d for key in a for d in _differences(a[key], b[key], f"{path}.{key}")]
  if isinstance(a, list) and isinstance(b, list):
    if len(a) != len(b):
      return [f"{path}: lengths {len(a)} != {len(b)}"]
    return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
  if isinstance(a, float) or isinstance(b, float):
    close = a is not None and b is not None and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-5)
    return [] if close else [f"{path}: {a} != {b}"]
  return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _result(workdir: str, stage: str) -> dict:
  """A stage's result from its marker, with the workdir's path masked and the agent's metrics folder
  (named by a run key, see RUN_KEY) left out."""
  with open(os.path.join(workdir, f"{stage}.done.json")) as f:
    result = json.loads(f.read().replace(os.path.abspath(workdir), "<workdir>"))["result"]
  result.pop("metrics_dir", None)
  return result


def test_two_processes_run_the_pipeline_one_process_on_8_devices_runs(runs):
  for stage in config_lib.STAGES:
    multi, single = _result(runs["multi"], stage), _result(runs["single"], stage)
    assert _differences(multi, single) == [], stage
  with (
    open(os.path.join(runs["multi"], "report.json")) as a,
    open(os.path.join(runs["single"], "report.json")) as b,
  ):
    assert _differences(json.load(a), json.load(b)) == []
  paths = [os.path.join(runs[r], "simulate", "trajectories.npz") for r in ("multi", "single")]
  with np.load(paths[0]) as a, np.load(paths[1]) as b:
    for name in a.files:
      if np.issubdtype(a[name].dtype, np.floating):
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, err_msg=name)
      else:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# A run key (`provenance.Ledger.run_key`) hashes its stage's input digests, Orbax checkpoints
# included, whose files (one part per process) differ between the two jobs.
RUN_KEY = re.compile(r"[0-9a-f]{16}")


def _shared_files(workdir: str) -> set[str]:
  """Workdir-relative files outside Orbax checkpoints and TensorBoard event files (whose names and
  per-process parts depend on the job), run keys in their paths masked."""
  names = set()
  for root, dirs, files in os.walk(workdir):
    dirs[:] = [d for d in dirs if d not in ("checkpoints", "policies", "fitted")]
    names |= {
      RUN_KEY.sub("<run key>", os.path.relpath(os.path.join(root, name), workdir))
      for name in files
      if not name.startswith("events.out.tfevents")
    }
  return names


def test_process_0_alone_writes_each_file_once_and_completely(runs):
  multi = runs["multi"]
  first, second = runs["writes"]
  assert second == [], f"process 1 replaced {sorted(set(second))[:10]}"
  assert os.path.join(os.path.abspath(multi), "user_model", "user_model.json") in first
  assert _shared_files(multi) == _shared_files(runs["single"])
  assert not glob.glob(os.path.join(multi, "**", "*.tmp*"), recursive=True)
  for path in glob.glob(os.path.join(multi, "**", "*.json"), recursive=True):
    with open(path) as f:
      json.load(f)
  for path in glob.glob(os.path.join(multi, "**", "*.jsonl"), recursive=True):
    with open(path) as f:
      [json.loads(line) for line in f if line.strip()]
  for path in glob.glob(os.path.join(multi, "**", "*.npz"), recursive=True):
    with np.load(path) as z:
      [z[name] for name in z.files]
  with (
    open(os.path.join(multi, "user_model", "user_model.json")) as f,
    open(os.path.join(multi, "user_model.done.json")) as marker,
  ):
    assert json.load(f) == json.load(marker)["result"]
