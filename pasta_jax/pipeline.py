"""The stages, each a library function `run_<stage>(config, workdir, run_key) -> dict`, what each
depends on (`STAGE_SPECS`), and the runner: it holds the workdir's lock, skips a stage whose outputs
hold for this config and these inputs, and refuses to run one whose upstream does not
(`provenance`)."""

import json
import os
import time
from collections.abc import Callable

import jax
import ml_collections
import numpy as np

from pasta_jax import (
  artefacts,
  checkpoint,
  config_checks,
  files,
  parallel,
  provenance,
  runs,
  simulator,
  synthetic_env,
  types,
)
from pasta_jax import config as config_lib
from pasta_jax.agent import registry
from pasta_jax.agent import stage as agent_stage
from pasta_jax.data import layout, schema, synthetic
from pasta_jax.evaluation import environments, evaluate, report
from pasta_jax.user_model import em, select_k, utility

LICENCE = "CC BY-SA 4.0"


def _real(config: ml_collections.ConfigDict) -> bool:
  return config.data.source != "synthetic"


def split_users(
  user_ids: list[str], heldout_fraction: float, seed: int
) -> tuple[list[str], list[str]]:
  """A user-disjoint train/held-out split, fixed by the seed."""
  order = np.random.default_rng(seed).permutation(len(user_ids))
  num_heldout = int(round(heldout_fraction * len(user_ids)))
  heldout = sorted(user_ids[i] for i in order[:num_heldout])
  train = sorted(user_ids[i] for i in order[num_heldout:])
  return train, heldout


def check_split(config: ml_collections.ConfigDict, train: list[str], heldout: list[str]) -> None:
  """ConfigError naming world.heldout_fraction unless the split leaves a training user and, when the
  evaluate stage will run, the two held-out users that sim-vs-real's user-clustered CIs need (one
  otherwise)."""
  needed = 2 if "evaluate" in config.stages else 1
  config_checks.check(
    bool(train) and len(heldout) >= needed,
    "world.heldout_fraction",
    config.world.heldout_fraction,
    f"of the data's {len(train) + len(heldout)} users it holds out {len(heldout)} and trains on "
    f"{len(train)}; at least one training user and {needed} held-out user(s) are needed"
    + (" (the evaluate stage's CIs are over held-out users)" if needed == 2 else ""),
  )


def _pasta_release(
  config: ml_collections.ConfigDict,
) -> tuple[list[schema.ChoiceRecord], types.FeatureTable]:
  """The Kaggle release's records with their rows filled by the CLIP tower through the feature
  cache."""
  from pasta_jax.data import pasta_kaggle
  from pasta_jax.embed import cache, clip
  from pasta_jax.embed import records as embed_records

  records = pasta_kaggle.load(
    config.data.kaggle_dir, pasta_kaggle.read_layout(config.data.kaggle_layout)
  )
  tower = clip.load_clip(config.embed.clip_checkpoint, parallel.make_mesh(config.mesh))
  config_lib.check(
    tower.dim == config.world.feature_dim,
    "world.feature_dim",
    config.world.feature_dim,
    f"must equal the projection width {tower.dim} of {config.embed.clip_checkpoint}",
  )
  with cache.FeatureStore(config.embed.cache_dir) as store:
    return embed_records.embed_records(
      records, tower, store, config.data.kaggle_dir, config.data.kaggle_dir, config.embed.batch_size
    )


def _user_records(
  config: ml_collections.ConfigDict,
) -> tuple[list[schema.ChoiceRecord], types.FeatureTable]:
  """A lab's own records (`data.records`) and the feature table their rows index (`data.features`);
  RecordError naming the file, record and field of each problem."""
  table = schema.load_features(
    config.data.features,
    config.world.feature_dim,
    "write it with pasta_jax.data.schema.save_features (arrays 'image' and 'text' of width "
    "config.world.feature_dim)",
  )
  return schema.read_records(config.data.records), table


