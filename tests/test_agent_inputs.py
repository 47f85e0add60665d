"""What the agent reads beyond the text (agent.inputs): the belief, the options' pooled images and the
chosen options' pooled images, computed from logged sessions, simulated trajectories and the
simulator's observation the same way, never from the user's true type; the richer IQL through every
stage of the tiny world."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pasta_jax import artefacts, checkpoint, config_checks, parallel, pipeline, runs, simulator
from pasta_jax import config as config_lib
from pasta_jax.agent import data, iql, registry, stage, value
from pasta_jax.data import schema
from pasta_jax.evaluation import agents as agent_eval
from pasta_jax.evaluation import environments
from pasta_jax.serve import session as serve_session
from pasta_jax.serve import workspace as workspace_lib
from tests import conftest, reference

INPUTS = "text+images+belief+chosen_images"
RICH = f"iql/real+sim/{INPUTS}"
CHOSEN = "text+chosen_images"


def test_no_observation_or_transition_field_holds_the_true_type():
  for cls in (simulator.Observation, data.Transitions):
    names = {field.name for field in dataclasses.fields(cls)}
    assert not any("type" in name for name in names), (cls.__name__, names)
  assert "user_type" in {field.name for field in dataclasses.fields(simulator.EnvState)}


def test_the_inputs_field_is_checked_and_names_the_policy():
  config = conftest.tiny_config()
  assert config.agent.inputs == "text" and RICH not in registry.trained_policies(config)
  config.agent.inputs = "text+utilities"
  with pytest.raises(config_checks.ConfigError, match="agent.inputs"):
    config_lib.validate(config)
  config.agent.inputs = "text+chosen_images+pixels"
  with pytest.raises(config_checks.ConfigError, match="agent.inputs"):
    config_lib.validate(config)
  config.agent.inputs = INPUTS
  assert registry.trained_policies(config)[RICH] == registry.Trained("iql", "real+sim", INPUTS)
  assert registry.policy_dirname(RICH) == "iql_real_sim_text_images_belief_chosen_images"
  assert registry.offline_inputs(config) == {"text", "images", "belief", "chosen_images"}
  config.agent.inputs = CHOSEN
  config_lib.validate(config)
  name = f"iql/real+sim/{CHOSEN}"
  assert registry.trained_policies(config)[name] == registry.Trained("iql", "real+sim", CHOSEN)
  assert registry.offline_inputs(config) == {"text", "chosen_images"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(config, workdir) of the tiny world (one K, one restart, short training) through the agent stage
  with IQL on real + simulated data reading INPUTS beside the text-only policies."""
  config = conftest.tiny_config()
  config.stages = ("data", "user_model", "simulate", "agent")
  config.select_k.ks = (config.user_model.num_types,)
  config.em.restarts = 1
  config.agent.inputs = INPUTS
  config.agent.data_mixes = ("real+sim",)
  config.agent.ppo.enabled = False
  config.agent.planning.enabled = False
  for learner in ("iql", "bc"):
    config.agent[learner].steps = config.agent[learner].steps_per_dispatch
  workdir = str(tmp_path_factory.mktemp("inputs") / "run")
  pipeline.run(config, workdir)
  return config, workdir


def test_the_richer_iql_is_trained_and_evaluated_beside_the_others(run):
  config, workdir = run
  with open(os.path.join(workdir, "agent", "agent.json")) as f:
    policies = json.load(f)["policies"]
  assert policies[RICH]["inputs"] == INPUTS and policies["iql/real+sim"]["inputs"] == "text"
  assert policies[RICH]["steps"] == config.agent.iql.steps
  data_ = artefacts.load_data(config, workdir)
  fitted = artefacts.load_fitted_users(config, workdir, data_.table.dim)
  environment, responders = environments.environments(config, workdir, fitted)["simulator"]
  names = set(registry.trained_policies(config))  # What the evaluate stage compares.
  assert names == {"iql/real+sim", RICH, "myopic/real+sim", "bc/real"}
  policies = {
    agent_eval.BASELINE: registry.baseline_policies(config, fitted, responders)[
      agent_eval.BASELINE
    ],
    RICH: registry.load_policy(config, workdir, RICH, data_.table.dim, fitted),
  }
  mesh, users = parallel.make_mesh(config.mesh), 8
  runs = agent_eval.rollouts(jax.random.key(2), users, environment, policies, mesh)
  summary = agent_eval.summarize(runs, environment, 20, 0)
  assert len(summary[RICH].utility) == config.interaction.turns
  _, state = simulator.reset(jax.random.key(0), environment.params, user_type=jnp.int32(0))
  policy, params = policies[RICH]
  for other in (1, 2):
    np.testing.assert_array_equal(
      simulator.act(policy, jax.random.key(1), state, params),
      simulator.act(policy, jax.random.key(1), state.replace(user_type=jnp.int32(other)), params),
    )


