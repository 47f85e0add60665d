"""Every policy against the same users of each environment (the fitted simulator; the planted true users of
the synthetic world, who stand in for human raters), with user-clustered bootstrap CIs."""

import dataclasses
from collections.abc import Mapping
from typing import Any

import chex
import jax
import ml_collections
import numpy as np

from pasta_jax import simulator
from pasta_jax.config_checks import MIN_BOOTSTRAP_SAMPLES, check, check_positive_int
from pasta_jax.evaluation import metrics
from pasta_jax.user_model import utility

BASELINE = "generator_order"


def _validate_sizes(config: ml_collections.ConfigDict) -> None:
  """The `evaluate` block's sizes (evaluation/agents.py): users to resample and enough bootstrap
  samples for a percentile 95% interval (`MIN_BOOTSTRAP_SAMPLES`)."""
  ev = config.evaluate
  check(
    ev.num_users >= 2,
    "evaluate.num_users",
    ev.num_users,
    "must be >= 2: a user-clustered bootstrap resamples users",
  )
  check(
    ev.bootstrap_samples >= MIN_BOOTSTRAP_SAMPLES,
    "evaluate.bootstrap_samples",
    ev.bootstrap_samples,
    f"must be >= {MIN_BOOTSTRAP_SAMPLES} for the ends of a 95% interval to rest on more than the "
    "extreme samples",
  )


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid `evaluate` field."""
  check_positive_int(config, "evaluate.num_users")
  check_positive_int(config, "evaluate.bootstrap_samples")
  _validate_sizes(config)


@dataclasses.dataclass(frozen=True)
class Environment:
  """params: the simulator; type_map: i[K_belief] true type of each belief type (None: the same types)."""

  params: simulator.EnvParams
  type_map: np.ndarray | None = None


def rollouts(
  key: chex.PRNGKey,
  num_users: int,
  environment: Environment,
  policies: Mapping[str, tuple[simulator.Policy | simulator.PrivilegedPolicy, Any]],
  mesh: jax.sharding.Mesh,
) -> dict[str, simulator.Trajectories]:
  """Trajectories of every policy (name -> (policy, params)) on users 0..num_users-1 of `environment`.

  Users' types and start prompts depend only on (key, user id), so row n is the same user for every policy.
  Their programs are compiled together first (`simulator.compile_runs`). Only what evaluation reads is
  kept: `images`, `history` and `slate_text` are None. A policy whose params
  are fitted users that score images alone gets their (image × type) table over a pooled generator
  (`simulator.tabulated`), as the environment's users and belief do in `simulator.make_params`.
  """
  ids, types_ = np.arange(num_users), np.full(num_users, -1)
  generator = environment.params.generator
  tables, runs = {}, {}
  for name, (policy, params) in policies.items():
    if utility.can_tabulate(params):
      if id(params) not in tables:
        tables[id(params)] = simulator.tabulated(params, generator)
      params = tables[id(params)]
    runs[name] = (policy, params)
  kept = dict(keep_images=False, keep_text=False)
  simulator.compile_runs(key, num_users, environment.params, list(runs.values()), mesh, **kept)
  return {
    name: simulator.run(key, ids, types_, environment.params, policy, params, mesh, **kept)
    for name, (policy, params) in runs.items()
  }


def summarize(
  trajectories: Mapping[str, simulator.Trajectories],
  environment: Environment,
  num_samples: int,
  seed: int,
) -> dict[str, metrics.PolicyMetrics]:
  """Per-turn utility, type-posterior accuracy and entropy, and the final-turn win rate and difference
  against generator order, for every policy."""
  baseline = trajectories[BASELINE].utility
  return {
    name: metrics.policy_metrics(
      t.utility,
      t.log_belief,
      t.user_type,
      baseline,
      environment.type_map,
      num_samples=num_samples,
      seed=seed,
    )
    for name, t in trajectories.items()
  }


def headline(result: metrics.PolicyMetrics) -> dict:
  """The report's numbers of one policy: mean final utility and win rate against generator order, with CIs."""
  final, win = result.utility[-1], result.final_win_rate
  return {
    "mean_final_utility": final.mean,
    "ci95": list(final.ci95),
    "win_rate_vs_generator_order": win.mean,
    "win_rate_ci95": list(win.ci95),
  }


def comparisons(
  trajectories: Mapping[str, simulator.Trajectories], policy: str, num_samples: int, seed: int
) -> list[dict]:
  """Difference in mean final utility of `policy` against every other policy, on the same users."""
  final = {name: t.utility[:, -1] for name, t in trajectories.items()}
  rows = []
  for baseline in final:
    if baseline != policy:
      diff = metrics.paired_difference(
        final[policy], final[baseline], num_samples=num_samples, seed=seed
      )
      rows.append(
        {
          "policy": policy,
          "baseline": baseline,
          "diff_mean": diff.mean,
          "diff_ci95": list(diff.ci95),
        }
      )
  return rows
