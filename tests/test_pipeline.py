"""End to end: the stages through `pipeline.run`, skipping, and the quickstart's promised result."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import pasta_real, quickstart
from configs.common import PAPER_CATEGORIES
from pasta_jax import config as config_lib
from pasta_jax import pipeline
from tests import conftest


def test_pipeline_writes_report_and_skips_finished_stages(tiny_workdir, tmp_path, monkeypatch):
  config, workdir = conftest.tiny_config(), str(tmp_path / "run")
  shutil.copytree(tiny_workdir, workdir)  # The runs below rewrite config.json; other tests read it.

  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  um = report["user_model"]
  for key in (
    "num_types",
    "planted_num_types",
    "heldout_loglik_per_choice",
    "true_model_heldout_loglik_per_choice",
    "ari_vs_planted",
    "selected_k",
  ):
    assert key in um, key
  assert [row["k"] for row in um["k_sweep"]] == list(config.select_k.ks)
  assert all({"k", "heldout_loglik_per_choice", "bic"} <= set(row) for row in um["k_sweep"])
  assert os.path.exists(os.path.join(workdir, "user_model", "k_sweep.png"))
  assert os.path.exists(os.path.join(workdir, "report.md"))
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["config"]["em"]["epochs"] == config.em.epochs and len(saved["config_hash"]) == 16
  policies = {
    "random",
    "generator_order",
    "greedy",
    "oracle",
    "iql/real",
    "iql/sim",
    "iql/real+sim",
    "myopic/real+sim",
    "bc/real",
    "ppo/sim",
    "planning",
  }
  assert set(report["agent"]) == policies
  assert report["agent_best"] in {
    "iql/real",
    "iql/sim",
    "iql/real+sim",
    "myopic/real+sim",
    "bc/real",
    "ppo/sim",
  }
  assert any(
    r["policy"] == report["agent_best"] and r["baseline"] == "greedy"
    for r in report["agent_comparisons"]
  )
  for row in report["agent"].values():
    assert row["ci95"][0] <= row["mean_final_utility"] <= row["ci95"][1]
    assert row["win_rate_ci95"][0] <= row["win_rate_vs_generator_order"] <= row["win_rate_ci95"][1]
    assert len(row["utility_per_turn"]) == config.interaction.turns
  assert report["agent"]["generator_order"]["win_rate_vs_generator_order"] == 0.5
  assert {r["baseline"] for r in report["agent_comparisons"]} == policies - {"iql/real+sim"}
  assert (
    report["agent"]["oracle"]["mean_final_utility"]
    > report["agent"]["random"]["mean_final_utility"]
  )
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
  config.select_k.ks = (3, 4, 5)  # The planted K and its neighbours (the quickstart sweeps 1..6).
  result = pipeline.run(config, str(tmp_path / "quickstart"))["user_model"]
  assert result["ari_vs_planted"] >= 0.9
  truth = result["true_model_heldout_loglik_per_choice"]
  assert result["heldout_loglik_per_choice"] >= truth - 0.02 * abs(truth)
  assert result["selected_k"] == result["planted_num_types"] == config.world.num_types


CANDIDATE_TEXTS = {c: (f"a fox, {c} one", f"a fox, {c} two") for c in PAPER_CATEGORIES}


def _expansion(prompt: str, shift: int) -> dict:
  """One cached LMM expansion: 5 candidates per category, cycling the category's two texts."""
  return {
    "prompt": prompt,
    "candidates": [
      {"text": CANDIDATE_TEXTS[c][(j + shift) % 2], "category": c}
      for c in PAPER_CATEGORIES
      for j in range(5)
    ],
  }


def write_replay_cache(path: str, start_prompts) -> None:
  """Expansions of every start prompt and of one candidate; the other candidates borrow their nearest's."""
  lines = [_expansion(p, i) for i, p in enumerate(start_prompts)] + [
    _expansion(CANDIDATE_TEXTS["style"][0], 1)
  ]
  with open(path, "w") as f:
    f.writelines(json.dumps(line) + "\n" for line in lines)


