"""Pretraining the user model on single-turn preference records (Pick-a-Pic, HPD, Simulacra) on CLIP features.

Each preference record is one turn of its user's history (users are the records' `user_id`; the loaders
give every comparison its own user where a source has none), so `schema.to_choices` makes the EM arrays:
L = the largest slate (pairs and k-way slates mixed, smaller ones masked), M = 1 image per option.
K = 1 is maximum likelihood of the softmax choice (Bradley-Terry for pairs); K = config.user_model.num_types
is EM over user types (`em.fit`).

Held-out metrics, per choice on the validation records:
- `heldout_accuracy` / `heldout_loglik_per_choice`: the prior-mixture predictive Σ_k π_k P(i | slate, k);
  accuracy counts the choices whose option of highest predictive probability is the chosen one (top-1;
  for pairs, pairwise accuracy).
- `..._posterior`: the predictive under the user's type posterior given their earlier held-out choices
  (`posterior.filter_beliefs`, prequential); equal to the prior ones for K = 1 and for one-choice users.

CLI: `python -m pasta_jax.user_model.pretrain --config=configs/pretrain.py --workdir=DIR` writes
DIR/report.json, EM checkpoints under DIR/checkpoints/k<K> and the fitted models as DIR/fitted/k<K>, which
the user_model stage starts from with `--config.user_model.init_from=DIR/fitted/k<K>` (`utility.warm_start`).
"""

import collections
import dataclasses
import os
from collections.abc import Sequence

import chex
import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from pasta_jax import checkpoint, files, parallel, types
from pasta_jax import config as config_lib
from pasta_jax.data import schema
from pasta_jax.user_model import em, posterior, select_k, utility

PREFERENCE_SPEC = schema.RecordSpec(categories=(), slate_size=2, images_per_option=1)


def check_preference_records(
  records: Sequence[schema.ChoiceRecord], table: types.FeatureTable, source: str
) -> None:
  """Raises RecordError naming `source`, the record and the field unless every record is an embedded
  preference (kind "preference", one image per option, rows inside `table`); kinds and image counts are
  checked first."""
  errors = []
  for i, r in enumerate(records):
    where = f"{source}: record {i} (user {r.user_id!r}, session {r.session_id!r})"
    if r.kind != schema.PREFERENCE:
      errors.append(
        f"{where}: field 'kind': {r.kind!r}; pretraining reads {schema.PREFERENCE!r} records"
      )
    for j, opt in enumerate(r.options):
      if len(opt.images) != PREFERENCE_SPEC.images_per_option:
        errors.append(
          f"{where}: field 'options[{j}].images': {len(opt.images)} images; expected "
          f"{PREFERENCE_SPEC.images_per_option}"
        )
  schema.raise_if_any(errors)
  schema.validate_records(records, PREFERENCE_SPEC, source, table)


def cap_user_histories(
  records: Sequence[schema.ChoiceRecord], max_choices: int
) -> list[schema.ChoiceRecord]:
  """Each user's records, in order, as pseudo-users of at most `max_choices` (0: no cap): user "u" keeps its
  first max_choices records and the rest become "u#1", "u#2", ... A few heavy raters (Pick-a-Pic has users
  with tens of thousands of comparisons) would otherwise set T for every user of the padded Choices; a
  chunk's type posterior is already sharp after a few dozen choices."""
  if max_choices <= 0:
    return list(records)
  seen = collections.Counter()
  capped = []
  for r in records:
    chunk = seen[r.user_id] // max_choices
    seen[r.user_id] += 1
    capped.append(r if chunk == 0 else dataclasses.replace(r, user_id=f"{r.user_id}#{chunk}"))
  return capped


def preference_choices(
  records: Sequence[schema.ChoiceRecord],
  table: types.FeatureTable,
  source: str,
  max_choices_per_user: int = 0,
) -> tuple[types.Choices, schema.UserIndex]:
  """Checked preference records -> (Choices as NumPy: U (pseudo-)users of `cap_user_histories`, T = most
  choices of one, L = largest slate, M = 1; UserIndex)."""
  check_preference_records(records, table, source)
  return schema.to_choices(cap_user_histories(records, max_choices_per_user), PREFERENCE_SPEC)


def log_predictives(
  fitted: utility.FittedUsers, table: types.FeatureTable, choices: types.Choices, batch_users: int
) -> tuple[np.ndarray, np.ndarray]:
  """(prior-mixture, filtered-posterior) log predictive choice probabilities, each f32[U, T, L]."""
  return tuple(
    np.asarray(posterior.prequential_log_probs(fitted, table, choices, batch_users, update=update))
    for update in (False, True)
  )


