"""The evaluate stage's agent sections: every policy in every environment built from the workdir, with
user-clustered bootstrap CIs, the comparisons of the main trained policy, sim-vs-real checks on held-out
users and their figures."""

import os

import jax
import ml_collections

from pasta_jax import artefacts, parallel, runs
from pasta_jax.agent import registry
from pasta_jax.evaluation import agents as agent_eval
from pasta_jax.evaluation import environments, metrics, plots, sim_vs_real


def evaluate_agents(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Every policy on each environment of `environments.environments`; sim-vs-real on held-out users; the
  report's "agent" (headline environment, named in "agent_environment"), "agent_comparisons" and
  "sim_vs_real" sections and PNGs under evaluate/."""
  out = os.path.join(workdir, "evaluate")
  os.makedirs(out, exist_ok=True)
  data = artefacts.load_data(config, workdir)
  fitted = artefacts.load_fitted_users(config, workdir, data)
  envs = environments.environments(config, workdir, fitted)
  mesh, key = parallel.make_mesh(config.mesh), runs.stage_key(config, "evaluate")
  samples, seed = config.evaluate.bootstrap_samples, config.seed
  trained = {name: registry.load_policy(config, workdir, name, data.table.dim)
             for name in registry.trained_policies(config)}
  results, trajectories = {}, {}
  for index, (name, (environment, responders)) in enumerate(envs.items()):
    policies = {**registry.baseline_policies(config, fitted, responders), **trained}
    trajectories[name] = agent_eval.rollouts(jax.random.fold_in(key, index), config.evaluate.num_users, environment,
                                             policies, mesh)
    results[name] = agent_eval.summarize(trajectories[name], environment, samples, seed)
  primary = next(iter(envs))
  main = "iql/real+sim" if "iql/real+sim" in results[primary] else next(
      n for n in results[primary] if n.startswith("iql/"))
  section = {name: {**agent_eval.headline(result), "utility_per_turn": metrics.to_json(result.utility),
                    "type_accuracy_per_turn": metrics.to_json(result.type_accuracy),
                    **({} if primary == "simulator" else {
                        "on_simulator": agent_eval.headline(results["simulator"][name])})}
             for name, result in results[primary].items()}
  checks = sim_vs_real.evaluate(fitted, data.table, data.heldout, config.interaction.turns, num_samples=samples,
                                seed=seed)
  plots.plot_utility_per_turn({n: r.utility for n, r in results[primary].items()},
                              os.path.join(out, "utility_per_turn.png"))
  plots.plot_type_accuracy({n: r.type_accuracy for n, r in results[primary].items()},
                           os.path.join(out, "type_accuracy_per_turn.png"))
  plots.plot_reliability(checks.calibration, os.path.join(out, "calibration.png"))
  return {"agent_environment": primary, "agent": section,
          "agent_comparisons": agent_eval.comparisons(trajectories[primary], main, samples, seed),
          "sim_vs_real": checks.to_json()}