def with_replay_pool(config, tmp_path, start_prompts) -> None:
  """Points `config` at a tiny random CLIP (width 16) and SDXL and a replay cache of `start_prompts`
  written under tmp_path, with the tiny run's agent (IQL on real + sim, myopic IQL and BC; the tiny
  run has PPO and the planner)."""
  from tests import test_clip, test_render

  clip_dir, sdxl_dir = tmp_path / "clip", tmp_path / "sdxl"
  for directory in (clip_dir, sdxl_dir):
    directory.mkdir()
  test_clip.write_tiny_clip(str(clip_dir))
  test_render.write_tiny_sdxl(str(sdxl_dir))
  write_replay_cache(str(tmp_path / "expansions.jsonl"), start_prompts)
  config.embed.clip_checkpoint, config.embed.sdxl_checkpoint = str(clip_dir), str(sdxl_dir)
  config.candidates.replay_cache = str(tmp_path / "expansions.jsonl")
  config.embed.cache_dir, config.embed.render_dir = (
    str(tmp_path / "cache"),
    str(tmp_path / "renders"),
  )
  config.embed.render_steps = 2
  config.candidates.pool_size = config.interaction.images_per_prompt
  config.world.feature_dim = 16
  config.agent = conftest.tiny_config().agent
  config.agent.data_mixes = ("real+sim",)
  config.agent.ppo.enabled = config.agent.planning.enabled = False


def _real_config(tmp_path):
  """pasta_real on the release fixture with a tiny random CLIP and SDXL and a replay cache of its prompts."""
  from tests import test_pasta_kaggle

  release = tmp_path / "release"
  release.mkdir()
  files = test_pasta_kaggle.write_release(str(release))
  start_prompts = sorted({row["initial_prompt"] for rows in files.values() for row in rows})
  config = pasta_real.get_config()
  config.data.kaggle_dir = str(release)
  with_replay_pool(config, tmp_path, start_prompts)
  config.world.heldout_fraction = 0.5  # Two of the four raters: a bootstrap CI needs two users.
  config.user_model.num_types, config.user_model.hidden, config.select_k.ks = 2, (4,), (1, 2)
  config.em.mode, config.em.epochs, config.em.restarts = "exact", 3, 2
  config.simulate.num_users = 24
  config.evaluate.num_users, config.evaluate.bootstrap_samples = 24, 100
  return config, start_prompts


