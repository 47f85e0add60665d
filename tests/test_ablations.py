"""The ablation entry point on a tiny pipeline: rows, CIs with seed variation, real-data subsampling."""

import os

import numpy as np
import pytest
from scipy import stats

from configs import ablations as ablations_config
from pasta_jax import config as config_lib
from pasta_jax import pipeline
from pasta_jax.evaluation import ablations, metrics


def _tiny():
  config = ablations_config.get_config("tiny")
  config.agent.iql.steps = 100
  config.agent.iql.steps_per_dispatch = 50
  config.agent.iql.checkpoint_every_steps = 100
  config.evaluate.num_users = 48
  config.evaluate.bootstrap_samples = 100
  return config


def test_ablations_rows_cis_seeds_and_subsampling(tmp_path):
  config = _tiny()
  ablations.validate_config(config)
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir)
  content = ablations.run(config, workdir)

  selected = content["selected_k"]
  by_factor = {}
  for row in content["rows"]:
    by_factor.setdefault(row["factor"], {})[row["level"]] = row
  assert list(by_factor["sim_fraction"]) == [0.0, 0.5]
  assert list(by_factor["real_data"]) == [0.5, 1.0]
  assert list(by_factor["num_types"]) == [1] and selected >= 1
  for row in content["rows"]:
    assert row["seeds"] == [0, 1] and len(row["seed_means"]) == 2
    assert row["ci95"][0] <= row["mean"] <= row["ci95"][1]
    assert row["mean"] == pytest.approx(np.mean(row["seed_means"]))
    assert row["seed_means"][0] != row["seed_means"][1]
    assert row["ci95_seed_half_width"] > 0
    assert any(name.startswith("data:") for name in row["inputs"])
  turns, sessions = config.interaction.turns, config.world.sessions_per_user
  train_users = config.world.num_users - round(
    config.world.heldout_fraction * config.world.num_users
  )
  half, full = by_factor["real_data"][0.5], by_factor["real_data"][1.0]
  assert half["real_users"] == round(0.5 * train_users)
  assert half["real_transitions"] == half["real_users"] * sessions * turns
  assert full["real_transitions"] == train_users * sessions * turns > half["real_transitions"]
  assert by_factor["sim_fraction"][0.0]["sim_transitions"] == 0
  assert by_factor["sim_fraction"][0.5]["sim_transitions"] == config.simulate.num_users * turns
  k1 = by_factor["num_types"][1]
  assert k1["sim_transitions"] == config.simulate.num_users * turns
  assert any(name.startswith("user_model checkpoint:") for name in k1["inputs"])
  assert k1["seed_means"] != by_factor["sim_fraction"][0.5]["seed_means"]
  assert list(content["reference"]) == ["random"]
  random = content["reference"]["random"]
  assert random["ci95"][0] <= random["mean"] <= random["ci95"][1]
  assert [(c["level"], c["baseline_level"]) for c in content["comparisons"]] == [(0.5, 0.0)]
  out = os.path.join(workdir, "ablations")
  for name in ("ablations.json", "ablations.md", "sim_fraction.png", "real_data.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  assert os.path.getsize(os.path.join(out, "num_types.png")) > 0


def test_seed_user_interval_matches_numpy():
  rng = np.random.default_rng(0)
  values = rng.normal(size=(3, 40)) + np.array([[0.0], [0.3], [-0.2]])
  got = ablations.seed_user_interval(values, num_samples=200, seed=1)
  seed_means = values.mean(axis=1)
  h_seed = stats.t.ppf(0.975, 2) * np.std(seed_means, ddof=1) / np.sqrt(3)
  users = metrics.mean_with_ci(values.mean(axis=0), num_samples=200, seed=1)
  h_user = (users.ci95[1] - users.ci95[0]) / 2
  assert got["mean"] == pytest.approx(values.mean())
  assert got["ci95_seed_half_width"] == pytest.approx(h_seed)
  half = np.hypot(h_seed, h_user)
  assert got["ci95"] == pytest.approx([values.mean() - half, values.mean() + half])
  assert got["seed_means"] == pytest.approx(seed_means)


def test_kept_users_are_nested_and_fixed_by_the_seed():
  users = [f"u{i}" for i in range(20)]
  quarter, half = (ablations.kept_users(users, f, seed=3) for f in (0.25, 0.5))
  assert len(quarter) == 5 and len(half) == 10 and set(quarter) < set(half)
  assert (
    ablations.kept_users(users, 0.5, seed=3) == half != ablations.kept_users(users, 0.5, seed=4)
  )


@pytest.mark.parametrize(
  "field, value",
  [
    ("ablations.seeds", 1),
    ("ablations.sim_fractions", (0.5, 0.5)),
    ("ablations.sim_fractions", (0.01,)),
    ("ablations.real_fractions", (0.0, 1.0)),
    ("ablations.real_sim_fractions", (1.0,)),
    ("ablations.num_types", (0, "selected")),
    ("ablations.factors", ("sim_fraction", "depth")),
    ("ablations.reference_policies", ("planning",)),
  ],
)
def test_validate_config_names_the_field(field, value):
  config = _tiny()
  config.update_from_flattened_dict({field: value})
  with pytest.raises(config_lib.ConfigError, match=f"config.{field}="):
    ablations.validate_config(config)
