"""The evaluate stage's agent sections: every policy in every environment built from the workdir, with
user-clustered bootstrap CIs, the comparisons of the main trained policy and of the best trained policy
against greedy, sim-vs-real checks on held-out users and their figures."""

import os
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np

from pasta_jax import artefacts, parallel, runs, simulator, types
from pasta_jax.agent import registry
from pasta_jax.data import layout, schema
from pasta_jax.evaluation import agents as agent_eval
from pasta_jax.evaluation import environments, metrics, plots, sim_vs_real
from pasta_jax.user_model import posterior, utility

CURVE_POLICIES = ("greedy", "iql/real+sim", "oracle")


def discounted_return(utility: np.ndarray, discount: float) -> np.ndarray:
  """Σ_t γ^t utility[:, t]: utility f[N, H] -> f64[N]."""
  utility = np.asarray(utility, np.float64)
  return utility @ discount ** np.arange(utility.shape[1])


def best_trained(results: Mapping[str, metrics.PolicyMetrics], trained: list[str]) -> str:
  """The trained policy with the highest mean final-turn utility in `results`."""
  return max(trained, key=lambda name: results[name].utility[-1].mean)


def versus(
  trajectories: Mapping[str, simulator.Trajectories],
  policy: str,
  baseline: str,
  discount: float,
  samples: int,
  seed: int,
) -> dict:
  """`policy` minus `baseline` on the same users: final-turn utility and discounted return."""
  a, b = trajectories[policy].utility, trajectories[baseline].utility
  final = metrics.paired_difference(a[:, -1], b[:, -1], num_samples=samples, seed=seed)
  summed = metrics.paired_difference(
    discounted_return(a, discount), discounted_return(b, discount), num_samples=samples, seed=seed
  )
  return {
    "policy": policy,
    "baseline": baseline,
    "diff_mean": final.mean,
    "diff_ci95": list(final.ci95),
    "discounted_return_diff_mean": summed.mean,
    "discounted_return_diff_ci95": list(summed.ci95),
  }


def policy_section(
  result: metrics.PolicyMetrics, utility: np.ndarray, discount: float, samples: int, seed: int
) -> dict:
  """One policy's report entry: the headline, the discounted return with its CI and the curves."""
  summed = metrics.mean_with_ci(
    discounted_return(utility, discount), num_samples=samples, seed=seed
  )
  return {
    **agent_eval.headline(result),
    "discounted_return": summed.mean,
    "discounted_return_ci95": list(summed.ci95),
    "utility_per_turn": metrics.to_json(result.utility),
    "type_accuracy_per_turn": metrics.to_json(result.type_accuracy),
  }


def check_simulator(
  config: ml_collections.ConfigDict,
  workdir: str,
  table: types.FeatureTable,
  fitted: utility.FittedUsers,
) -> dict:
  """Sim vs real: the fitted user model's prequential log-likelihood and calibration on the held-out
  users' logged choices (turns within a session from the records), and evaluate/calibration.png.
  Each process reads from the data stage's shards and scores only its own block of held-out users
  (`parallel.process_block`); the blocks are joined in process order before the CIs."""
  out = os.path.join(workdir, "evaluate")
  os.makedirs(out, exist_ok=True)
  heldout = artefacts.load_layout(workdir)["heldout"]
  host_fitted = parallel.on_host(fitted)

  def scored(users: slice) -> tuple[np.ndarray, types.Choices, np.ndarray]:
    row_records = layout.read_row_records(heldout, layout.user_rows(heldout, users))
    choices = layout.fill(heldout, schema.RecordSpec.from_config(config), row_records)
    log_probs = np.asarray(posterior.prequential_log_probs(host_fitted, table, choices))
    return log_probs, choices, schema.row_turns(row_records, heldout.turns_per_row)

  block = parallel.process_block(len(heldout.users))
  log_probs, choices, session_turn = parallel.concat_processes(parallel.together(scored, block))
  checks = sim_vs_real.evaluate(
    log_probs,
    choices,
    config.interaction.turns,
    num_samples=config.evaluate.bootstrap_samples,
    seed=config.seed,
    session_turn=session_turn,
  )
  plots.plot_reliability(checks.calibration, os.path.join(out, "calibration.png"))
  return {"sim_vs_real": checks.to_json()}


