"""Pretraining on preference records: a planted linear Bradley-Terry world with two user types, the held-out
metrics against a NumPy reference, K=2 against K=1, record errors and the CLI's report.json."""

import collections
import dataclasses
import json
import os
import re

import chex
import jax
import numpy as np
import pytest

from configs import pretrain as pretrain_config
from pasta_jax import checkpoint, parallel, pipeline, types
from pasta_jax import config as config_lib
from pasta_jax.data import schema
from pasta_jax.user_model import pretrain, utility
from tests import reference

DIM = 6
NUM_IMAGES = 300
NUM_PROMPTS = 40
TURNS = 6


def _config():
  c = pretrain_config.get_config()
  c.pretrain.feature_dim = DIM
  c.pretrain.eval_batch_users = 64
  c.user_model.num_types = 2
  c.user_model.hidden = ()
  c.em.update(mode="exact", epochs=6, m_steps=10, restarts=2, checkpoint_every_epochs=3)
  return c


def _table(rng) -> types.FeatureTable:
  return types.FeatureTable(
    image=rng.normal(size=(NUM_IMAGES, DIM)).astype(np.float32),
    text=rng.normal(size=(NUM_PROMPTS, DIM)).astype(np.float32),
  )


def _record(rng, table, weights, user_id, session_id, user_type):
  """One comparison of a user of `user_type`: every 4th slate 3-way, the rest pairs; choice ~ softmax(x w)."""
  size = 3 if rng.random() < 0.25 else 2
  rows = rng.choice(NUM_IMAGES, size=size, replace=False)
  prompt = int(rng.integers(NUM_PROMPTS))
  logits = table.image[rows] @ weights[user_type]
  probs = np.exp(logits - logits.max())
  options = tuple(
    schema.Option(
      text=f"prompt {prompt}",
      category=schema.PREFERENCE_CATEGORY,
      text_row=prompt,
      images=(schema.Image(ref=f"img{r}", row=int(r)),),
    )
    for r in rows
  )
  return schema.ChoiceRecord(
    kind=schema.PREFERENCE,
    user_id=user_id,
    session_id=session_id,
    turn=0,
    start_prompt=f"prompt {prompt}",
    options=options,
    choice=int(rng.choice(size, p=probs / probs.sum())),
    user_type=user_type,
    start_text_row=prompt,
  )


def _records(rng, table, weights, prefix, num_users, single_users=0):
  """`num_users` users (alternating types) with TURNS comparisons each, then `single_users` one-comparison
  users (as for a source without user ids)."""
  records = []
  for u in range(num_users + single_users):
    for t in range(TURNS if u < num_users else 1):
      records.append(_record(rng, table, weights, f"{prefix}{u}", f"{prefix}{u}-{t}", u % 2))
  return records


def _world(seed, shared_scale):
  """(table, train records, val records): types' weights shared_scale * a ± b."""
  rng = np.random.default_rng(seed)
  table = _table(rng)
  a, b = rng.normal(size=(2, DIM))
  weights = np.stack([shared_scale * a + b, shared_scale * a - b])
  return (
    table,
    _records(rng, table, weights, "train", 160, 16),
    _records(rng, table, weights, "val", 80),
  )


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


def _pretrain(world, mesh):
  table, train, val = world
  return pretrain.pretrain(
    _config(), train, val, table, jax.random.key(0), mesh, show_progress=False
  )


@pytest.fixture(scope="module")
def partial(mesh):
  world = _world(0, shared_scale=1.5)
  return world, _pretrain(world, mesh)


@pytest.fixture(scope="module")
def opposite(mesh):
  world = _world(1, shared_scale=0.0)
  return world, _pretrain(world, mesh)


def _numpy_predictives(fitted, table, choices):
  """float64 (prior-mixture, filtered-posterior) log predictive f64[U, T, L], by a loop over turns."""
  image, text = reference.gather(table, choices)
  stats = fitted.params["feature_stats"]  # The fitted model standardises its features.
  image = (image - stats["image_mean"]) / stats["image_scale"]
  text = (text - stats["text_mean"]) / stats["text_scale"]
  utils, tau = reference.utilities(
    fitted.params,
    image,
    text,
    activation=fitted.model.activation,
    aggregation=fitted.model.aggregation,
    use_text_features=fitted.model.use_text_features,
  )
  log_prob = reference.log_prob(utils, tau, choices.option_mask)  # [U, T, L, K]
  log_pi = reference.log_softmax(np.asarray(fitted.log_priors, np.float64), axis=-1)
  prior = reference.logsumexp(log_prob + log_pi, axis=-1)
  belief = np.tile(log_pi, (choices.num_users, 1))
  filtered = np.empty(prior.shape)
  for t in range(choices.choice.shape[1]):
    filtered[:, t] = reference.logsumexp(log_prob[:, t] + belief[:, None, :], axis=-1)
    chosen = np.take_along_axis(log_prob[:, t], choices.choice[:, t, None, None], axis=1)[:, 0]
    belief = np.where(
      choices.turn_mask[:, t, None], reference.log_softmax(belief + chosen, axis=-1), belief
    )
  return prior, filtered


