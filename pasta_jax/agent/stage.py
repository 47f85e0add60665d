"""The agent stage's work: the logged sessions labelled by the fitted user model, and every trained
policy of `registry.trained_policies` fitted on its data mix and saved."""

import os
from collections.abc import Sequence

import jax
import ml_collections
import numpy as np

from pasta_jax import artefacts, checkpoint, files, metrics_log, parallel, runs, simulator, types
from pasta_jax.agent import data as agent_data
from pasta_jax.agent import registry, value
from pasta_jax.data import layout, schema
from pasta_jax.evaluation import environments
from pasta_jax.user_model import utility


def real_transitions(
  config: ml_collections.ConfigDict,
  fitted: utility.FittedUsers,
  table: types.FeatureTable,
  records: Sequence[schema.ChoiceRecord],
  users: schema.UserIndex,
  posteriors: np.ndarray,
  source: str,
  inputs: frozenset[str] = value.TEXT,
) -> agent_data.Transitions:
  """The logged sessions of `records` whose user is among `users` (posteriors f32[U, K] their type
  posteriors, in `users` order), each turn's reward labelled by the fitted user model (the chosen
  column's utility averaged over the user's type posterior); with what `inputs` names beyond the
  text: the fitted model's belief given each session's own choices so far, the options' pooled
  images, the chosen options' pooled images. `source` names the records in errors."""
  sessions = agent_data.sessions_from_records(
    records,
    table,
    schema.RecordSpec.from_config(config),
    users.ids,
    config.interaction.turns,
    source,
  )
  rewards = agent_data.label_rewards(fitted, table, sessions, posteriors)
  if config.simulate.reward == "final_turn":
    rewards[:, :-1] = 0.0
  images = (
    agent_data.session_slate_images(table, sessions) if inputs & agent_data.IMAGE_INPUTS else None
  )
  return agent_data.transitions_from_sessions(
    sessions,
    rewards,
    agent_data.session_beliefs(fitted, table, sessions) if "belief" in inputs else None,
    *agent_data.image_inputs(images, sessions.choice, inputs),
  )


def training_transitions(
  config: ml_collections.ConfigDict,
  workdir: str,
  fitted: utility.FittedUsers,
  table: types.FeatureTable,
  inputs: frozenset[str] = value.TEXT,
) -> agent_data.Transitions:
  """`real_transitions` of the training users, every process reading from the data stage's shards
  (`layout.read_users`) and labelling only its own block of users (`parallel.process_block`); the
  blocks are joined in process order on every process (`parallel.concat_processes`), so the
  transitions are the same for any number of processes."""
  train = artefacts.load_layout(workdir)["train"]
  posteriors = artefacts.load_posteriors(workdir, train.user_index)
  host_fitted = parallel.on_host(fitted)

  def labelled(block: slice) -> agent_data.Transitions:
    return real_transitions(
      config,
      host_fitted,
      table,
      layout.read_users(train, block),
      schema.UserIndex(ids=train.users[block], types=train.types[block]),
      posteriors[block],
      os.path.join(workdir, artefacts.SHARDS),
      inputs,
    )

  block = parallel.process_block(len(train.users))
  return parallel.concat_processes(parallel.together(labelled, block))


def sim_transitions(
  config: ml_collections.ConfigDict, workdir: str, dim: int, inputs: frozenset[str] = value.TEXT
) -> agent_data.Transitions:
  """The simulate stage's trajectories, with the belief the environment computed (the fitted model's,
  from the choices only) and, with "images" or "chosen_images" in `inputs`, the shown or the chosen
  options' pooled images read from the simulated records."""
  trajectories = simulator.load_trajectories(os.path.join(workdir, artefacts.SIM_TRAJECTORIES))
  images = (
    simulated_slate_images(config, workdir, dim, trajectories)
    if inputs & agent_data.IMAGE_INPUTS
    else None
  )
  return agent_data.transitions_from_trajectories(
    trajectories,
    "belief" in inputs,
    *agent_data.image_inputs(images, np.asarray(trajectories.choice), inputs),
  )


