"""Stages know where their inputs came from: skipping, stale upstreams, edited files, external inputs,
checkpoint keys and the workdir lock, on toy stages and on the pipeline's own."""

import os

import ml_collections
import pytest

from pasta_jax import pipeline, provenance
from tests import conftest


def _toy_config(external_path: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ("make", "use")
  c.make = ml_collections.ConfigDict({"size": 3, "source": external_path})
  c.use = ml_collections.ConfigDict({"scale": 2})
  return c


class ToyStages:
  """'make' reads an external file and writes make.txt; 'use' reads make.txt and writes use.txt."""

  def __init__(self):
    self.calls = []
    self.run_keys = {}
    self.specs = {
      "make": provenance.StageSpec(
        "make",
        fields=("seed", "make.size"),
        upstream=(),
        external=lambda c: {"make.source": c.make.source},
        outputs=lambda c: ("make.txt",),
      ),
      "use": provenance.StageSpec(
        "use",
        fields=("seed", "use"),
        upstream=("make",),
        external=lambda c: {},
        outputs=lambda c: ("use.txt",),
      ),
    }
    self.functions = {"make": self._make, "use": self._use}

  def _make(self, config, workdir, run_key):
    self.calls.append("make")
    self.run_keys["make"] = run_key
    with open(config.make.source) as f:
      source = f.read()
    with open(os.path.join(workdir, "make.txt"), "w") as f:
      f.write(source * config.make.size)
    return {"size": config.make.size}

  def _use(self, config, workdir, run_key):
    self.calls.append("use")
    self.run_keys["use"] = run_key
    with open(os.path.join(workdir, "make.txt")) as f:
      made = f.read()
    with open(os.path.join(workdir, "use.txt"), "w") as f:
      f.write(made * config.use.scale)
    return {"length": len(made) * config.use.scale}

  def run(self, config, workdir):
    self.calls.clear()
    return pipeline.run_stages(config, workdir, self.specs, self.functions)


@pytest.fixture
def toy(tmp_path):
  source = tmp_path / "source.txt"
  source.write_text("ab")
  workdir = tmp_path / "run"
  workdir.mkdir()
  return ToyStages(), _toy_config(str(source)), str(workdir), source


def test_fresh_stages_are_skipped_and_their_result_kept(toy):
  stages, config, workdir, _ = toy
  first = stages.run(config, workdir)
  assert stages.calls == ["make", "use"]
  assert stages.run(config, workdir) == first and stages.calls == []


def test_a_changed_field_reruns_only_the_stages_that_read_it(toy):
  stages, config, workdir, _ = toy
  stages.run(config, workdir)
  config.use.scale = 3
  assert stages.run(config, workdir)["use"] == {"length": 18} and stages.calls == ["use"]


def test_a_stage_refuses_an_upstream_that_ran_for_other_config_values(toy):
  stages, config, workdir, _ = toy
  stages.run(config, workdir)
  config.make.size = 4
  config.stages = ("use",)
  with pytest.raises(
    provenance.StaleInputError,
    match=r"stage 'use' reads the outputs of stage 'make'.*make.size: 3 -> 4.*re-run stage 'make'",
  ):
    stages.run(config, workdir)
  config.stages = ("make", "use")
  stages.run(config, workdir)
  assert stages.calls == ["make", "use"]


def test_an_upstream_that_never_ran_is_named(toy):
  stages, config, workdir, _ = toy
  config.stages = ("use",)
  with pytest.raises(provenance.StaleInputError, match="stage 'make' has not finished"):
    stages.run(config, workdir)


def test_an_external_file_edited_in_place_reruns_its_stage_and_the_ones_after(toy):
  stages, config, workdir, source = toy
  stages.run(config, workdir)
  source.write_text("xyz")
  assert stages.run(config, workdir)["use"] == {"length": 18} and stages.calls == ["make", "use"]
  source.write_text("uvw")
  config.stages = ("use",)
  with pytest.raises(
    provenance.StaleInputError, match=r"input make.source:.*source.txt of stage 'make' changed"
  ):
    stages.run(config, workdir)


def test_an_edited_output_is_refused_downstream_and_rewritten_upstream(toy):
  stages, config, workdir, _ = toy
  stages.run(config, workdir)
  with open(os.path.join(workdir, "make.txt"), "a") as f:
    f.write("!")
  config.stages = ("use",)
  with pytest.raises(
    provenance.StaleInputError, match=r"make.txt, written by stage 'make', changed since"
  ):
    stages.run(config, workdir)
  config.stages = ("make", "use")
  stages.run(config, workdir)
  assert stages.calls == ["make"]  # make.txt is rewritten as it was, so use.txt still holds.
  with open(os.path.join(workdir, "make.txt")) as f:
    assert f.read() == "ababab"


def test_checkpoints_are_keyed_by_fields_and_inputs(toy):
  stages, config, workdir, source = toy
  stages.run(config, workdir)
  first = dict(stages.run_keys)
  config.seed = 1
  stages.run(config, workdir)
  assert stages.run_keys["make"] != first["make"] and stages.run_keys["use"] != first["use"]
  config.seed = 0
  source.write_text("zz")
  stages.run(config, workdir)
  assert stages.run_keys["make"] != first["make"]


def test_digests_are_cached_by_size_and_mtime(tmp_path):
  path = tmp_path / "big.bin"
  path.write_bytes(b"x" * 1000)
  cache = provenance.DigestCache(str(tmp_path / "digests.json"))
  digest = cache.digest(str(path))
  cache.save()
  reloaded = provenance.DigestCache(str(tmp_path / "digests.json"))
  os.chmod(path, 0o000)  # Unreadable: only the cache can answer.
  try:
    assert reloaded.digest(str(path)) == digest
  finally:
    os.chmod(path, 0o644)
  path.write_bytes(b"y" * 1001)
  assert reloaded.digest(str(path)) != digest


def test_a_corrupt_done_marker_names_the_stage_to_rerun(toy):
  stages, config, workdir, _ = toy
  stages.run(config, workdir)
  with open(provenance.marker_path(workdir, "make"), "w") as f:
    f.write("{not json")
  config.stages = ("use",)
  with pytest.raises(provenance.StaleInputError, match=r"make.done.json.*re-run stage 'make'"):
    stages.run(config, workdir)


def test_a_workdir_belongs_to_one_run_at_a_time(tmp_path):
  workdir = str(tmp_path / "run")
  config = conftest.tiny_config()
  with provenance.workdir_lock(workdir, "config hash abc, seed 1"):
    with pytest.raises(
      provenance.WorkdirBusyError, match=r"in use by another run \(pid \d+, config hash abc"
    ):
      pipeline.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "config.json"))


