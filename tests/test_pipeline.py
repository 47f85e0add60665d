"""End to end: the stages through `pipeline.run`, skipping, and the quickstart's promised result."""

import json
import os

import pytest

from configs import quickstart
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

  def fail(*_):
    raise AssertionError("a finished stage ran again")

  monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "data", fail)
  monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, "user_model", fail)
  again = pipeline.run(config, workdir)
  assert again["user_model"]["selected_k"] == um["selected_k"]

  changed = conftest.tiny_config()
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