def _fitted_and_sim_sessions(config, workdir):
  data_ = artefacts.load_data(config, workdir)
  fitted = artefacts.load_fitted_users(config, workdir, data_.table.dim)
  path = os.path.join(workdir, artefacts.SIM_RECORDS)
  records = schema.read_records(path)
  table = schema.load_features(os.path.join(workdir, artefacts.SIM_FEATURES), data_.table.dim)
  users = list(dict.fromkeys(r.user_id for r in records))
  sessions = data.sessions_from_records(
    records, table, schema.RecordSpec.from_config(config), users, config.interaction.turns, path
  )
  return data_, fitted, table, sessions


def test_logged_beliefs_and_images_match_numpy_and_the_environment(run):
  config, workdir = run
  data_, fitted, table, sessions = _fitted_and_sim_sessions(config, workdir)
  beliefs = data.session_beliefs(fitted, table, sessions)
  trajectories = simulator.load_trajectories(os.path.join(workdir, artefacts.SIM_TRAJECTORIES))
  np.testing.assert_allclose(beliefs, trajectories.log_belief, rtol=0, atol=2e-4)
  image = np.asarray(table.image)[sessions.image_rows]
  utils, tau = fitted.utilities(jnp.asarray(image), jnp.asarray(sessions.slate_text))
  np.testing.assert_allclose(
    beliefs,
    reference.session_beliefs(
      fitted.log_priors, utils, float(tau), sessions.option_mask, sessions.choice
    ),
    rtol=0,
    atol=2e-4,
  )
  np.testing.assert_allclose(
    data.session_slate_images(table, sessions),
    reference.aggregate(image, "mean", -2, sessions.image_mask[..., None]),
    rtol=1e-6,
    atol=1e-6,
  )
  sim = stage.sim_transitions(config, workdir, data_.table.dim, frozenset(INPUTS.split("+")))
  expected = np.asarray(trajectories.log_belief)
  np.testing.assert_array_equal(sim.log_belief, expected[:, :-1].reshape(sim.size, -1))
  np.testing.assert_array_equal(sim.next_log_belief, expected[:, 1:].reshape(sim.size, -1))
  np.testing.assert_allclose(
    sim.slate_images, data.session_slate_images(table, sessions).reshape(sim.slate_images.shape)
  )
  chosen = sessions.choice[..., None, None]
  chosen_images = np.take_along_axis(image, chosen[..., None], axis=2)[:, :, 0]  # [S, H, M, D]
  chosen_mask = np.take_along_axis(sessions.image_mask, chosen, axis=2)[:, :, 0]
  np.testing.assert_allclose(
    sim.history_images,
    np.repeat(
      reference.aggregate(chosen_images, "mean", -2, chosen_mask[..., None]),
      config.interaction.turns,
      axis=0,
    ),
    rtol=1e-6,
    atol=1e-6,
  )


def _replayed_observations(config, workdir, fitted, user_types):
  """The simulator's observation before each turn of the simulate stage's first sessions (of types
  user_types i[n]), replayed through reset and step with that stage's key, environment and logging
  policy: an Observation of leaves [n, H, ...]."""
  params = stage.fitted_simulator(config, workdir, fitted)
  policy, turns = registry.logging_policy(config), config.interaction.turns
  key = runs.stage_key(config, "simulate")

  def session(user_id, user_type):
    k_user = simulator.user_key(key, user_id)
    obs, state = simulator.reset(jax.random.fold_in(k_user, turns), params, user_type=user_type)
    before = []
    for t in range(turns):
      k_policy, k_env = jax.random.split(jax.random.fold_in(k_user, t))
      before.append(obs)
      obs, state, *_ = simulator.step(k_env, state, policy(k_policy, obs, None), params)
    return jax.tree.map(lambda *x: jnp.stack(x), *before)

  return jax.jit(jax.vmap(session))(jnp.arange(len(user_types)), jnp.asarray(user_types))


def test_the_observed_chosen_images_equal_the_simulated_transitions(run):
  config, workdir = run
  data_ = artefacts.load_data(config, workdir)
  fitted = artefacts.load_fitted_users(config, workdir, data_.table.dim)
  trajectories = simulator.load_trajectories(os.path.join(workdir, artefacts.SIM_TRAJECTORIES))
  n, turns = 8, config.interaction.turns
  obs = jax.device_get(_replayed_observations(config, workdir, fitted, trajectories.user_type[:n]))
  sim = stage.sim_transitions(config, workdir, data_.table.dim, frozenset(CHOSEN.split("+")))
  first = jax.tree.map(lambda x: x[: n * turns].reshape((n, turns) + x.shape[1:]), sim)
  np.testing.assert_array_equal(obs.history_mask, first.history_mask)
  np.testing.assert_allclose(  # The replayed sessions are the simulated ones.
    obs.history, np.where(obs.history_mask[..., None], first.history, 0.0), rtol=0, atol=1e-6
  )
  played = first.history_mask[..., 1:, None]
  np.testing.assert_allclose(
    value.pooled_images(obs.history_images),
    np.where(played, first.history_images, 0.0),
    rtol=1e-5,
    atol=1e-5,
  )
  assert np.any(first.history_images[played[..., 0]])