def choice_metrics(log_predictive: np.ndarray, choices: types.Choices) -> dict:
  """Top-1 accuracy and mean log-likelihood of the chosen option over the real choices.

  log_predictive f32[U, T, L] (-inf on padded options) -> {"accuracy", "loglik_per_choice"}.
  """
  mask = np.asarray(choices.turn_mask) & np.asarray(choices.user_mask)[:, None]
  chosen = np.asarray(choices.choice)
  predicted = np.argmax(np.where(np.asarray(choices.option_mask), log_predictive, -np.inf), axis=-1)
  chosen_ll = np.take_along_axis(log_predictive, chosen[..., None], axis=-1)[..., 0]
  return {
    "accuracy": float(np.mean(predicted[mask] == chosen[mask])),
    "loglik_per_choice": float(np.mean(chosen_ll[mask])),
  }


def chance_accuracy(choices: types.Choices) -> float:
  """Mean of 1 / slate size over the real choices: the accuracy of guessing."""
  mask = np.asarray(choices.turn_mask) & np.asarray(choices.user_mask)[:, None]
  return float(np.mean(1.0 / np.sum(np.asarray(choices.option_mask), axis=-1)[mask]))


def fit_types(
  config: ml_collections.ConfigDict,
  num_types: int,
  table: types.FeatureTable,
  train: types.Choices,
  val: types.Choices,
  key: chex.PRNGKey,
  mesh: jax.sharding.Mesh,
  checkpoint_dir: str | None = None,
  show_progress: bool = True,
) -> tuple[dict, utility.FittedUsers]:
  """Fits K = `num_types` types by EM (best restart by training log-likelihood) and scores it on `val`."""
  settings = em.EMSettings.from_config(config.em)
  model = utility.from_config(config, num_types)
  state = em.fit(
    settings, model, table, train, key, mesh, checkpoint_dir, show_progress=show_progress
  )
  result, fitted, _ = select_k.evaluate(state, model, table, train, val, settings.collapse_mass)
  prior, filtered = log_predictives(fitted, table, val, config.pretrain.eval_batch_users)
  prior_metrics, posterior_metrics = choice_metrics(prior, val), choice_metrics(filtered, val)
  report = {
    "num_types": num_types,
    "heldout_accuracy": prior_metrics["accuracy"],
    "heldout_loglik_per_choice": prior_metrics["loglik_per_choice"],
    "heldout_accuracy_posterior": posterior_metrics["accuracy"],
    "heldout_loglik_per_choice_posterior": posterior_metrics["loglik_per_choice"],
    "train_loglik_per_choice": result.train_loglik_per_choice,
    "bic": result.bic,
    "num_params": result.num_params,
    "restart_ari": result.restart_ari,
    "collapsed_types": result.collapsed_types,
    "priors": np.exp(fitted.log_priors).tolist(),
    "inverse_temperature": float(np.exp(fitted.params["params"]["log_inverse_temperature"])),
  }
  return report, fitted