def _source_names(config: ml_collections.ConfigDict) -> tuple[str, str]:
  """How errors name the records and the features of `config.data.source`: the user's files, or the
  source."""
  if config.data.source == "records":
    return config.data.records, config.data.features
  return f"{config.data.source} records", f"{config.data.source} features"


def run_data(config: ml_collections.ConfigDict, workdir: str, run_key: str) -> dict:
  """Writes validated canonical records, their features, the user split and a manifest under data/:
  the synthetic world's rater log, the PASTA release embedded with CLIP, or a lab's own records and
  features (`data.source="records"`)."""
  del run_key
  os.makedirs(os.path.join(workdir, "data"), exist_ok=True)
  outputs = [artefacts.RECORDS, artefacts.FEATURES, artefacts.SPLIT]
  manifest = {"source": config.data.source, "licence": LICENCE}
  if config.data.source == "records":
    records, table = _user_records(config)
    manifest["licence"] = "that of data.records (supplied by the user)"
  elif _real(config):
    records, table = _pasta_release(config)
  else:
    log = synthetic_env.generate_rater_log(runs.stage_key(config, "data"), config)
    records, table = log.records, log.table
    synthetic.save_world(os.path.join(workdir, artefacts.WORLD), log.world)
    outputs.append(artefacts.WORLD)
    manifest["planted_num_types"] = int(log.world.num_types)
  record_source, feature_source = _source_names(config)
  schema.validate_features(table, config.world.feature_dim, feature_source)
  schema.validate_records(records, schema.RecordSpec.from_config(config), record_source, table)
  schema.write_records(os.path.join(workdir, artefacts.RECORDS), records)
  schema.save_features(os.path.join(workdir, artefacts.FEATURES), table)
  user_ids = sorted({r.user_id for r in records})
  train, heldout = split_users(user_ids, config.world.heldout_fraction, config.seed)
  check_split(config, train, heldout)
  files.write_json(os.path.join(workdir, artefacts.SPLIT), {"train": train, "heldout": heldout})
  if parallel.is_leader():
    layout.write(
      os.path.join(workdir, artefacts.SHARDS),
      records,
      schema.RecordSpec.from_config(config),
      {"train": train, "heldout": heldout},
      config.data.get("turns_per_row", 0),
      config.data.get("shards", layout.DEFAULT_SHARDS),
    )
  outputs.append(os.path.join(artefacts.SHARDS, layout.LAYOUT))
  parallel.sync("data outputs written")
  manifest.update(
    {
      "records": len(records),
      "users": len(user_ids),
      "sessions": len({r.session_id for r in records}),
      "train_users": len(train),
      "heldout_users": len(heldout),
      "image_rows": int(table.image.shape[0]),
      "text_rows": int(table.text.shape[0]),
      "feature_dim": int(table.dim),
      "sha256": {
        os.path.basename(name): files.sha256(os.path.join(workdir, name)) for name in outputs
      },
    }
  )
  files.write_json(os.path.join(workdir, artefacts.MANIFEST), manifest)
  return manifest


def _planted_metrics(
  config,
  workdir,
  table: types.FeatureTable,
  heldout: types.Choices,
  train_types: np.ndarray,
  posteriors,
) -> dict:
  """Comparisons with the planted world (synthetic data only): `heldout` the held-out users (host
  or global arrays), `train_types` i32[U] the training users' planted types."""
  from sklearn import metrics as sk_metrics

  world = artefacts.load_world(config, workdir)
  priors = np.asarray(world.type_log_priors)
  heldout_ll = schema.per_user_sum(synthetic.planted_user_loglik(world, table, heldout), heldout)
  marginal = np.logaddexp.reduce(priors + heldout_ll, axis=-1)
  planted = np.eye(world.num_types)[train_types]
  return {
    "planted_num_types": int(world.num_types),
    "planted_type_of_fitted_type": select_k.align_types(posteriors, planted).tolist(),
    "true_model_heldout_loglik_per_choice": float(
      marginal.sum() / np.sum(parallel.host_array(heldout.turn_mask))
    ),
    "ari_vs_planted": float(sk_metrics.adjusted_rand_score(train_types, np.argmax(posteriors, -1))),
  }


