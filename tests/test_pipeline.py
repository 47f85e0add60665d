"""End to end: the stages through `pipeline.run`, skipping, and the quickstart's promised result."""

import json
import os

import pytest

from configs import pasta_real, quickstart
from pasta_jax import config as config_lib
from pasta_jax import pipeline
from tests import conftest


def test_pipeline_writes_report_and_skips_finished_stages(tmp_path, monkeypatch):
  config = conftest.tiny_config()
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir)

  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  um = report["user_model"]
  for key in ("num_types", "planted_num_types", "heldout_loglik_per_choice", "true_model_heldout_loglik_per_choice",
              "ari_vs_planted", "selected_k"):
    assert key in um, key
  assert [row["k"] for row in um["k_sweep"]] == list(config.select_k.ks)
  assert all({"k", "heldout_loglik_per_choice", "bic"} <= set(row) for row in um["k_sweep"])
  assert os.path.exists(os.path.join(workdir, "user_model", "k_sweep.png"))
  assert os.path.exists(os.path.join(workdir, "report.md"))
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["config"]["em"]["epochs"] == config.em.epochs and len(saved["config_hash"]) == 16
  policies = {"random", "generator_order", "greedy", "oracle", "iql/real", "iql/sim", "iql/real+sim",
              "myopic/real+sim", "bc/real"}
  assert set(report["agent"]) == policies
  for row in report["agent"].values():
    assert row["ci95"][0] <= row["mean_final_utility"] <= row["ci95"][1]
    assert row["win_rate_ci95"][0] <= row["win_rate_vs_generator_order"] <= row["win_rate_ci95"][1]
    assert len(row["utility_per_turn"]) == config.interaction.turns
  assert report["agent"]["generator_order"]["win_rate_vs_generator_order"] == 0.5
  assert {r["baseline"] for r in report["agent_comparisons"]} == policies - {"iql/real+sim"}
  assert report["agent"]["oracle"]["mean_final_utility"] > report["agent"]["random"]["mean_final_utility"]
  assert report["sim_vs_real"]["loglik"]["per_choice"]["mean"] < 0
  for name in ("utility_per_turn.png", "type_accuracy_per_turn.png", "calibration.png"):
    assert os.path.getsize(os.path.join(workdir, "evaluate", name)) > 0
  with open(os.path.join(workdir, "simulate", "simulate.json")) as f:
    assert json.load(f)["records"] == config.simulate.num_users * config.interaction.turns

  def fail(*_):
    raise AssertionError("a finished stage ran again")

  for stage in ("data", "user_model", "simulate", "agent", "evaluate"):
    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, stage, fail)
  again = pipeline.run(config, workdir)
  assert again["user_model"]["selected_k"] == um["selected_k"]

  changed = conftest.tiny_config()
  changed.stages = ("data", "user_model")
  changed.em.epochs = config.em.epochs + 1
  with pytest.raises(AssertionError, match="ran again"):
    pipeline.run(changed, workdir)


def test_quickstart_recovers_the_planted_user_types(tmp_path):
  """The quickstart's documented result: ARI >= 0.9, held-out LL within 2% of the truth, planted K selected."""
  config = quickstart.get_config()
  config.stages = ("data", "user_model")
  result = pipeline.run(config, str(tmp_path / "quickstart"))["user_model"]
  assert result["ari_vs_planted"] >= 0.9
  truth = result["true_model_heldout_loglik_per_choice"]
  assert result["heldout_loglik_per_choice"] >= truth - 0.02 * abs(truth)
  assert result["selected_k"] == result["planted_num_types"] == config.world.num_types


def test_the_pasta_release_runs_through_clip_and_the_user_model(tmp_path):
  from tests import test_clip, test_pasta_kaggle
  release, checkpoint = tmp_path / "release", tmp_path / "clip"
  release.mkdir()
  checkpoint.mkdir()
  test_pasta_kaggle.write_release(str(release))
  test_clip.write_tiny_clip(str(checkpoint))
  config = pasta_real.get_config()
  config.data.kaggle_dir, config.embed.clip_checkpoint = str(release), str(checkpoint)
  config.embed.cache_dir = str(tmp_path / "cache")
  config.world.feature_dim = 16
  config.world.heldout_fraction = 0.25
  config.user_model.num_types, config.user_model.hidden, config.select_k.ks = 2, (4,), (1, 2)
  config.em.mode, config.em.epochs, config.em.restarts = "exact", 3, 2
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir)
  with open(os.path.join(workdir, "data_manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["source"] == "pasta_kaggle" and manifest["sessions"] == len(test_pasta_kaggle.TRAJECTORIES)
  assert manifest["feature_dim"] == 16 and "planted_num_types" not in manifest
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  assert [row["k"] for row in report["user_model"]["k_sweep"]] == [1, 2]
  assert report["user_model"]["heldout_loglik_per_choice"] < 0 and "agent" not in report


def test_the_pasta_release_config_refuses_the_stages_it_cannot_run_yet():
  config = pasta_real.get_config()
  config.data.kaggle_dir = config.embed.clip_checkpoint = config.embed.cache_dir = "/somewhere"
  config.stages = ("data", "user_model", "simulate")
  with pytest.raises(config_lib.ConfigError, match="config.stages"):
    config_lib.validate(config)
  config.stages = ("data",)
  config.embed.clip_checkpoint = ""
  with pytest.raises(config_lib.ConfigError, match="config.embed.clip_checkpoint"):
    config_lib.validate(config)
