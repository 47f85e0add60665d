"""data.source="records": a lab's own records and features through the data and user_model stages."""

import dataclasses
import importlib.util
import json
import os

import numpy as np
import pytest

from configs import records as records_config
from pasta_jax import artefacts, files, pipeline
from pasta_jax import config as config_lib
from pasta_jax.data import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "records")


def _make_example():
  spec = importlib.util.spec_from_file_location(
    "make_example", os.path.join(EXAMPLE, "make_example.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _config(records_path: str, features_path: str):
  config = records_config.get_config()
  config.data.records, config.data.features = records_path, features_path
  config.select_k.ks, config.user_model.num_types = (2,), 2
  config.em.epochs, config.em.restarts = 3, 1
  return config


@pytest.fixture()
def example(tmp_path):
  """(records path, features path) of the example written by examples/records/make_example.py."""
  return _make_example().write(str(tmp_path))


def test_the_committed_example_is_what_make_example_writes(example):
  written, table = schema.read_records(example[0]), schema.load_features(example[1], 8)
  committed = schema.read_records(os.path.join(EXAMPLE, "records.jsonl"))
  saved = schema.load_features(os.path.join(EXAMPLE, "features.npz"), 8)
  assert written == committed
  np.testing.assert_array_equal(table.image, saved.image)
  np.testing.assert_array_equal(table.text, saved.text)


def test_user_records_run_through_data_and_user_model(example, tmp_path):
  config = _config(*example)
  workdir = str(tmp_path / "run")
  results = pipeline.run(config, workdir)

  records = schema.read_records(example[0])
  assert schema.read_records(os.path.join(workdir, "data", "records.jsonl")) == records
  copied = schema.load_features(os.path.join(workdir, "data", "features.npz"), 8)
  np.testing.assert_array_equal(copied.image, schema.load_features(example[1], 8).image)
  split = files.read_json(os.path.join(workdir, "data", "split.json"))
  users = sorted({r.user_id for r in records})
  assert sorted(split["train"] + split["heldout"]) == users and len(split["heldout"]) == 1
  manifest = results["data"]
  assert manifest["source"] == "records" and manifest["records"] == len(records) == 20
  assert "planted_num_types" not in manifest
  with open(os.path.join(workdir, "user_model", "user_model.json")) as f:
    summary = json.load(f)
  assert summary["num_types"] == 2 and "ari_vs_planted" not in summary
  assert np.isclose(sum(summary["priors"]), 1.0)
  assert summary["heldout_loglik_per_choice"] < 0
  assert os.path.isdir(os.path.join(workdir, "user_model", "fitted"))


def test_user_records_get_sim_vs_real_without_an_agent(example, tmp_path):
  """The evaluate stage after user_model alone: sim vs real on the held-out raters, per turn within a
  session read from the records, and no agent section."""
  config = _config(*example)
  config.stages = ("data", "user_model", "evaluate")
  config.world.heldout_fraction = 0.4
  config.evaluate.bootstrap_samples = 100
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir)
  with open(os.path.join(workdir, "report.json")) as f:
    report = json.load(f)
  assert "agent" not in report
  loglik = report["sim_vs_real"]["loglik"]
  assert len(loglik["per_turn"]) == config.interaction.turns
  low, high = loglik["per_choice"]["ci95"]
  assert low <= loglik["per_choice"]["mean"] <= high < 0
  assert os.path.isfile(os.path.join(workdir, "evaluate", "calibration.png"))
  records = schema.read_records(example[0])
  ids = files.read_json(os.path.join(workdir, "data", "split.json"))["heldout"]
  turns = schema.session_turns(records, ids, 5)
  expected = [[r.turn for r in records if r.user_id == u] + [0] * (5 - 4) for u in ids]
  np.testing.assert_array_equal(turns, expected)


def test_histories_split_into_rows_give_the_stages_the_same_numbers(example, tmp_path):
  """data.turns_per_row=2 cuts each rater's 4 choices into 2 rows: the data, user_model and evaluate
  stages report what they report with one row per rater (EM, held-out scores, sim vs real)."""
  reports = []
  for turns_per_row in (0, 2):
    config = _config(*example)
    config.stages = ("data", "user_model", "evaluate")
    config.world.heldout_fraction = 0.4
    config.evaluate.bootstrap_samples = 100
    config.data.turns_per_row = turns_per_row
    workdir = str(tmp_path / f"rows{turns_per_row}")
    pipeline.run(config, workdir)
    data = artefacts.load_data(config, workdir)
    assert data.train.choice.shape[1] == (turns_per_row or 4)
    with open(os.path.join(workdir, "user_model", "user_model.json")) as f:
      summary = json.load(f)
    with open(os.path.join(workdir, "report.json")) as f:
      reports.append((summary["k_sweep"], summary["priors"], json.load(f)["sim_vs_real"]))
  (sweep, priors, checks), (split_sweep, split_priors, split_checks) = reports
  for row, split_row in zip(sweep, split_sweep):
    for field in ("heldout_loglik_per_choice", "train_loglik_per_choice", "bic"):
      np.testing.assert_allclose(split_row[field], row[field], rtol=1e-5, err_msg=field)
  np.testing.assert_allclose(split_priors, priors, atol=1e-5)
  loglik, split_loglik = checks["loglik"]["per_choice"], split_checks["loglik"]["per_choice"]
  np.testing.assert_allclose(split_loglik["mean"], loglik["mean"], rtol=1e-5)
  np.testing.assert_allclose(split_loglik["ci95"], loglik["ci95"], rtol=1e-5)


def test_user_records_with_a_replay_cache_run_through_simulate_and_agent(example, tmp_path):
  """A lab's records, with an LMM's expansions of their start prompts (the replay pool, embedded by a
  tiny random CLIP of width 16 and rendered by a tiny random SDXL), through simulate and agent: the
  simulator replays the cached candidates and the agent trains on the lab's sessions plus simulated
  ones (tests/test_pipeline.py evaluates such policies on the PASTA release's path)."""
  from tests import test_pipeline

  records_path, features_path = example
  table = schema.load_features(features_path, 8)
  wide = str(tmp_path / "features16.npz")
  schema.save_features(
    wide,
    dataclasses.replace(
      table, image=np.pad(table.image, ((0, 0), (0, 8))), text=np.pad(table.text, ((0, 0), (0, 8)))
    ),
  )
  config = _config(records_path, wide)
  config.stages = ("data", "user_model", "simulate", "agent")
  records = schema.read_records(records_path)
  start_prompts = sorted({r.start_prompt for r in records if r.turn == 0})
  test_pipeline.with_replay_pool(config, tmp_path, start_prompts)
  config.simulate.num_users = 8
  workdir = str(tmp_path / "run")
  pipeline.run(config, workdir)

  simulated = schema.read_records(os.path.join(workdir, "simulate", "records.jsonl"))
  assert len(simulated) == config.simulate.num_users * config.interaction.turns
  assert {r.start_prompt for r in simulated if r.turn == 0} <= set(start_prompts)
  texts = {t for pair in test_pipeline.CANDIDATE_TEXTS.values() for t in pair}
  assert {o.text for r in simulated for o in r.options} <= texts
  assert all(len(r.options) == config.interaction.slate_size for r in simulated)
  with open(os.path.join(workdir, "agent", "agent.json")) as f:
    policies = json.load(f)["policies"]
  assert set(policies) == {"iql/real+sim", "myopic/real+sim", "bc/real"}
  for policy in policies.values():
    assert all(np.isfinite(v) for v in policy["final_metrics"].values())


def test_a_split_with_one_held_out_rater_is_refused_before_fitting_when_evaluate_runs(
  example, tmp_path
):
  config = _config(*example)
  config.stages = ("data", "user_model", "evaluate")
  with pytest.raises(
    config_lib.ConfigError,
    match=r"config\.world\.heldout_fraction=0\.2: of the data's 5 users it holds out 1 and trains on 4",
  ):
    pipeline.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run" / "data.done.json")
  assert not os.path.exists(tmp_path / "run" / "user_model")


def test_missing_files_and_a_missing_generator_are_config_errors(example, tmp_path):
  config = _config(str(tmp_path / "absent.jsonl"), example[1])
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.records=.*absent\.jsonl"):
    config_lib.validate(config)
  config = _config(example[0], "")
  with pytest.raises(config_lib.ConfigError, match=r"config\.data\.features=''"):
    config_lib.validate(config)
  config = _config(*example)
  config.stages = ("data", "user_model", "simulate", "agent")
  with pytest.raises(
    config_lib.ConfigError, match=r"config\.candidates\.replay_cache=''.*\('simulate', 'agent'\)"
  ):
    config_lib.validate(config)
  config.stages = ("data", "user_model", "evaluate", "report")
  config_lib.validate(config)


def test_invalid_user_records_name_the_file_record_and_field(example, tmp_path):
  records = schema.read_records(example[0])
  records[3] = dataclasses.replace(records[3], choice=7)
  bad = str(tmp_path / "bad.jsonl")
  schema.write_records(bad, records)
  config = _config(bad, example[1])
  with pytest.raises(schema.RecordError, match=rf"{bad}: record 3 .*field 'choice'"):
    pipeline.run_data(config, str(tmp_path / "run"), "")
  config = _config(*example)
  config.world.feature_dim = 4
  with pytest.raises(schema.RecordError, match=r"features\.npz.*'image'.*width"):
    pipeline.run_data(config, str(tmp_path / "run"), "")


# Ragged slates: unavailable options and options with fewer images, masked everywhere.


def _ragged_choices(example):
  """(records, table, Choices, UserIndex) of the example, whose ana-1 session has a 2-option slate and
  a 1-image option; the last session is left out, so its user has padded turns."""
  config = records_config.get_config()
  spec = schema.RecordSpec.from_config(config)
  records, table = schema.read_records(example[0]), schema.load_features(example[1], 8)
  schema.validate_records(records, spec, example[0], table)
  choices, users = schema.to_choices(records[:-2], spec)
  return records, table, choices, users


def _model(aggregation: str):
  from pasta_jax.user_model import utility

  return utility.UtilityModel(
    num_types=3, hidden=(4,), aggregation=aggregation, use_text_features=True
  )


def _params(model, table, choices):
  import jax

  from pasta_jax.user_model import em

  params = model.init(jax.random.key(1), em.example_options(table, choices))
  # Scale the heads so that the padded images, were they counted, would move every utility.
  return jax.tree.map(lambda x: 3.0 * x, params)


@pytest.mark.parametrize("aggregation", ["mean", "max", "logsumexp"])
def test_ragged_loglik_matches_the_numpy_reference(example, aggregation):
  import jax

  from pasta_jax.user_model import em
  from tests import reference

  _, table, choices, _ = _ragged_choices(example)
  assert not choices.option_mask.all() and not choices.image_mask[choices.option_mask].all()
  assert not choices.turn_mask.all()
  model = _model(aggregation)
  params = _params(model, table, choices)
  loglik = jax.jit(em.user_loglik, static_argnums=1)(params, model, table, choices)
  expected = reference.user_loglik(params, table, choices, aggregation=aggregation)
  assert np.isfinite(expected).all()
  np.testing.assert_allclose(np.asarray(loglik), expected, rtol=1e-5, atol=1e-5)
  full = dataclasses.replace(choices, image_mask=None)
  unmasked = reference.user_loglik(params, table, full, aggregation=aggregation)
  assert np.abs(unmasked - expected).max() > 1e-3


def test_ragged_gradients_are_finite(example):
  import jax

  from pasta_jax.user_model import em

  _, table, choices, _ = _ragged_choices(example)
  for aggregation in ("max", "logsumexp"):
    model = _model(aggregation)
    params = _params(model, table, choices)
    grads = jax.grad(lambda p, m=model: em.user_loglik(p, m, table, choices).sum())(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_ragged_prequential_predictive_and_sim_vs_real_match_numpy(example):
  import jax.numpy as jnp

  from pasta_jax.evaluation import sim_vs_real
  from pasta_jax.user_model import posterior, utility
  from tests import reference

  _, table, choices, _ = _ragged_choices(example)
  model = _model("mean")
  params = _params(model, table, choices)
  log_priors = jnp.log(jnp.asarray([0.5, 0.3, 0.2]))
  fitted = utility.FittedUsers(model=model, params=params, log_priors=log_priors)
  log_probs = np.asarray(posterior.prequential_log_probs(fitted, table, choices, batch_users=2))
  expected = reference.prequential_log_probs(params, log_priors, table, choices)
  real = choices.option_mask & choices.turn_mask[..., None]
  assert np.isneginf(log_probs[~real]).all()
  np.testing.assert_allclose(log_probs[real], expected[real], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.exp(log_probs).sum(-1)[choices.turn_mask], 1.0, rtol=1e-5)

  result = sim_vs_real.heldout_loglik(log_probs, choices, turns_per_session=2, num_samples=20)
  chosen = np.take_along_axis(expected, choices.choice[..., None], -1)[..., 0]
  np.testing.assert_allclose(
    result.per_choice.mean, chosen[choices.turn_mask].mean(), rtol=1e-5, atol=1e-6
  )
  counts = choices.option_mask.sum(-1)[choices.turn_mask]
  np.testing.assert_allclose(result.uniform.mean, -np.log(counts).mean(), rtol=1e-9)
  assert counts.min() == 2


def test_feature_statistics_count_the_real_images_only(example):
  from pasta_jax.user_model import utility

  _, table, choices, _ = _ragged_choices(example)
  stats = utility.feature_stats(table, choices)
  shown = choices.option_mask & choices.turn_mask[..., None]
  rows = choices.image_rows[shown[..., None] & choices.image_mask]
  image = np.asarray(table.image, np.float64)[rows]
  np.testing.assert_allclose(stats.image_mean, image.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats.image_scale, image.std(0), rtol=1e-4, atol=1e-6)


def test_the_agents_sessions_pad_and_mask_ragged_slates(example):
  import jax.numpy as jnp

  from pasta_jax.agent import data as agent_data
  from pasta_jax.user_model import utility
  from tests import reference

  records, table, _, _ = _ragged_choices(example)
  spec = schema.RecordSpec.from_config(records_config.get_config())
  users = sorted({r.user_id for r in records})
  sessions = agent_data.sessions_from_records(records, table, spec, users, 2, example[0])
  assert sessions.image_rows.shape == (10, 2, 3, 2)
  short = [s for s in range(10) if not sessions.option_mask[s].all()]
  assert len(short) == 1 and sessions.option_mask[short[0]].sum() == 5
  assert sessions.image_mask.sum() == sessions.option_mask.sum() * 2 - 1
  np.testing.assert_array_equal(sessions.slate_text[~sessions.option_mask], 0.0)

  model = _model("max")
  params = _params(model, table, schema.to_choices(records, spec)[0])
  fitted = utility.FittedUsers(model=model, params=params, log_priors=jnp.zeros(3))
  posteriors = np.full((len(users), 3), 1 / 3, np.float32)
  rewards = agent_data.label_rewards(fitted, table, sessions, posteriors)
  utils, _ = reference.utilities(
    params,
    np.asarray(table.image)[sessions.image_rows],
    sessions.slate_text,
    aggregation="max",
    image_mask=sessions.image_mask,
  )
  chosen = np.take_along_axis(utils, sessions.choice[..., None, None], axis=2)[:, :, 0]
  np.testing.assert_allclose(rewards, chosen.mean(-1), rtol=1e-5, atol=1e-5)
  transitions = agent_data.transitions_from_sessions(sessions, rewards)
  np.testing.assert_array_equal(transitions.slate_mask, sessions.option_mask.reshape(20, 3))


def test_a_split_naming_unknown_or_shared_users_is_refused(example, tmp_path):
  from pasta_jax import artefacts

  config, workdir = _config(*example), str(tmp_path / "run")
  pipeline.run_data(config, workdir, "")
  data = artefacts.load_data(config, workdir)
  assert len(data.train_users.ids) == 4 and len(data.heldout_users.ids) == 1
  path = os.path.join(workdir, artefacts.SPLIT)
  split = files.read_json(path)
  for bad, expected in (
    (
      {"train": split["train"] + ["zoe"], "heldout": split["heldout"]},
      rf"{path}: field 'train': user 'zoe' has no records in data/records\.jsonl",
    ),
    (
      {"train": split["train"], "heldout": split["heldout"] + split["train"][:1]},
      rf"{path}: field 'heldout': user '{split['train'][0]}' is listed also in field 'train'",
    ),
    ({"train": split["train"]}, rf"{path}: field 'heldout': expected a list of user ids"),
  ):
    files.write_json(path, bad)
    with pytest.raises(schema.RecordError, match=expected):
      artefacts.load_data(config, workdir)