def load_init_params(config: ml_collections.ConfigDict, feature_dim: int):
  """The params of the fitted model `config.user_model.init_from` names (None when it is ""),
  checked against the configured model on features of width `feature_dim` (shapes only) so a
  mismatch is a ConfigError naming the parameter."""
  path = config.user_model.init_from
  if not path:
    return None
  saved = checkpoint.restore_tree(path)
  if "params" not in saved:
    raise config_lib.ConfigError(
      f"config.user_model.init_from={path!r}: holds {sorted(saved)}, not a fitted model's "
      "{'params', 'log_priors'}"
    )
  fresh = jax.eval_shape(
    utility.from_config(config).init, jax.random.key(0), utility.example_options(feature_dim)
  )
  try:
    jax.eval_shape(utility.warm_start, fresh, saved["params"])
  except ValueError as e:
    raise config_lib.ConfigError(f"config.user_model.init_from={path!r}: {e}") from None
  return saved["params"]


def global_choices(choices: types.Choices, multiple: int, mesh: jax.sharding.Mesh) -> types.Choices:
  """`choices` padded to a multiple of `multiple` users, as global arrays split over the mesh's
  "data" axis that each process assembles from its own block of users (`parallel.global_users`)."""
  padded = schema.pad_users(choices, multiple)
  rows = parallel.process_rows(padded.num_users, mesh)
  return parallel.global_users(jax.tree.map(lambda x: x[rows], padded), padded.num_users, mesh)


# Each held-out user's log-likelihood under each K, written by the compiled-once sweep.
HELDOUT_LOGLIK = "heldout_loglik.npz"


