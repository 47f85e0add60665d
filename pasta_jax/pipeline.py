"""The stages, each a library function `run_<stage>(config, workdir) -> dict`, and the runner that skips
stages whose outputs already match the config hash."""

import json
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pasta_jax import config as config_lib
from pasta_jax import candidates, checkpoint, files, parallel, simulator, types
from pasta_jax.agent import baselines, bc, iql
from pasta_jax.agent import data as agent_data
from pasta_jax.data import schema, synthetic
from pasta_jax.evaluation import agents as agent_eval
from pasta_jax.evaluation import metrics, plots, report, sim_vs_real
from pasta_jax.user_model import em, select_k, utility

LICENCE = "CC BY-SA 4.0"


def _say(message: str) -> None:
  if jax.process_index() == 0:
    print(message, flush=True)


def _stage_key(config: ml_collections.ConfigDict, stage: str) -> jax.Array:
  return jax.random.fold_in(jax.random.key(config.seed), config_lib.STAGES.index(stage))


def split_users(user_ids: list[str], heldout_fraction: float, seed: int) -> tuple[list[str], list[str]]:
  """A user-disjoint train/held-out split, fixed by the seed."""
  order = np.random.default_rng(seed).permutation(len(user_ids))
  num_heldout = int(round(heldout_fraction * len(user_ids)))
  heldout = sorted(user_ids[i] for i in order[:num_heldout])
  train = sorted(user_ids[i] for i in order[num_heldout:])
  return train, heldout


def _pasta_release(config: ml_collections.ConfigDict) -> tuple[list[schema.ChoiceRecord], types.FeatureTable]:
  """The Kaggle release's records with their rows filled by the CLIP tower through the feature cache."""
  from pasta_jax.data import pasta_kaggle
  from pasta_jax.embed import cache, clip
  from pasta_jax.embed import records as embed_records
  records = pasta_kaggle.load(config.data.kaggle_dir)
  tower = clip.load_clip(config.embed.clip_checkpoint, parallel.make_mesh(config.mesh))
  config_lib.check(tower.dim == config.world.feature_dim, "world.feature_dim", config.world.feature_dim,
                   f"must equal the projection width {tower.dim} of {config.embed.clip_checkpoint}")
  with cache.FeatureStore(config.embed.cache_dir) as store:
    return embed_records.embed_records(records, tower, store, config.data.kaggle_dir, config.data.kaggle_dir,
                                       config.embed.batch_size)