def simulated_slate_images(
  config: ml_collections.ConfigDict, workdir: str, dim: int, trajectories: simulator.Trajectories
) -> np.ndarray:
  """f32[N, H, L, D] pooled image features (width `dim`) of the slates of `trajectories`, from
  simulate/records.jsonl and simulate/features.npz (session n is trajectory n; a mismatch is a
  RecordError)."""
  path = os.path.join(workdir, artefacts.SIM_RECORDS)
  records = schema.read_records(path)
  table = schema.load_features(
    os.path.join(workdir, artefacts.SIM_FEATURES), dim, "re-run the simulate stage"
  )
  users = list(dict.fromkeys(r.user_id for r in records))
  spec = schema.RecordSpec.from_config(config)
  sessions = agent_data.sessions_from_records(
    records, table, spec, users, config.interaction.turns, path
  )
  for field in ("choice", "category"):
    if not np.array_equal(getattr(sessions, field), np.asarray(getattr(trajectories, field))):
      raise schema.RecordError(
        f"{path}: field '{field}' differs from {artefacts.SIM_TRAJECTORIES}: the two come from "
        "different runs; re-run the simulate stage"
      )
  return agent_data.session_slate_images(table, sessions)


def fitted_simulator(
  config: ml_collections.ConfigDict, workdir: str, fitted: utility.FittedUsers
) -> simulator.EnvParams:
  """The fitted simulator PPO learns in: the run's candidate generator, fitted users as responders
  and belief, rewarded as `simulate.reward` says."""
  generator = environments.candidate_generator(config, workdir)
  return simulator.make_params(
    config.interaction, generator, fitted, fitted, reward=config.simulate.reward
  )


def train_policies(config: ml_collections.ConfigDict, workdir: str, run_key: str) -> dict:
  """Trains every policy of `registry.trained_policies` on real, simulated or mixed transitions; saves each
  one's params under agent/policies/ and its training curve in agent/agent.json."""
  out = os.path.join(workdir, "agent")
  os.makedirs(out, exist_ok=True)
  table = artefacts.load_table(config, workdir)
  fitted = artefacts.load_fitted_users(config, workdir, table.dim)
  inputs = registry.offline_inputs(config)
  real = training_transitions(config, workdir, fitted, table, inputs)
  sim = sim_transitions(config, workdir, table.dim, inputs)
  mesh = parallel.make_mesh(config.mesh)
  key = runs.stage_key(config, "agent")
  summary = {
    "real_transitions": real.size,
    "sim_transitions": sim.size,
    "policies": {},
    "metrics_dir": runs.metrics_dir("agent", run_key),
  }
  for index, (name, (learner, mix, reads)) in enumerate(registry.trained_policies(config).items()):
    dirname = registry.policy_dirname(name)
    with runs.metric_writer(workdir, "agent", run_key, dirname) as writer:
      key_i, checkpoints = (
        jax.random.fold_in(key, index),
        os.path.join(out, "checkpoints", run_key, dirname),
      )
      if learner == "ppo":
        env = fitted_simulator(config, workdir, fitted)
        _, params, _ = registry.train_ppo(config, env, key_i, checkpoints, writer)
      else:
        _, params, _ = registry.train_policy(
          config, learner, mix, real, sim, key_i, mesh, checkpoints, writer, reads
        )
    checkpoint.save_tree(registry.policy_dir(workdir, name), params)
    curves = metrics_log.read_jsonl_metrics(
      os.path.join(workdir, runs.metrics_dir("agent", run_key), dirname, metrics_log.JSONL_NAME)
    )
    summary["policies"][name] = {
      "learner": learner,
      "data_mix": mix,
      "inputs": config.agent.ppo.inputs if learner == "ppo" else reads,
      "trained_for": config.simulate.reward,
      "steps": int(curves["step"][-1]),
      "final_metrics": {
        k: float(v[-1])
        for k, v in curves.items()
        if k not in ("step", *metrics_log.PROGRESS_METRICS) and np.isfinite(v[-1])
      },
    }
    runs.say(
      f"agent {name}: "
      + ", ".join(f"{k} {v:.4f}" for k, v in summary["policies"][name]["final_metrics"].items())
    )
  files.write_json(os.path.join(out, "agent.json"), summary)
  return summary