def test_every_external_input_of_the_pipeline_is_declared():
  from configs import pasta_real

  config = pasta_real.get_config()
  config.data.kaggle_dir, config.candidates.replay_cache = "/release", "/expansions.jsonl"
  config.embed.clip_checkpoint, config.embed.sdxl_checkpoint = "/clip", "/sdxl"
  config.user_model.init_from, config.data.kaggle_layout = "/fitted", "/layout.json"
  declared = {field for spec in pipeline.STAGE_SPECS.values() for field in spec.external(config)}
  assert declared == {
    "data.kaggle_dir",
    "data.kaggle_layout",
    "embed.clip_checkpoint",
    "user_model.init_from",
    "candidates.replay_cache",
    "embed.sdxl_checkpoint",
  }


def test_the_pipeline_refuses_a_user_model_fitted_for_another_num_types(tmp_path):
  config = conftest.tiny_config()
  config.stages = ("data", "user_model")
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir)
  config.user_model.num_types = 2
  config.stages = ("simulate",)
  with pytest.raises(
    provenance.StaleInputError,
    match=r"stage 'user_model' ran with other config values \(user_model.num_types: 3 -> 2\); "
    r"re-run stage 'user_model'",
  ):
    pipeline.run(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "simulate"))

  config.user_model.num_types = 3
  with open(os.path.join(workdir, "data", "records.jsonl"), "a") as f:
    f.write("\n")
  config.stages = ("user_model",)
  with pytest.raises(
    provenance.StaleInputError, match=r"data/records.jsonl, written by stage 'data', changed"
  ):
    pipeline.run(config, workdir)


def test_the_command_line_names_the_stale_user_model(tmp_path):
  """The issue's check: `--config.stages='("simulate",)'` after a change of user_model.num_types."""
  import subprocess
  import sys

  config = conftest.tiny_config()
  config.stages = ("data", "user_model")
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  done = subprocess.run(
    [
      sys.executable,
      "-m",
      "pasta_jax.main",
      "--config=configs/quickstart.py:tiny",
      f"--workdir={workdir}",
      "--config.stages=('simulate',)",
      "--config.user_model.num_types=2",
    ],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert done.returncode == 1, done.stderr
  assert (
    "user_model.num_types: 3 -> 2" in done.stderr and "re-run stage 'user_model'" in done.stderr
  )
  assert not os.path.exists(os.path.join(workdir, "simulate"))