def run_user_model(config: ml_collections.ConfigDict, workdir: str, run_key: str) -> dict:
  """Fits EM for every K of the sweep (and config.user_model.num_types); saves the K = num_types
  model."""
  out = os.path.join(workdir, "user_model")
  os.makedirs(out, exist_ok=True)
  table = artefacts.load_table(config, workdir)
  splits = artefacts.load_layout(workdir)
  spec = schema.RecordSpec.from_config(config)
  mesh = parallel.make_mesh(config.mesh)
  settings = em.EMSettings.from_config(config.em)
  key = runs.stage_key(config, "user_model")
  ks = sorted(set(config.select_k.ks) | {config.user_model.num_types})
  train = layout.global_choices(splits["train"], spec, em.users_multiple(settings, mesh), mesh)
  heldout = layout.global_choices(splits["heldout"], spec, parallel.data_size(mesh), mesh)
  init_params = load_init_params(config, table.dim)
  results, fitted, posteriors = {}, {}, {}
  if config.select_k.compile_once:
    with runs.metric_writer(workdir, "user_model", run_key, "sweep") as writer:
      fits = select_k.sweep(
        settings,
        utility.from_config(config),
        table,
        train,
        train,
        heldout,
        ks,
        key,
        mesh,
        replicas=config.select_k.replicas,
        checkpoint_dir=os.path.join(out, "checkpoints", run_key, "sweep"),
        init_params=init_params,
        writer=writer,
      )
    select_k.save_heldout_loglik(os.path.join(out, HELDOUT_LOGLIK), fits, splits["heldout"].users)
    for k, fit in fits.items():
      results[k], fitted[k], posteriors[k] = fit.result, fit.fitted, fit.posteriors
  else:
    for k in ks:
      model = utility.from_config(config, num_types=k)
      with runs.metric_writer(workdir, "user_model", run_key, f"k{k}") as writer:
        state = em.fit(
          settings,
          model,
          table,
          train,
          jax.random.fold_in(key, k),
          mesh,
          checkpoint_dir=os.path.join(out, "checkpoints", run_key, f"k{k}"),
          init_params=init_params,
          writer=writer,
        )
      results[k], fitted[k], posteriors[k] = select_k.evaluate(
        state,
        model,
        table,
        train,
        heldout,
        settings.collapse_mass,
      )
  for k in ks:
    r = results[k]
    ci = "" if r.heldout_loglik_ci95 is None else " [{:.4f}, {:.4f}]".format(*r.heldout_loglik_ci95)
    runs.say(
      f"K={k}: held-out log-lik/choice {r.heldout_loglik_per_choice:.4f}{ci}, BIC {r.bic:.1f}, "
      f"converged restarts {sum(r.restart_converged)}/{len(r.restart_converged)}, "
      f"restart LL spread {r.restart_loglik_spread:.2e}/choice"
    )
  selected = select_k.select(
    list(results.values()), config.select_k.criterion, config.select_k.heldout_tolerance
  )
  main_k = config.user_model.num_types
  checkpoint.save_tree(
    os.path.join(workdir, artefacts.FITTED),
    {"params": fitted[main_k].params, "log_priors": fitted[main_k].log_priors},
  )
  artefacts.save_posteriors(workdir, posteriors[main_k], splits["train"].user_index)
  swept = [results[k] for k in ks if k in set(config.select_k.ks)]
  summary = {
    "num_types": main_k,
    "init_from": config.user_model.init_from,
    "selected_k": selected,
    "criterion": config.select_k.criterion,
    "heldout_loglik_per_choice": results[main_k].heldout_loglik_per_choice,
    "train_loglik_per_choice": results[main_k].train_loglik_per_choice,
    "priors": np.exp(fitted[main_k].log_priors).tolist(),
    "restart_ari": results[main_k].restart_ari,
    "collapsed_types": results[main_k].collapsed_types,
    "standardize": utility.from_config(config).standardize,
    "convergence": {
      str(k): {
        "converged": results[k].restart_converged,
        "epochs": results[k].restart_epochs,
        "grad_norm": results[k].restart_grad_norm,
        "loglik_per_choice": results[k].restart_loglik_per_choice,
        "loglik_spread_per_choice": results[k].restart_loglik_spread,
        "restarts_at_best": results[k].restarts_at_best,
      }
      for k in ks
    },
    "warnings": [w for k in ks if (w := results[k].warning()) is not None]
    + [w for k in sorted({selected, main_k}) if (w := results[k].stability_warning()) is not None],
    "k_sweep": [result.row() for result in swept],
    "metrics_dir": runs.metrics_dir("user_model", run_key),
  }
  if not _real(config):
    summary.update(
      _planted_metrics(config, workdir, table, heldout, splits["train"].types, posteriors[main_k])
    )
    artefacts.save_alignment(workdir, np.asarray(summary["planted_type_of_fitted_type"], np.int32))
  if parallel.is_leader():
    select_k.plot_sweep(
      swept, selected, os.path.join(out, "k_sweep.png"), summary.get("planted_num_types")
    )
  for warning in summary["warnings"]:
    runs.say(f"warning: {warning}")
  files.write_json(os.path.join(out, "user_model.json"), summary)
  return summary


def _release_pool(config: ml_collections.ConfigDict, start_prompts: list[str]):
  """The replay pool (`embed.pool`) over the initial prompts of the release's sessions."""
  from pasta_jax.embed import clip, pool

  mesh = parallel.make_mesh(config.mesh)
  return pool.build(
    config,
    start_prompts,
    clip.load_clip(config.embed.clip_checkpoint, mesh),
    pool.load_renderer(config, mesh),
  )