def evaluate(config: ml_collections.ConfigDict, workdir: str, with_agents: bool) -> dict:
  """The evaluate stage's report sections: sim vs real always, and with `with_agents` (the agent stage
  has run) every policy's evaluation (`evaluate_agents`)."""
  table = artefacts.load_table(config, workdir)
  fitted = artefacts.load_fitted_users(config, workdir, table.dim)
  content = check_simulator(config, workdir, table, fitted)
  if with_agents:
    content.update(evaluate_agents(config, workdir, fitted))
  return content


def evaluate_agents(
  config: ml_collections.ConfigDict, workdir: str, fitted: utility.FittedUsers
) -> dict:
  """Every policy on each environment of `environments.environments`.

  The report's "agent" section (headline environment, named in "agent_environment") gives each policy's
  final-turn utility and discounted return (γ = agent.iql.discount, in "return_discount") with 95% CIs and,
  for trained policies, the reward they were trained for; "agent_comparisons" compares the main IQL policy
  with every other and adds the best trained policy ("agent_best", chosen on the fitted simulator so that
  the headline users do not select it) against greedy. PNGs go under evaluate/.
  """
  out = os.path.join(workdir, "evaluate")
  os.makedirs(out, exist_ok=True)
  envs = environments.environments(config, workdir, fitted)
  mesh, key = parallel.make_mesh(config.mesh), runs.stage_key(config, "evaluate")
  samples, seed, discount = (
    config.evaluate.bootstrap_samples,
    config.seed,
    config.agent.iql.discount,
  )
  trained = {
    name: registry.load_policy(config, workdir, name, config.world.feature_dim, fitted)
    for name in registry.trained_policies(config)
  }
  results, trajectories = {}, {}
  for index, (name, (environment, responders)) in enumerate(envs.items()):
    policies = {**registry.baseline_policies(config, fitted, responders), **trained}
    trajectories[name] = agent_eval.rollouts(
      jax.random.fold_in(key, index), config.evaluate.num_users, environment, policies, mesh
    )
    results[name] = agent_eval.summarize(trajectories[name], environment, samples, seed)
  primary = next(iter(envs))
  main = (
    "iql/real+sim"
    if "iql/real+sim" in results[primary]
    else next(n for n in results[primary] if n.startswith("iql/"))
  )
  best = best_trained(results["simulator"], list(trained))
  section = {}
  for name, result in results[primary].items():
    section[name] = policy_section(
      result, trajectories[primary][name].utility, discount, samples, seed
    )
    if name in trained:
      section[name]["trained_for"] = config.simulate.reward
    if primary != "simulator":
      section[name]["on_simulator"] = agent_eval.headline(results["simulator"][name])
  curves = {n: r for n, r in results[primary].items() if n in (*CURVE_POLICIES, best)}
  plots.plot_utility_per_turn(
    {n: r.utility for n, r in results[primary].items()}, os.path.join(out, "utility_per_turn.png")
  )
  plots.plot_type_accuracy(
    {n: r.type_accuracy for n, r in results[primary].items()},
    os.path.join(out, "type_accuracy_per_turn.png"),
  )
  plots.plot_utility_and_accuracy(
    {n: r.utility for n, r in curves.items()},
    {n: r.type_accuracy for n, r in curves.items()},
    os.path.join(out, "greedy_iql_oracle_per_turn.png"),
  )
  comparisons = agent_eval.comparisons(trajectories[primary], main, samples, seed)
  comparisons.append(versus(trajectories[primary], best, "greedy", discount, samples, seed))
  return {
    "agent_environment": primary,
    "agent": section,
    "return_discount": discount,
    "agent_comparisons": comparisons,
    "agent_best": best,
  }
