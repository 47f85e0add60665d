"""EM's sums over users add per-device partial sums in device order (`parallel.device_sums`,
`parallel.summed_objective`), so its fits (mini-batch, exact, and a K sweep on a ("replica", "data")
mesh) on 2 processes x 4 CPU devices joined by `jax.distributed` are bitwise those on one process x
8 devices."""

import subprocess
import sys

import numpy as np

from tests import multihost_em, test_multihost

TIMEOUT_S = 300


def _start_job(module: str, *args: str) -> list[subprocess.Popen]:
  """`python -m module args` as each process of a 2-process, 4-CPU-device job, started."""
  address = f"localhost:{test_multihost._free_port()}"
  return [
    subprocess.Popen(
      [sys.executable, "-m", module, *args],
      cwd=test_multihost.REPO,
      env={**test_multihost._process_env(address, i), "PYTHONPATH": test_multihost.REPO},
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
    )
    for i in range(test_multihost.NUM_PROCESSES)
  ]


def test_em_fits_are_bitwise_the_same_on_2_processes_as_on_one(tmp_path, rater_log, choices):
  users, path = tmp_path / "users.npz", tmp_path / "fits.npz"
  multihost_em.save_users(users, rater_log.table, choices[0])
  procs = _start_job("tests.multihost_em", str(users), str(path))
  try:
    here = multihost_em.fits(rater_log.table, choices[0])
    logs = [p.communicate(timeout=TIMEOUT_S)[0].decode(errors="replace") for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-3000:]}"
  with np.load(path) as there:
    assert sorted(there.files) == sorted(here)
    for name in there.files:
      np.testing.assert_array_equal(there[name], here[name], err_msg=name)