def run_simulate(config: ml_collections.ConfigDict, workdir: str, run_key: str) -> dict:
  """Simulated users of the fitted user model under the logging policy: canonical records (+
  features) and trajectory arrays under simulate/. On real data it first builds the replay pool
  (simulate/pool.npz)."""
  del run_key
  os.makedirs(os.path.join(workdir, "simulate"), exist_ok=True)
  fitted = artefacts.load_fitted_users(config, workdir, config.world.feature_dim)
  summary = {}
  if _real(config):
    from pasta_jax import candidates
    from pasta_jax.embed import pool

    replay = _release_pool(config, layout.start_prompts(os.path.join(workdir, artefacts.SHARDS)))
    candidates.save_generator(
      os.path.join(workdir, artefacts.POOL), replay.generator, replay.vocabulary, replay.image_refs
    )
    summary["pool"], generator = replay.summary, replay.generator
  else:
    generator = environments.candidate_generator(config, workdir)
  params = simulator.make_params(
    config.interaction, generator, fitted, fitted, config.simulate.reward
  )
  num_users = config.simulate.num_users
  trajectories = simulator.run(
    runs.stage_key(config, "simulate"),
    np.arange(num_users),
    np.full(num_users, -1),
    params,
    registry.logging_policy(config),
    None,
    parallel.make_mesh(config.mesh),
    keep_images=not _real(config),
  )
  records, sim_table = (
    pool.to_records(replay, config.interaction.categories, trajectories)
    if _real(config)
    else synthetic_env.trajectories_to_records(trajectories, generator.world, user_prefix="sim")
  )
  spec = schema.RecordSpec.from_config(config, num_types=config.user_model.num_types)
  schema.validate_records(records, spec, "simulated trajectories", sim_table)
  schema.write_records(os.path.join(workdir, artefacts.SIM_RECORDS), records)
  schema.save_features(os.path.join(workdir, artefacts.SIM_FEATURES), sim_table)
  simulator.save_trajectories(os.path.join(workdir, artefacts.SIM_TRAJECTORIES), trajectories)
  summary.update(
    {
      "num_users": num_users,
      "records": len(records),
      "reward": config.simulate.reward,
      "mean_utility_per_turn": np.mean(trajectories.utility, axis=0).tolist(),
      "type_counts": np.bincount(trajectories.user_type, minlength=fitted.model.num_types).tolist(),
    }
  )
  files.write_json(os.path.join(workdir, "simulate/simulate.json"), summary)
  return summary


def run_agent(config: ml_collections.ConfigDict, workdir: str, run_key: str) -> dict:
  """Trains every policy on real, simulated or mixed transitions (`agent.stage.train_policies`)."""
  return agent_stage.train_policies(config, workdir, run_key)


def run_evaluate(config: ml_collections.ConfigDict, workdir: str, run_key: str) -> dict:
  """Gathers the user_model stage's result, sim vs real on the held-out users and, when the agent stage
  has run, every policy's evaluation into report.json and report.md."""
  del run_key
  content = {"user_model": provenance.read_marker(workdir, "user_model")["result"]}
  with_agents = provenance.read_marker(workdir, "agent") is not None
  content.update(evaluate.evaluate(config, workdir, with_agents))
  return report.write(workdir, content)


def run_report(config: ml_collections.ConfigDict, workdir: str, run_key: str) -> dict:
  """Rebuilds report.md, the figures and a self-contained report.html under report/ from the saved
  artefacts, recomputing nothing."""
  del config, run_key
  return report.regenerate(workdir)


def _no_external(config: ml_collections.ConfigDict) -> dict[str, str]:
  del config
  return {}


def _data_external(config: ml_collections.ConfigDict) -> dict[str, str]:
  if not _real(config):
    return {}
  if config.data.source == "records":
    return {"data.records": config.data.records, "data.features": config.data.features}
  return {
    "data.kaggle_dir": config.data.kaggle_dir,
    "data.kaggle_layout": config.data.kaggle_layout,
    "embed.clip_checkpoint": config.embed.clip_checkpoint,
  }