def test_the_policy_scores_an_observation_as_it_was_trained(run):
  config, workdir = run
  data_, fitted, table, sessions = _fitted_and_sim_sessions(config, workdir)
  policy, params = registry.load_policy(config, workdir, RICH, data_.table.dim, fitted)
  assert policy.inputs == {"text", "images", "belief", "chosen_images"}
  transitions = stage.sim_transitions(config, workdir, data_.table.dim, policy.inputs)
  trained = policy.network().apply(params, *iql.prompt_inputs(policy, transitions), method="score")
  images = np.asarray(table.image)[sessions.image_rows]  # [S, H, L, M, D], every image real
  chosen = np.take_along_axis(images, sessions.choice[..., None, None, None], axis=2)[:, :, 0]
  played = transitions.history_mask[:, 1:, None, None]
  observations = simulator.Observation(
    history=transitions.history,
    history_mask=transitions.history_mask,
    turn=transitions.turn,
    candidate_text=transitions.slate_text,
    candidate_images=images.reshape((transitions.size,) + images.shape[2:]),
    category=transitions.slate_category,
    log_belief=transitions.log_belief,
    history_images=np.where(played, np.repeat(chosen, config.interaction.turns, 0), 0.0),
  )
  scores = jax.jit(jax.vmap(policy.scores, in_axes=(None, 0)))
  np.testing.assert_allclose(scores(params, observations), trained, rtol=1e-5, atol=1e-5)
  flipped = observations.replace(log_belief=jnp.flip(observations.log_belief, axis=-1))
  assert not np.allclose(scores(params, flipped), trained, rtol=1e-3)
  others = observations.replace(history_images=jnp.flip(observations.history_images, axis=0))
  assert not np.allclose(scores(params, others), trained, rtol=1e-3)


def test_a_policy_reading_the_chosen_images_alone_is_trained_and_evaluated(run, tmp_path):
  config, workdir = run
  config = config.copy_and_resolve_references()
  config.agent.inputs = CHOSEN
  name = f"iql/real+sim/{CHOSEN}"
  learner, mix, inputs = registry.trained_policies(config)[name]
  table = artefacts.load_table(config, workdir)
  fitted = artefacts.load_fitted_users(config, workdir, table.dim)
  reads = registry.offline_inputs(config)
  real = stage.training_transitions(config, workdir, fitted, table, reads)
  sim = stage.sim_transitions(config, workdir, table.dim, reads)
  assert real.slate_images is None and sim.slate_images is None
  assert (
    real.history_images.shape[1:]
    == sim.history_images.shape[1:]
    == (
      config.interaction.turns,
      table.dim,
    )
  )
  _, params, history = registry.train_policy(
    config,
    learner,
    mix,
    real,
    sim,
    jax.random.key(3),
    parallel.make_mesh(config.mesh),
    str(tmp_path / "checkpoints"),
    inputs=inputs,
  )
  assert len(history["step"]) == config.agent.iql.steps
  checkpoint.save_tree(registry.policy_dir(str(tmp_path), name), params)
  environment, responders = environments.environments(config, workdir, fitted)["simulator"]
  policies = {
    agent_eval.BASELINE: registry.baseline_policies(config, fitted, responders)[
      agent_eval.BASELINE
    ],
    name: registry.load_policy(config, str(tmp_path), name, table.dim, fitted),
  }
  trajectories = agent_eval.rollouts(
    jax.random.key(2), 8, environment, policies, parallel.make_mesh(config.mesh)
  )
  assert policies[name][0].inputs == {"text", "chosen_images"}
  assert np.all(np.isfinite(trajectories[name].utility))
  summary = agent_eval.summarize(trajectories, environment, 20, 0)
  assert len(summary[name].utility) == config.interaction.turns


def test_a_person_plays_the_richer_policy_and_it_reads_their_chosen_images(run):
  """The browser/terminal session serves a policy that reads `chosen_images`: after each choice the
  observation holds the chosen column's images at that turn's row, zeros after."""
  _, workdir = run
  session = serve_session.start_session(workspace_lib.load(workdir), RICH, start_index=0)
  shown = []
  for column in (1, 3, 0):
    shown.append(np.asarray(session.images[column]))
    session.choose(column)
  images = np.asarray(session.history_images)
  np.testing.assert_array_equal(images[:3], np.stack(shown))
  assert not images[3:].any() and session.slate.shape == (session.slate_size,)
