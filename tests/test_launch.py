"""The launch scripts hand the config, workdir and overrides on as exactly the words given."""

import json
import os
import shlex
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AWKWARD = (
  "--config.select_k.ks=(1,8)",
  "--config.user_model.hidden=(256, 256)",
  "--config.data.kaggle_dir=/data/it's here",
  '--config.embed.cache_dir=/tmp/a"b $HOME `id` \\n',
  "--config.candidates.replay_cache=/tmp/line\nbreak",
)
WORKDIR = "gs://bucket/runs/x; touch /tmp/pwned && echo $(id)"


def _fake(directory, name: str) -> str:
  """An executable `name` in `directory` that appends its argv as a JSON line to `name`.log."""
  log = os.path.join(directory, f"{name}.log")
  path = os.path.join(directory, name)
  with open(path, "w") as f:
    f.write(
      f"#!{sys.executable}\nimport json, sys\n"
      f"with open({log!r}, 'a') as f:\n  f.write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
  os.chmod(path, 0o755)
  return log


def _run(tmp_path, script: str, args, env=None) -> None:
  result = subprocess.run(
    ["bash", os.path.join(REPO_ROOT, "launch", script), *args],
    capture_output=True,
    text=True,
    check=False,
    cwd=str(tmp_path),
    env={**os.environ, **(env or {}), "PATH": f"{tmp_path}:{os.environ['PATH']}"},
  )
  assert result.returncode == 0, result.stderr


def _calls(log: str) -> list[list[str]]:
  with open(log) as f:
    return [json.loads(line) for line in f]


def test_tpu_pod_quotes_every_argument_of_the_remote_command(tmp_path):
  log = _fake(str(tmp_path), "gcloud")
  _run(tmp_path, "tpu_pod.sh", ["my-tpu", "us-central2-b", "configs/paper.py", WORKDIR, *AWKWARD])
  ((*head, command),) = _calls(log)
  assert head == [
    "compute",
    "tpus",
    "tpu-vm",
    "ssh",
    "my-tpu",
    "--zone=us-central2-b",
    "--worker=all",
  ]
  assert command.startswith("--command=")
  words = shlex.split(command.removeprefix("--command="))
  prefix = ["cd", "~/pasta_jax", "&&", "PASTA_MULTIHOST=1", ".venv/bin/python", "-m"]
  assert words == prefix + [
    "pasta_jax.main",
    "--config=configs/paper.py",
    f"--workdir={WORKDIR}",
    *AWKWARD,
  ]


def test_the_remote_shell_runs_nothing_an_argument_holds(tmp_path):
  log = _fake(str(tmp_path), "gcloud")
  marker = tmp_path / "pwned"
  workdir = f"gs://b/x; touch {marker}; echo $(touch {marker}) `touch {marker}`"
  _run(tmp_path, "tpu_pod.sh", ["tpu", "zone", "configs/paper.py", workdir, *AWKWARD])
  command = _calls(log)[0][-1].removeprefix("--command=")
  words = command.split(" && ", 1)[1].removeprefix("PASTA_MULTIHOST=1 .venv/bin/python ")
  echo = f"{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))'"
  echoed = subprocess.run(
    ["sh", "-c", f"{echo} {words}"], capture_output=True, text=True, check=True
  )
  assert json.loads(echoed.stdout) == [
    "-m",
    "pasta_jax.main",
    "--config=configs/paper.py",
    f"--workdir={workdir}",
    *AWKWARD,
  ]
  assert not marker.exists()


@pytest.mark.parametrize(
  "script, env",
  [
    ("local.sh", {}),
    (
      "gpu_multihost.sh",
      {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"},
    ),
  ],
)
def test_local_and_gpu_launchers_pass_the_arguments_unchanged(tmp_path, script, env):
  log = _fake(str(tmp_path), "python")
  _run(tmp_path, script, ["configs/quickstart.py", WORKDIR, *AWKWARD], env)
  assert _calls(log) == [
    ["-m", "pasta_jax.main", "--config=configs/quickstart.py", f"--workdir={WORKDIR}", *AWKWARD]
  ]