def _data_outputs(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  synthetic_only = () if _real(config) else (artefacts.WORLD,)
  return (
    artefacts.RECORDS,
    artefacts.FEATURES,
    artefacts.SPLIT,
    artefacts.SHARDS,
    artefacts.MANIFEST,
  ) + synthetic_only


def _user_model_outputs(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return (
    (artefacts.FITTED, artefacts.POSTERIORS)
    + (() if _real(config) else (artefacts.ALIGNMENT,))
    + ((f"user_model/{HELDOUT_LOGLIK}",) if config.select_k.compile_once else ())
  )


def _simulate_external(config: ml_collections.ConfigDict) -> dict[str, str]:
  if not _real(config):
    return {}
  return {
    "candidates.replay_cache": config.candidates.replay_cache,
    "embed.clip_checkpoint": config.embed.clip_checkpoint,
    "embed.sdxl_checkpoint": config.embed.sdxl_checkpoint,
  }


def _simulate_outputs(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  return (artefacts.SIM_TRAJECTORIES, artefacts.SIM_RECORDS, artefacts.SIM_FEATURES) + (
    (artefacts.POOL,) if _real(config) else ()
  )


RENDER_FIELDS = ("embed.render_steps", "embed.guidance_scale", "embed.render_size")

STAGE_SPECS: dict[str, provenance.StageSpec] = {
  "data": provenance.StageSpec(
    "data",
    fields=("seed", "data", "world", "interaction"),
    upstream=(),
    external=_data_external,
    outputs=_data_outputs,
  ),
  "user_model": provenance.StageSpec(
    "user_model",
    fields=("seed", "user_model", "em", "select_k"),
    upstream=("data",),
    external=lambda c: {"user_model.init_from": c.user_model.init_from},
    outputs=_user_model_outputs,
  ),
  "simulate": provenance.StageSpec(
    "simulate",
    fields=("seed", "simulate", "candidates") + RENDER_FIELDS,
    upstream=("data", "user_model"),
    external=_simulate_external,
    outputs=_simulate_outputs,
  ),
  "agent": provenance.StageSpec(
    "agent",
    fields=("seed", "agent", "simulate.reward"),
    upstream=("data", "user_model", "simulate"),
    external=_no_external,
    outputs=lambda c: (artefacts.POLICIES,),
  ),
  "evaluate": provenance.StageSpec(
    "evaluate",
    fields=("seed", "evaluate"),
    upstream=("data", "user_model"),
    optional_upstream=("simulate", "agent"),
    external=_no_external,
    outputs=lambda c: (artefacts.REPORT,),
  ),
  "report": provenance.StageSpec(
    "report",
    fields=(),
    upstream=("data", "user_model"),
    optional_upstream=("simulate", "agent", "evaluate"),
    external=_no_external,
    outputs=lambda c: ("report/report.md", "report/report.html"),
  ),
}

STAGE_FUNCTIONS: dict[str, Callable[[ml_collections.ConfigDict, str, str], dict]] = {
  "data": run_data,
  "user_model": run_user_model,
  "simulate": run_simulate,
  "agent": run_agent,
  "evaluate": run_evaluate,
  "report": run_report,
}


def run_stages(
  config: ml_collections.ConfigDict,
  workdir: str,
  specs: dict[str, provenance.StageSpec] = STAGE_SPECS,
  functions: dict[str, Callable] = STAGE_FUNCTIONS,
) -> dict:
  """Runs `config.stages` of `specs` by `functions`: skips each stage that is fresh, checks the
  upstream of each one it runs, records each done-marker. The caller holds the workdir's lock."""
  ledger = provenance.Ledger(config, workdir, specs)
  results = {}
  for stage in config.stages:
    if ledger.staleness(stage) is None:
      runs.say(f"stage {stage}: its outputs hold for this config and these inputs, skipped")
      results[stage] = provenance.read_marker(workdir, stage)["result"]
      continue
    ledger.check_upstream(stage)
    start = time.time()
    runs.say(f"stage {stage}: running")
    results[stage] = functions[stage](config, workdir, ledger.run_key(stage))
    ledger.record(stage, time.time() - start, results[stage])
    parallel.sync(f"stage {stage} recorded")
  return results


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates the config, takes the workdir's lock, writes config.json with its hash, and runs
  `config.stages` in order.

  A stage is skipped when its done-marker holds for this config's fields, its inputs and its
  outputs; a stage whose upstream does not hold raises `provenance.StaleInputError` naming the input
  and the stage to re-run; a workdir held by another run raises `provenance.WorkdirBusyError`.
  """
  config_lib.validate(config)
  digest = config_lib.config_hash(config)
  with provenance.workdir_lock(workdir, f"config hash {digest}, stages {tuple(config.stages)}"):
    files.write_json(
      os.path.join(workdir, "config.json"),
      {"config": json.loads(config_lib.to_json(config)), "config_hash": digest},
    )
    return run_stages(config, workdir)