def _numpy_metrics(log_predictive, choices):
  hits, logliks = [], []
  for u, t in zip(*np.nonzero(choices.turn_mask)):
    real = log_predictive[u, t, : int(np.sum(choices.option_mask[u, t]))]
    hits.append(int(np.argmax(real)) == choices.choice[u, t])
    logliks.append(real[choices.choice[u, t]])
  return np.mean(hits), np.mean(logliks)


def test_k1_beats_chance_when_types_agree_partially(partial):
  _, (report, _) = partial
  assert report["num_train"] == 160 * TURNS + 16 and report["num_val"] == 80 * TURNS
  assert report["num_train_users"] == 176 and report["num_val_users"] == 80
  assert 0.5 > report["chance_accuracy"] > 1 / 3
  k1 = report["k1"]
  assert k1["num_types"] == 1 and k1["heldout_accuracy"] > report["chance_accuracy"] + 0.15
  assert k1["heldout_accuracy_posterior"] == k1["heldout_accuracy"]
  assert k1["heldout_loglik_per_choice_posterior"] == pytest.approx(
    k1["heldout_loglik_per_choice"], abs=1e-6
  )
  json.dumps(report)


def test_k2_beats_k1_when_types_disagree(opposite):
  _, (report, _) = opposite
  k1, k2 = report["k1"], report["k"]
  assert k2["num_types"] == 2 and abs(k1["heldout_accuracy"] - report["chance_accuracy"]) < 0.1
  assert k2["heldout_accuracy_posterior"] > k1["heldout_accuracy"] + 0.15
  assert k2["heldout_loglik_per_choice_posterior"] > k1["heldout_loglik_per_choice"] + 0.1
  assert k2["train_loglik_per_choice"] > k1["train_loglik_per_choice"] + 0.1


@pytest.mark.parametrize("name", ["k1", "k"])
def test_metrics_match_numpy(partial, name):
  (table, _, val), (report, fitted) = partial
  choices, _ = pretrain.preference_choices(val, table, "val")
  prior, filtered = _numpy_predictives(fitted[name], table, choices)
  for suffix, log_predictive in (("", prior), ("_posterior", filtered)):
    accuracy, loglik = _numpy_metrics(log_predictive, choices)
    assert report[name][f"heldout_accuracy{suffix}"] == accuracy
    assert report[name][f"heldout_loglik_per_choice{suffix}"] == pytest.approx(loglik, rel=1e-5)


def _with(record, **changes):
  return schema.ChoiceRecord(**{**vars(record), **changes})


@pytest.mark.parametrize("problem", ["unembedded", "session_turn", "two_images"])
def test_bad_records_are_rejected_naming_file_record_and_field(partial, problem):
  (table, _, val), _ = partial
  option = val[3].options[1]
  bad_option = {
    "unembedded": schema.Option(
      option.text, option.category, option.text_row, (schema.Image(ref="x", row=-1),)
    ),
    "two_images": schema.Option(option.text, option.category, option.text_row, option.images * 2),
  }
  bad = (
    _with(val[3], kind=schema.SESSION_TURN)
    if problem == "session_turn"
    else _with(val[3], options=(val[3].options[0], bad_option[problem]))
  )
  field = {
    "unembedded": "'options[1].images[0].row'",
    "session_turn": "'kind'",
    "two_images": "'options[1].images'",
  }[problem]
  with pytest.raises(
    schema.RecordError, match=rf"val.jsonl: record 3 \(user 'val0'.*field {re.escape(field)}"
  ):
    pretrain.preference_choices(val[:3] + [bad] + val[4:], table, "val.jsonl")