def pretrain(
  config: ml_collections.ConfigDict,
  train_records: Sequence[schema.ChoiceRecord],
  val_records: Sequence[schema.ChoiceRecord],
  table: types.FeatureTable,
  key: chex.PRNGKey,
  mesh: jax.sharding.Mesh,
  checkpoint_dir: str | None = None,
  show_progress: bool = True,
) -> tuple[dict, dict[str, utility.FittedUsers]]:
  """Fits K = 1 and K = config.user_model.num_types on `train_records`, scored on `val_records`.

  Returns (report, fitted): report = {"k1": {...}, "k": {...}, "num_train", "num_val", "num_train_users",
  "num_val_users" (pseudo-users, see `cap_user_histories`: the "_posterior" metrics filter within one),
  "max_choices_per_user", "chance_accuracy"} (JSON-able; see `fit_types` for the per-K fields) and
  fitted = {"k1": FittedUsers, "k": FittedUsers}. With num_types = 1 the K = 1 fit serves as both.
  Checkpoints go to `checkpoint_dir`/k<K>.
  """
  cap = config.pretrain.max_choices_per_user
  train, train_users = preference_choices(train_records, table, config.pretrain.train_split, cap)
  val, val_users = preference_choices(val_records, table, config.pretrain.eval_split, cap)
  report = {
    "num_train": len(train_records),
    "num_val": len(val_records),
    "num_train_users": len(train_users.ids),
    "num_val_users": len(val_users.ids),
    "max_choices_per_user": cap,
    "chance_accuracy": chance_accuracy(val),
  }
  fitted = {}
  num_types = config.user_model.num_types
  for name, k, k_key in zip(("k1", "k"), sorted({1, num_types}), jax.random.split(key)):
    subdir = None if checkpoint_dir is None else os.path.join(checkpoint_dir, f"k{k}")
    report[name], fitted[name] = fit_types(
      config, k, table, train, val, k_key, mesh, subdir, show_progress
    )
  if num_types == 1:
    report["k"], fitted["k"] = report["k1"], fitted["k1"]
  return report, fitted


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises config_lib.ConfigError naming the first invalid `pretrain` (or, to embed, `embed`) field."""
  p = config.pretrain
  for field in ("records_dir", "train_split", "eval_split"):
    config_lib.check(
      isinstance(p[field], str) and bool(p[field]),
      f"pretrain.{field}",
      p[field],
      "must be a non-empty path or name",
    )
  if not p.features:
    for field in ("clip_checkpoint", "cache_dir"):
      config_lib.check(
        bool(config.embed[field]),
        f"embed.{field}",
        config.embed[field],
        "must name a directory to embed the records with CLIP (or set config.pretrain.features)",
      )
  for field in ("feature_dim", "eval_batch_users"):
    config_lib.check_positive_int(config, f"pretrain.{field}")
  cap = p.max_choices_per_user
  config_lib.check(
    config_lib.is_int(cap) and cap >= 0,
    "pretrain.max_choices_per_user",
    cap,
    "must be 0 (no cap) or a positive integer",
  )


def load_splits(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> tuple[list[schema.ChoiceRecord], list[schema.ChoiceRecord], types.FeatureTable]:
  """(train records, eval records, features) of `config.pretrain`: records with rows read with the features
  file, or records as written by `preferences.write_splits`, embedded through CLIP and the feature cache."""
  p = config.pretrain
  paths = [os.path.join(p.records_dir, f"{split}.jsonl") for split in (p.train_split, p.eval_split)]
  train, val = (schema.read_records(path) for path in paths)
  if p.features:
    return train, val, schema.load_features(p.features, p.feature_dim)
  from pasta_jax.embed import cache, clip
  from pasta_jax.embed import records as embed_records

  for records, path in zip((train, val), paths):
    embed_records.image_files(records, p.records_dir, path)
  tower = clip.load_clip(config.embed.clip_checkpoint, mesh)
  config_lib.check(
    tower.dim == p.feature_dim,
    "pretrain.feature_dim",
    p.feature_dim,
    f"must equal the projection width {tower.dim} of {config.embed.clip_checkpoint}",
  )
  with cache.FeatureStore(config.embed.cache_dir) as store:
    records, table = embed_records.embed_records(
      train + val, tower, store, p.records_dir, " + ".join(paths), config.embed.batch_size
    )
  schema.validate_features(table, p.feature_dim, f"{config.embed.clip_checkpoint} features")
  return records[: len(train)], records[len(train) :], table


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Reads (and embeds) the splits named by `config.pretrain`, pretrains, writes workdir/report.json."""
  mesh = parallel.make_mesh(config.mesh)
  train, val, table = load_splits(config, mesh)
  report, fitted = pretrain(
    config,
    train,
    val,
    table,
    jax.random.key(config.seed),
    mesh,
    os.path.join(os.path.abspath(workdir), "checkpoints"),
  )
  saved = {}
  for name, users in fitted.items():
    path = os.path.join(os.path.abspath(workdir), "fitted", f"k{users.model.num_types}")
    if path not in saved.values():  # With num_types = 1, "k" is the "k1" fit.
      checkpoint.save_tree(path, {"params": users.params, "log_priors": users.log_priors})
    saved[name] = path
  report = {"pretrain": report, "fitted": saved, "config_hash": config_lib.config_hash(config)}
  os.makedirs(workdir, exist_ok=True)
  files.write_json(os.path.join(workdir, "report.json"), report)
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  parallel.maybe_initialize_distributed()
  try:
    config_lib.validate(flags.FLAGS.config)
    validate_config(flags.FLAGS.config)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from None
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  config_flags.DEFINE_config_file(
    "config", None, "Path to a config file with get_config().", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Directory for report.json and the EM checkpoints.")
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