def run_data(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes validated canonical records, their features, the user split and a manifest under data/: the
  synthetic world's rater log, or the PASTA release embedded with CLIP."""
  out = os.path.join(workdir, "data")
  os.makedirs(out, exist_ok=True)
  outputs = ["records.jsonl", "features.npz", "split.json"]
  manifest = {"source": config.data.source, "licence": LICENCE}
  if config.data.source == "synthetic":
    log = synthetic.generate_rater_log(_stage_key(config, "data"), config)
    records, table = log.records, log.table
    synthetic.save_world(os.path.join(out, "world.npz"), log.world)
    outputs.append("world.npz")
    manifest["planted_num_types"] = int(log.world.num_types)
  else:
    records, table = _pasta_release(config)
  schema.validate_records(records, schema.RecordSpec.from_config(config), f"{config.data.source} records", table)
  schema.validate_features(table, config.world.feature_dim, f"{config.data.source} features")
  schema.write_records(os.path.join(out, "records.jsonl"), records)
  schema.save_features(os.path.join(out, "features.npz"), table)
  user_ids = sorted({r.user_id for r in records})
  train, heldout = split_users(user_ids, config.world.heldout_fraction, config.seed)
  files.write_json(os.path.join(out, "split.json"), {"train": train, "heldout": heldout})
  manifest.update({
      "records": len(records), "users": len(user_ids), "sessions": len({r.session_id for r in records}),
      "train_users": len(train), "heldout_users": len(heldout), "image_rows": int(table.image.shape[0]),
      "text_rows": int(table.text.shape[0]), "feature_dim": int(table.dim),
      "sha256": {name: files.sha256(os.path.join(out, name)) for name in outputs},
  })
  files.write_json(os.path.join(workdir, "data_manifest.json"), manifest)
  return manifest


def load_data(config: ml_collections.ConfigDict, workdir: str):
  """Validated records and features of the data stage, as (table, train, heldout, train users, heldout users)."""
  out = os.path.join(workdir, "data")
  path = os.path.join(out, "records.jsonl")
  records = schema.read_records(path)
  table = schema.load_features(os.path.join(out, "features.npz"), config.world.feature_dim)
  spec = schema.RecordSpec.from_config(config)
  schema.validate_records(records, spec, path, table)
  split = files.read_json(os.path.join(out, "split.json"))
  train, train_users = schema.to_choices(records, spec, split["train"])
  heldout, heldout_users = schema.to_choices(records, spec, split["heldout"])
  return table, train, heldout, train_users, heldout_users


def _planted_metrics(config, workdir, table, train, heldout, train_users, posteriors) -> dict:
  """Comparisons with the planted world (synthetic data only)."""
  from sklearn import metrics
  world = load_world(config, workdir)
  priors = np.asarray(world.type_log_priors)
  heldout_ll = synthetic.planted_user_loglik(world, table, heldout)
  marginal = np.logaddexp.reduce(priors + heldout_ll, axis=-1)
  planted = np.eye(world.num_types)[train_users.types]
  return {
      "planted_num_types": int(world.num_types),
      "planted_type_of_fitted_type": select_k.align_types(posteriors, planted).tolist(),
      "true_model_heldout_loglik_per_choice": float(marginal.sum() / np.sum(heldout.turn_mask)),
      "ari_vs_planted": float(metrics.adjusted_rand_score(train_users.types, np.argmax(posteriors, -1))),
  }


def load_init_params(config: ml_collections.ConfigDict, table: types.FeatureTable, choices: types.Choices):
  """The params of the fitted model `config.user_model.init_from` names (None when it is ""), checked against
  the configured model on these features (shapes only) so a mismatch is a ConfigError naming the parameter."""
  path = config.user_model.init_from
  if not path:
    return None
  saved = checkpoint.restore_tree(path)
  if "params" not in saved:
    raise config_lib.ConfigError(f"config.user_model.init_from={path!r}: holds {sorted(saved)}, not a fitted model's "
                                 "{'params', 'log_priors'}")
  fresh = jax.eval_shape(utility.from_config(config).init, jax.random.key(0), em.example_options(table, choices))
  try:
    jax.eval_shape(utility.warm_start, fresh, saved["params"])
  except ValueError as e:
    raise config_lib.ConfigError(f"config.user_model.init_from={path!r}: {e}") from None
  return saved["params"]


def run_user_model(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Fits EM for every K of the sweep (and config.user_model.num_types); saves the K = num_types model."""
  out = os.path.join(workdir, "user_model")
  os.makedirs(out, exist_ok=True)
  table, train, heldout, train_users, _ = load_data(config, workdir)
  mesh = parallel.make_mesh(config.mesh)
  settings = em.EMSettings.from_config(config.em)
  key = _stage_key(config, "user_model")
  ks = sorted(set(config.select_k.ks) | {config.user_model.num_types})
  init_params = load_init_params(config, table, train)
  results, fitted, posteriors = {}, {}, {}
  for k in ks:
    model = utility.from_config(config, num_types=k)
    state = em.fit(settings, model, table, train, jax.random.fold_in(key, k), mesh,
                   checkpoint_dir=os.path.join(out, "checkpoints", config_lib.config_hash(config), f"k{k}"),
                   init_params=init_params)
    results[k], fitted[k], posteriors[k] = select_k.evaluate(state, model, table, train, heldout,
                                                            settings.collapse_mass)
    _say(f"K={k}: held-out log-lik/choice {results[k].heldout_loglik_per_choice:.4f}, BIC {results[k].bic:.1f}")
  selected = select_k.select(list(results.values()), config.select_k.criterion, config.select_k.heldout_tolerance)
  main_k = config.user_model.num_types
  checkpoint.save_tree(os.path.join(out, "fitted"), {"params": fitted[main_k].params,
                                                     "log_priors": fitted[main_k].log_priors})
  files.save_npz(os.path.join(out, "posteriors.npz"), posteriors=posteriors[main_k],
                 user_ids=np.asarray(train_users.ids))
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
      "k_sweep": [results[k].row() for k in ks if k in set(config.select_k.ks)],
  }
  if config.data.source == "synthetic":
    summary.update(_planted_metrics(config, workdir, table, train, heldout, train_users, posteriors[main_k]))
  select_k.plot_sweep([results[k] for k in ks if k in set(config.select_k.ks)], selected,
                      os.path.join(out, "k_sweep.png"), summary.get("planted_num_types"))
  files.write_json(os.path.join(out, "user_model.json"), summary)
  return summary


def load_fitted_users(config: ml_collections.ConfigDict, workdir: str, table: types.FeatureTable,
                      choices: types.Choices) -> utility.FittedUsers:
  """The K = config.user_model.num_types model saved by the user_model stage."""
  model = utility.from_config(config)
  like = jax.eval_shape(lambda: {"params": model.init(jax.random.key(0), em.example_options(table, choices)),
                                 "log_priors": jnp.zeros((model.num_types,), jnp.float32)})
  saved = checkpoint.restore_tree(os.path.join(workdir, "user_model", "fitted"), like)
  return utility.FittedUsers(model=model, params=saved["params"], log_priors=saved["log_priors"])


SAVED_TRAJECTORY_FIELDS = ("user_id", "user_type", "history", "slate", "category", "slate_text", "choice", "utility",
                           "utilities", "reward", "log_belief")


def save_trajectories(path: str, trajectories: simulator.Trajectories) -> None:
  """The array fields the agent and evaluation read (not the prompts or image features), as .npz."""
  files.save_npz(path, **{name: np.asarray(getattr(trajectories, name)) for name in SAVED_TRAJECTORY_FIELDS})


def load_trajectories(path: str) -> simulator.Trajectories:
  """Trajectories saved by `save_trajectories`; prompts, seeds and images are None."""
  arrays = files.load_npz(path, SAVED_TRAJECTORY_FIELDS, "re-run the simulate stage")
  return simulator.Trajectories(start=None, shown=None, images=None, seeds=None, **arrays)


def load_world(config: ml_collections.ConfigDict, workdir: str) -> synthetic.World:
  return synthetic.load_world(os.path.join(workdir, "data", "world.npz"), config)


def logging_policy(config: ml_collections.ConfigDict) -> baselines.RandomSlate:
  it = config.interaction
  return baselines.RandomSlate(num_categories=len(it.categories), slate_size=it.slate_size)


def _release_pool(config: ml_collections.ConfigDict, workdir: str):
  """The replay pool (`embed.pool`) over the initial prompts of the release's sessions."""
  from pasta_jax.embed import clip
  from pasta_jax.embed import pool
  records = schema.read_records(os.path.join(workdir, "data", "records.jsonl"))
  start_prompts = sorted({r.start_prompt for r in records if r.turn == 0})
  mesh = parallel.make_mesh(config.mesh)
  return pool.build(config, start_prompts, clip.load_clip(config.embed.clip_checkpoint, mesh),
                    pool.load_renderer(config, mesh))


def _pool_path(workdir: str) -> str:
  return os.path.join(workdir, "simulate", "pool.npz")


def _pool_records(config: ml_collections.ConfigDict, replay, trajectories: simulator.Trajectories
                  ) -> tuple[list[schema.ChoiceRecord], types.FeatureTable]:
  """Canonical records of trajectories on the replay pool (`embed.pool.Pool`): prompts by text, images by
  their rendered PNG."""
  generator = replay.generator
  rows = np.asarray(generator.pool_rows(jnp.asarray(trajectories.shown), jnp.asarray(trajectories.seeds)))
  return simulator.to_records(trajectories, trajectories.shown, trajectories.start, replay.vocabulary.__getitem__,
                              rows, np.asarray(generator.image), replay.image_refs, config.interaction.categories,
                              user_prefix="sim")


def simulator_generator(config: ml_collections.ConfigDict, workdir: str):
  """The candidate generator of the simulator: the synthetic world's expander, or the replay pool saved by
  the simulate stage."""
  if config.data.source == "synthetic":
    return synthetic.SyntheticExpander(load_world(config, workdir))
  return candidates.load_generator(_pool_path(workdir), "run the simulate stage (config.stages) on this workdir "
                                   "first")[0]


def run_simulate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Simulated users of the fitted user model under the logging policy: canonical records (+ features)
  and trajectory arrays under simulate/. On real data it first builds the replay pool (simulate/pool.npz)."""
  out = os.path.join(workdir, "simulate")
  os.makedirs(out, exist_ok=True)
  table, train, _, _, _ = load_data(config, workdir)
  fitted = load_fitted_users(config, workdir, table, train)
  summary = {}
  if config.data.source == "synthetic":
    generator = simulator_generator(config, workdir)
  else:
    replay = _release_pool(config, workdir)
    candidates.save_generator(_pool_path(workdir), replay.generator, replay.vocabulary, replay.image_refs)
    summary["pool"], generator = replay.summary, replay.generator
  params = simulator.make_params(config.interaction, generator, fitted, fitted, config.simulate.reward)
  num_users = config.simulate.num_users
  trajectories = simulator.run(_stage_key(config, "simulate"), np.arange(num_users), np.full(num_users, -1),
                               params, logging_policy(config), None, parallel.make_mesh(config.mesh),
                               keep_images=config.data.source == "synthetic")
  records, sim_table = (synthetic.trajectories_to_records(trajectories, generator.world, user_prefix="sim")
                        if config.data.source == "synthetic" else _pool_records(config, replay, trajectories))
  schema.validate_records(records, schema.RecordSpec.from_config(config), "simulated trajectories", sim_table)
  schema.write_records(os.path.join(out, "records.jsonl"), records)
  schema.save_features(os.path.join(out, "features.npz"), sim_table)
  save_trajectories(os.path.join(out, "trajectories.npz"), trajectories)
  summary.update({
      "num_users": num_users, "records": len(records), "reward": config.simulate.reward,
      "mean_utility_per_turn": np.mean(trajectories.utility, axis=0).tolist(),
      "type_counts": np.bincount(trajectories.user_type, minlength=fitted.model.num_types).tolist(),
  })
  files.write_json(os.path.join(out, "simulate.json"), summary)
  return summary


def agent_policies(config: ml_collections.ConfigDict) -> dict[str, tuple[str, str]]:
  """The trained policies, name -> (learner, data mix): IQL on every configured mix, myopic IQL (γ = 0) and
  behaviour cloning of the logged choices."""
  mixes = tuple(config.agent.data_mixes)
  main_mix = "real+sim" if "real+sim" in mixes else mixes[0]
  policies = {f"iql/{mix}": ("iql", mix) for mix in mixes}
  policies[f"myopic/{main_mix}"] = ("myopic", main_mix)
  policies["bc/real"] = ("bc", "real")
  return policies


def _policy_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, "agent", "policies", name.replace("/", "_").replace("+", "_"))


def real_transitions(config: ml_collections.ConfigDict, workdir: str, fitted: utility.FittedUsers,
                     table: types.FeatureTable, train_users: schema.UserIndex) -> agent_data.Transitions:
  """The training users' logged sessions, each turn's reward labelled by the fitted user model (the chosen
  column's utility averaged over the user's type posterior)."""
  path = os.path.join(workdir, "data", "records.jsonl")
  sessions = agent_data.sessions_from_records(schema.read_records(path), table, schema.RecordSpec.from_config(config),
                                              train_users.ids, config.interaction.turns, path)
  posteriors_path = os.path.join(workdir, "user_model", "posteriors.npz")
  saved = files.load_npz(posteriors_path, ("posteriors", "user_ids"), "re-run the user_model stage")
  if list(saved["user_ids"]) != list(train_users.ids):
    raise ValueError(f"{posteriors_path}: its users differ from data/split.json's training users; re-run the "
                     "user_model stage")
  posteriors = saved["posteriors"]
  rewards = agent_data.label_rewards(fitted, table, sessions, posteriors)
  if config.simulate.reward == "final_turn":
    rewards[:, :-1] = 0.0
  return agent_data.transitions_from_sessions(sessions, rewards)


def _train_policy(config, learner: str, mix: str, real, sim, key, mesh, checkpoint_dir: str):
  """(policy, params, training history) of one learner on one data mix."""
  if learner == "bc":
    policy = bc.BCPolicy.from_config(config)
    state, history = bc.train(bc.BCSettings.from_config(config.agent.bc), policy, real, sim, mix,
                              config.agent.sim_fraction, key, mesh, checkpoint_dir)
    return policy, state.params, history
  settings = iql.IQLSettings.from_config(config.agent.iql)
  policy = iql.IQLPolicy.from_config(config)
  state, history = iql.train(settings.myopic() if learner == "myopic" else settings, policy, real, sim, mix,
                             config.agent.sim_fraction, key, mesh, checkpoint_dir)
  return policy, state.critic, history


def run_agent(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains every policy of `agent_policies` on real, simulated or mixed transitions; saves each one's
  params under agent/policies/ and its training curve in agent/agent.json."""
  out = os.path.join(workdir, "agent")
  os.makedirs(out, exist_ok=True)
  table, train, _, train_users, _ = load_data(config, workdir)
  fitted = load_fitted_users(config, workdir, table, train)
  real = real_transitions(config, workdir, fitted, table, train_users)
  sim = agent_data.transitions_from_trajectories(load_trajectories(os.path.join(workdir, "simulate",
                                                                                "trajectories.npz")))
  mesh = parallel.make_mesh(config.mesh)
  key = _stage_key(config, "agent")
  summary = {"real_transitions": real.size, "sim_transitions": sim.size, "policies": {}}
  for index, (name, (learner, mix)) in enumerate(agent_policies(config).items()):
    checkpoint_dir = os.path.join(out, "checkpoints", config_lib.config_hash(config), os.path.basename(
        _policy_dir(workdir, name)))
    _, params, history = _train_policy(config, learner, mix, real, sim, jax.random.fold_in(key, index), mesh,
                                       checkpoint_dir)
    checkpoint.save_tree(_policy_dir(workdir, name), params)
    summary["policies"][name] = {
        "learner": learner, "data_mix": mix,
        "final_metrics": {k: float(np.mean(v[-100:])) for k, v in history.items() if k != "step" and len(v)}}
    _say(f"agent {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["policies"][name]["final_metrics"].items()))
  files.write_json(os.path.join(out, "agent.json"), summary)
  return summary


def load_policy(config: ml_collections.ConfigDict, workdir: str, name: str, feature_dim: int):
  """(policy, params) of a trained policy saved by the agent stage."""
  learner, _ = agent_policies(config)[name]
  policy = bc.BCPolicy.from_config(config) if learner == "bc" else iql.IQLPolicy.from_config(config)
  it = config.interaction
  example = (jnp.zeros((it.turns + 1, feature_dim)), jnp.ones((it.turns + 1,), bool), jnp.zeros((), jnp.int32),
             jnp.zeros((it.slate_size, feature_dim)), jnp.zeros((it.slate_size,), jnp.int32))
  like = jax.eval_shape(lambda: policy.network().init(jax.random.key(0), *example))
  return policy, checkpoint.restore_tree(_policy_dir(workdir, name), like)


def baseline_policies(config: ml_collections.ConfigDict, fitted: utility.FittedUsers, responders) -> dict[str, tuple]:
  """name -> (policy, params) of the baselines; the oracle knows `responders`."""
  it = config.interaction
  sizes = dict(num_categories=len(it.categories), slate_size=it.slate_size)
  return {"random": (baselines.RandomSlate(**sizes), None),
          agent_eval.BASELINE: (baselines.GeneratorOrder(**sizes), None),
          "greedy": (baselines.Greedy(**sizes), fitted), "oracle": (baselines.Oracle(**sizes), responders)}


def _environments(config: ml_collections.ConfigDict, workdir: str, fitted: utility.FittedUsers) -> dict[str, tuple]:
  """name -> (Environment, responders), the headline one first: the planted true users of the synthetic world
  (standing in for raters), then the fitted simulator; on real data the fitted simulator on the replay pool."""
  generator = simulator_generator(config, workdir)
  environments = {}
  if config.data.source == "synthetic":
    type_map = np.asarray(files.read_json(os.path.join(workdir, "user_model", "user_model.json"))[
        "planted_type_of_fitted_type"])
    planted = synthetic.PlantedUsers(load_world(config, workdir))
    environments["planted_users"] = (agent_eval.Environment(
        simulator.make_params(config.interaction, generator, planted, fitted), type_map), planted)
  environments["simulator"] = (agent_eval.Environment(
      simulator.make_params(config.interaction, generator, fitted, fitted)), fitted)
  return environments


def evaluate_agents(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Every policy on each environment of `_environments`; sim-vs-real on held-out users; the report's
  "agent" (headline environment, named in "agent_environment"), "agent_comparisons" and "sim_vs_real"
  sections and PNGs under evaluate/."""
  out = os.path.join(workdir, "evaluate")
  os.makedirs(out, exist_ok=True)
  table, train, heldout, _, _ = load_data(config, workdir)
  fitted = load_fitted_users(config, workdir, table, train)
  environments = _environments(config, workdir, fitted)
  mesh, key = parallel.make_mesh(config.mesh), _stage_key(config, "evaluate")
  samples, seed = config.evaluate.bootstrap_samples, config.seed
  trained = {name: load_policy(config, workdir, name, table.dim) for name in agent_policies(config)}
  results, trajectories = {}, {}
  for index, (name, (environment, responders)) in enumerate(environments.items()):
    policies = {**baseline_policies(config, fitted, responders), **trained}
    trajectories[name] = agent_eval.rollouts(jax.random.fold_in(key, index), config.evaluate.num_users, environment,
                                             policies, mesh)
    results[name] = agent_eval.summarize(trajectories[name], environment, samples, seed)
  primary = next(iter(environments))
  main = "iql/real+sim" if "iql/real+sim" in results[primary] else next(
      n for n in results[primary] if n.startswith("iql/"))
  section = {name: {**agent_eval.headline(result), "utility_per_turn": metrics.to_json(result.utility),
                    "type_accuracy_per_turn": metrics.to_json(result.type_accuracy),
                    **({} if primary == "simulator" else {
                        "on_simulator": agent_eval.headline(results["simulator"][name])})}
             for name, result in results[primary].items()}
  checks = sim_vs_real.evaluate(fitted, table, heldout, config.interaction.turns, num_samples=samples, seed=seed)
  plots.plot_utility_per_turn({n: r.utility for n, r in results[primary].items()},
                              os.path.join(out, "utility_per_turn.png"))
  plots.plot_type_accuracy({n: r.type_accuracy for n, r in results[primary].items()},
                           os.path.join(out, "type_accuracy_per_turn.png"))
  plots.plot_reliability(checks.calibration, os.path.join(out, "calibration.png"))
  return {"agent_environment": primary, "agent": section,
          "agent_comparisons": agent_eval.comparisons(trajectories[primary], main, samples, seed),
          "sim_vs_real": checks.to_json()}


def _stage_finished(config: ml_collections.ConfigDict, workdir: str, stage: str) -> bool:
  done = _done_path(workdir, stage)
  return os.path.exists(done) and files.read_json(done).get("config_hash") == config_lib.config_hash(config)


def run_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Gathers every finished stage's results into report.json and report.md (the agent sections when the
  agent stage has run for this config)."""
  content = {"user_model": files.read_json(os.path.join(workdir, "user_model", "user_model.json"))}
  if _stage_finished(config, workdir, "agent"):
    content.update(evaluate_agents(config, workdir))
  return report.write(workdir, content)


STAGE_FUNCTIONS: dict[str, Callable[[ml_collections.ConfigDict, str], dict]] = {
    "data": run_data, "user_model": run_user_model, "simulate": run_simulate, "agent": run_agent,
    "evaluate": run_evaluate}


def _done_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, f"{stage}.done.json")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates the config, writes config.json with its hash, and runs `config.stages` in order.

  A stage whose done-marker carries the current config hash is skipped.
  """
  config_lib.validate(config)
  os.makedirs(workdir, exist_ok=True)
  digest = config_lib.config_hash(config)
  files.write_json(os.path.join(workdir, "config.json"), {"config": json.loads(config_lib.to_json(config)),
                                                      "config_hash": digest})
  results = {}
  for stage in config.stages:
    done = _done_path(workdir, stage)
    if _stage_finished(config, workdir, stage):
      _say(f"stage {stage}: outputs match config hash {digest}, skipped")
      results[stage] = files.read_json(done)["result"]
      continue
    start = time.time()
    _say(f"stage {stage}: running")
    results[stage] = STAGE_FUNCTIONS[stage](config, workdir)
    files.write_json(done, {"config_hash": digest, "seconds": time.time() - start, "result": results[stage]})
  return results