def test_heavy_users_are_split_into_pseudo_users_of_at_most_the_cap(partial):
  (table, train, _), _ = partial
  users = [r.user_id for r in train]
  heavy = users[0]
  own = [r for r in train if r.user_id == heavy]
  records = (
    own
    + [dataclasses.replace(r, session_id=f"{r.session_id}-again") for r in own]
    + [r for r in train if r.user_id != heavy]
  )
  capped = pretrain.cap_user_histories(records, 4)
  assert [r.user_id for r in capped[: 2 * TURNS]] == [heavy] * 4 + [f"{heavy}#1"] * 4 + [
    f"{heavy}#2"
  ] * 4
  assert [dataclasses.replace(r, user_id=heavy) for r in capped[: 2 * TURNS]] == records[
    : 2 * TURNS
  ]
  choices, index = pretrain.preference_choices(
    records, table, "train.jsonl", max_choices_per_user=4
  )
  counts = collections.Counter(r.user_id for r in records)
  assert choices.turn_mask.shape[1] == 4 and len(index.ids) == sum(
    -(-n // 4) for n in counts.values()
  )
  assert np.sum(choices.turn_mask) == len(records)
  assert pretrain.cap_user_histories(records, 0) == records


def test_run_writes_report_json(partial, tmp_path):
  (table, train, val), (report, _) = partial
  records_dir = tmp_path / "records"
  records_dir.mkdir()
  schema.write_records(str(records_dir / "train.jsonl"), train)
  schema.write_records(str(records_dir / "validation.jsonl"), val)
  schema.save_features(str(records_dir / "features.npz"), table)
  config = _config()
  config.pretrain.records_dir = str(records_dir)
  config.pretrain.features = str(records_dir / "features.npz")
  pretrain.validate_config(config)
  workdir = tmp_path / "run"
  pretrain.run(config, str(workdir))
  with open(workdir / "report.json") as f:
    written = json.load(f)["pretrain"]
  assert written["k"]["heldout_accuracy"] == pytest.approx(
    report["k"]["heldout_accuracy"], abs=0.02
  )
  assert os.listdir(workdir / "checkpoints") and sorted(os.listdir(workdir / "checkpoints")) == [
    "k1",
    "k2",
  ]
  with open(workdir / "report.json") as f:
    assert json.load(f)["fitted"] == {
      "k1": str(workdir / "fitted" / "k1"),
      "k": str(workdir / "fitted" / "k2"),
    }
  pipeline_config = (
    _config()
  )  # A user_model stage on the same CLIP features, started from the K = 2 fit.
  pipeline_config.world.feature_dim, pipeline_config.user_model.init_from = (
    DIM,
    str(workdir / "fitted" / "k2"),
  )
  saved = checkpoint.restore_tree(str(workdir / "fitted" / "k2"))
  choices, _ = pretrain.preference_choices(train, table, "train.jsonl")
  chex.assert_trees_all_equal(pipeline.load_init_params(pipeline_config, DIM), saved["params"])
  assert saved["params"]["params"]["heads"]["kernel"].shape == (2 * DIM, 2)
  stats = utility.feature_stats(table, choices)  # The fitted model carries its training statistics.
  np.testing.assert_allclose(
    saved["params"]["feature_stats"]["image_mean"], stats.image_mean, rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    saved["params"]["feature_stats"]["text_scale"], stats.text_scale, rtol=1e-5
  )
  pipeline_config.user_model.hidden = (4,)
  mismatch = r"config.user_model.init_from='.*k2': the pretrained model has parameters \[\] that this model lacks"
  with pytest.raises(config_lib.ConfigError, match=mismatch + r", and lacks \['params/trunk_0"):
    pipeline.load_init_params(pipeline_config, DIM)


def test_pickapic_parquet_through_the_cli_and_clip_into_a_pretraining_report(tmp_path):
  """Pick-a-Pic parquet -> `python -m pasta_jax.data.preferences` -> CLIP embedding -> K = 1 and K = 2 fits."""
  import subprocess
  import sys

  from tests import test_clip, test_preferences

  rows = tuple(
    (100 + u, f"prompt {u} {i}", float(i % 2), float(1 - i % 2))
    for u in range(24)
    for i in range(2)
  )
  parquet = test_preferences.write_pickapic(
    tmp_path / "train-0.parquet", test_preferences.pickapic_table(rows)
  )
  splits = tmp_path / "splits"
  subprocess.run(
    [
      sys.executable,
      "-m",
      "pasta_jax.data.preferences",
      "--source=pickapic",
      f"--input={parquet}",
      f"--output={splits}",
    ],
    check=True,
    capture_output=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  with open(splits / "data_manifest.json") as f:
    counts = {name: entry["count"] for name, entry in json.load(f)["splits"].items()}
  assert sum(counts.values()) == len(rows) and counts["train"] > 0 and counts["validation"] > 0
  checkpoint = tmp_path / "clip"
  checkpoint.mkdir()
  test_clip.write_tiny_clip(str(checkpoint))
  config = _config()
  config.pretrain.records_dir, config.pretrain.feature_dim = str(splits), 16
  with pytest.raises(config_lib.ConfigError, match="config.embed.clip_checkpoint"):
    pretrain.validate_config(config)
  config.embed.clip_checkpoint, config.embed.cache_dir = str(checkpoint), str(tmp_path / "cache")
  pretrain.validate_config(config)
  config.pretrain.feature_dim = 32
  with pytest.raises(
    config_lib.ConfigError, match="config.pretrain.feature_dim=32: must equal the projection width"
  ):
    pretrain.run(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "cache")  # Refused before anything was embedded.
  config.pretrain.feature_dim = 16
  image = splits / schema.read_records(str(splits / "validation.jsonl"))[0].options[1].images[0].ref
  os.rename(image, f"{image}.moved")
  with pytest.raises(
    schema.RecordError, match=r"validation.jsonl: record 0 .*field 'options\[1\].images\[0\].ref'"
  ):
    pretrain.run(config, str(tmp_path / "run"))
  os.rename(f"{image}.moved", image)
  pretrain.run(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "report.json") as f:
    written = json.load(f)["pretrain"]
  assert written["num_train"] == counts["train"] and written["num_val"] == counts["validation"]
  assert written["max_choices_per_user"] == config.pretrain.max_choices_per_user
  for name in ("k1", "k"):
    assert (
      0.0 <= written[name]["heldout_accuracy"] <= 1.0
      and written[name]["heldout_loglik_per_choice"] < 0
    )