def test_the_pasta_release_runs_through_every_stage(tmp_path, monkeypatch):
  from pasta_jax import candidates
  from pasta_jax.data import schema
  from tests import test_pasta_kaggle

  config, start_prompts = _real_config(tmp_path)
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir)
  with open(os.path.join(workdir, "data_manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["source"] == "pasta_kaggle" and manifest["sessions"] == len(
    test_pasta_kaggle.TRAJECTORIES
  )
  assert manifest["feature_dim"] == 16 and "planted_num_types" not in manifest

  generator, vocabulary, image_refs = candidates.load_generator(
    os.path.join(workdir, "simulate", "pool.npz")
  )
  texts = [t for pair in CANDIDATE_TEXTS.values() for t in pair]
  assert set(vocabulary) == set(start_prompts) | set(texts)
  assert sorted(vocabulary[i] for i in generator.start_prompts) == start_prompts
  assert generator.image.shape == (4 * len(vocabulary), 16) and image_refs.shape == (
    4 * len(vocabulary),
  )
  assert all(os.path.isfile(os.path.join(config.embed.render_dir, ref)) for ref in image_refs)

  records = schema.read_records(os.path.join(workdir, "simulate", "records.jsonl"))
  table = schema.load_features(os.path.join(workdir, "simulate", "features.npz"), 16)
  schema.validate_records(records, schema.RecordSpec.from_config(config), "simulated", table)
  assert len(records) == config.simulate.num_users * config.interaction.turns
  assert {r.start_prompt for r in records if r.turn == 0} <= set(start_prompts)
  assert {o.text for r in records for o in r.options} <= set(texts)
  assert {im.ref for r in records for o in r.options for im in o.images} <= set(image_refs)
  assert all(len({im.row for im in o.images}) == len(o.images) for r in records for o in r.options)
  with open(os.path.join(workdir, "simulate", "simulate.json")) as f:
    pool_summary = json.load(f)["pool"]
  assert pool_summary["cached_prompts"] == len(start_prompts) + 1
  assert (
    pool_summary["borrowing_prompts"] == len(texts) - 1
    and pool_summary["borrowing_start_prompts"] == 0
  )

  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  assert [row["k"] for row in report["user_model"]["k_sweep"]] == [1, 2]
  assert report["agent_environment"] == "simulator"
  assert set(report["agent"]) == {
    "random",
    "generator_order",
    "greedy",
    "oracle",
    "iql/real+sim",
    "myopic/real+sim",
    "bc/real",
  }
  assert all("on_simulator" not in row for row in report["agent"].values())
  assert report["sim_vs_real"]["loglik"]["per_choice"]["mean"] < 0
  assert "## Agent (the fitted simulator)" in open(os.path.join(workdir, "report.md")).read()

  def fail(*_):
    raise AssertionError("a finished stage ran again")

  for stage in config_lib.STAGES:
    monkeypatch.setitem(pipeline.STAGE_FUNCTIONS, stage, fail)
  pipeline.run(config, workdir)


def test_the_pasta_release_config_names_the_paths_it_needs():
  config = pasta_real.get_config()
  config.data.kaggle_dir = config.embed.clip_checkpoint = config.embed.cache_dir = "/somewhere"
  config.stages = ("data", "user_model", "evaluate")
  config_lib.validate(config)
  config.stages = ("data", "user_model", "simulate")
  with pytest.raises(config_lib.ConfigError, match="config.candidates.replay_cache"):
    config_lib.validate(config)
  config.candidates.replay_cache = config.embed.render_dir = "/somewhere"
  with pytest.raises(config_lib.ConfigError, match="config.embed.sdxl_checkpoint"):
    config_lib.validate(config)
  config.embed.sdxl_checkpoint = "/somewhere"
  config.candidates.unexpanded = "skip"
  with pytest.raises(config_lib.ConfigError, match="config.candidates.unexpanded"):
    config_lib.validate(config)
  config.candidates.unexpanded = "nearest"
  config_lib.validate(config)
  config.candidates.pool_size = config.interaction.images_per_prompt - 1
  with pytest.raises(config_lib.ConfigError, match="config.candidates.pool_size"):
    config_lib.validate(config)
  config.candidates.pool_size = config.interaction.images_per_prompt
  config.stages = ("data",)
  config.embed.clip_checkpoint = ""
  with pytest.raises(config_lib.ConfigError, match="config.embed.clip_checkpoint"):
    config_lib.validate(config)


def test_a_clip_of_another_width_is_refused_before_anything_is_embedded(tmp_path):
  config, _ = _real_config(tmp_path)
  config.world.feature_dim = 32
  with pytest.raises(
    config_lib.ConfigError, match="config.world.feature_dim=32: must equal the projection width 16"
  ):
    pipeline.run_data(config, str(tmp_path / "run"), run_key="")
  assert not os.path.exists(tmp_path / "cache")


def test_the_user_model_stage_starts_every_k_from_a_fitted_model(
  tiny_workdir, tmp_path, monkeypatch
):
  from pasta_jax import checkpoint
  from pasta_jax.user_model import em

  first = tiny_workdir
  warm = conftest.tiny_config()
  warm.stages = ("data", "user_model")
  warm.user_model.init_from = os.path.join(first, "user_model", "fitted")
  config_lib.validate(warm)
  starts, fit = [], em.fit

  def spy(settings, model, *args, init_params=None, **kwargs):
    starts.append((model.num_types, init_params))
    return fit(settings, model, *args, init_params=init_params, **kwargs)

  monkeypatch.setattr(em, "fit", spy)
  pipeline.run(warm, str(tmp_path / "warm"))
  saved = checkpoint.restore_tree(warm.user_model.init_from)["params"]
  assert [k for k, _ in starts] == sorted(set(warm.select_k.ks) | {warm.user_model.num_types})
  for _, params in starts:
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(saved))
  with open(tmp_path / "warm" / "user_model" / "user_model.json") as f:
    assert json.load(f)["init_from"] == warm.user_model.init_from


def test_a_resumed_agent_stage_keeps_the_numbers_of_policies_trained_before_the_kill(
  tiny_workdir, tmp_path, monkeypatch
):
  from pasta_jax.agent import registry

  config = conftest.tiny_config()
  config.stages = ("data", "user_model", "simulate", "agent")
  config.agent.data_mixes = ("real+sim",)  # Another agent config: only the agent stage runs again.
  config.agent.ppo.enabled = False  # tests/test_ppo.py resumes PPO.
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_workdir, workdir)
  train, trained = registry.train_policy, []

  def killed_after_the_first_policy(*args, **kwargs):
    if trained:
      raise KeyboardInterrupt
    trained.append(args[1])
    return train(*args, **kwargs)

  monkeypatch.setattr(registry, "train_policy", killed_after_the_first_policy)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run(config, workdir)
  monkeypatch.setattr(registry, "train_policy", train)
  summary = pipeline.run(config, workdir)["agent"]
  first = summary["policies"]["iql/real+sim"]
  assert first["steps"] == config.agent.iql.steps
  assert set(first["final_metrics"]) == {"value_loss", "critic_loss", "v", "q"}
  assert all(np.isfinite(v) for v in first["final_metrics"].values())
  assert set(summary["policies"]["bc/real"]["final_metrics"]) == {"loss", "accuracy"}
