"""Ablations of the text-only IQL agent with 95% CIs that include seed variation.

`python -m pasta_jax.evaluation.ablations --config=configs/ablations.py --workdir=WORKDIR` on a workdir
where the data, user_model and simulate stages have run for the same config. Every row trains IQL
(`registry.train_policy`, learner "iql") for each of `ablations.seeds` training seeds and rolls it out
(`agents.rollouts`) on the evaluate stage's headline users (the planted users on synthetic data, the same
users and key as the evaluate stage); its score is the final-turn utility. The factors:

  sim_fraction  the share of simulated transitions per batch (`ablations.sim_fractions`; 0 is the
                "real" mix, 1 the "sim" mix, anything between "real+sim" at that `agent.sim_fraction`);
  real_data     the share of the training users whose logged sessions are kept (`ablations.real_fractions`,
                users drawn once by `ablations.subsample_seed`, nested: the 25% are among the 50%), trained
                at each share of simulated transitions in `ablations.real_sim_fractions`;
  num_types     K of the fitted user model behind the simulated data (`ablations.num_types`: an int,
                "selected" or "2x_selected", K of the user_model stage's sweep): fitted by `em.fit` as the
                user_model stage does (resuming from that stage's checkpoint of that K when it has one),
                its users simulated under the logging policy, then IQL on real + sim at `agent.sim_fraction`.
                The real transitions keep the reward labels of the user_model stage's model, so only the
                simulated data changes with K.

Seed s trains with key fold_in(agent stage key, s) in every row (common random numbers across levels).
Identical trainings (e.g. sim_fraction 0.5 and real_data 100% at 0.5) are trained once and shared.

Writes WORKDIR/ablations/: ablations.json (every row with its seeds, mean, CI, per-seed means and CIs,
data sizes, config fields and input digests), ablations.md and one PNG per factor.
"""

import dataclasses
import os
import shutil
import time

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from scipy import stats

from pasta_jax import artefacts, files, parallel, pipeline, progress, provenance, runs, simulator
from pasta_jax import config as config_lib
from pasta_jax.agent import data as agent_data
from pasta_jax.agent import registry
from pasta_jax.agent import stage as agent_stage
from pasta_jax.config_checks import (
  check,
  check_positive_int,
  is_int,
  is_real,
  num_training_users,
  training_users_text,
)
from pasta_jax.evaluation import agents as agent_eval
from pasta_jax.evaluation import environments, metrics, plots
from pasta_jax.user_model import em, select_k, utility

FACTORS = ("sim_fraction", "real_data", "num_types")
NAMED_K = ("selected", "2x_selected")
REFERENCE_POLICIES = ("random", agent_eval.BASELINE, "greedy", "oracle")
OUT = "ablations"
TRAINING_FIELDS = (
  "seed",
  "agent",
  "simulate",
  "user_model",
  "em",
  "select_k",
  "ablations.subsample_seed",
)
CI_METHOD = (
  "mean over seeds of the per-seed mean final-turn utility; 95% CI = mean +- sqrt(h_seed^2 + h_user^2), "
  "h_seed = t_{0.975, S-1} x sd(seed means) / sqrt(S) (training seeds), h_user = half the width of the "
  "user-clustered percentile bootstrap 95% CI of the mean over users of the seed-averaged utility"
)


def _check_fractions(values, field: str, low_closed: bool, high_closed: bool) -> None:
  low, high = ("[" if low_closed else "("), ("]" if high_closed else ")")
  ok = (
    len(values) >= 1
    and len(set(values)) == len(values)
    and all(
      is_real(v) and (v >= 0 if low_closed else v > 0) and (v <= 1 if high_closed else v < 1)
      for v in values
    )
  )
  check(ok, field, values, f"distinct numbers in {low}0, 1{high}, at least one")


def _check_batch_share(config: ml_collections.ConfigDict, values, field: str) -> None:
  """Every share strictly between 0 and 1 leaves both sources a transition in an IQL batch."""
  batch = config.agent.iql.batch_size
  for v in values:
    if 0 < v < 1:
      try:
        agent_data.mix_counts("real+sim", v, batch)
      except ValueError as e:
        check(False, field, values, f"{v}: {e}; use 0, 1 or a share nearer 0.5")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid field of the `ablations` block."""
  check("ablations" in config, "ablations", None, "missing: start from configs/ablations.py")
  a = config.ablations
  factors = tuple(a.factors)
  check(
    len(factors) >= 1 and len(set(factors)) == len(factors) and set(factors) <= set(FACTORS),
    "ablations.factors",
    factors,
    f"distinct names from {FACTORS}, at least one",
  )
  check_positive_int(config, "ablations.seeds")
  check(a.seeds >= 2, "ablations.seeds", a.seeds, "must be >= 2: the CI includes seed variation")
  check(is_int(a.subsample_seed), "ablations.subsample_seed", a.subsample_seed, "an int")
  _check_fractions(tuple(a.sim_fractions), "ablations.sim_fractions", True, True)
  _check_batch_share(config, tuple(a.sim_fractions), "ablations.sim_fractions")
  _check_fractions(tuple(a.real_fractions), "ablations.real_fractions", False, True)
  _check_fractions(tuple(a.real_sim_fractions), "ablations.real_sim_fractions", True, False)
  _check_batch_share(config, tuple(a.real_sim_fractions), "ablations.real_sim_fractions")
  users = num_training_users(config)
  if users is not None:
    fewest = min(tuple(a.real_fractions))
    check(
      round(fewest * users) >= 1,
      "ablations.real_fractions",
      tuple(a.real_fractions),
      f"{fewest} of {training_users_text(config)} keeps no user",
    )
  references = tuple(a.reference_policies)
  check(
    len(set(references)) == len(references) and set(references) <= set(REFERENCE_POLICIES),
    "ablations.reference_policies",
    references,
    f"distinct names from {REFERENCE_POLICIES}",
  )
  levels = tuple(a.num_types)
  check(
    len(levels) >= 1
    and len(set(levels)) == len(levels)
    and all((is_int(k) and k >= 1) or k in NAMED_K for k in levels),
    "ablations.num_types",
    levels,
    f"distinct positive ints or {NAMED_K}, at least one",
  )


@dataclasses.dataclass(frozen=True)
class Training:
  """One IQL training data set: share of simulated transitions per batch, share of training users kept,
  K of the model behind the simulated data."""

  sim_fraction: float
  real_fraction: float
  num_types: int

  @property
  def data_mix(self) -> str:
    return {0.0: "real", 1.0: "sim"}.get(float(self.sim_fraction), "real+sim")

  @property
  def name(self) -> str:
    return f"sim{self.sim_fraction:g}_real{self.real_fraction:g}_k{self.num_types}"


@dataclasses.dataclass(frozen=True)
class Row:
  """One table row: a factor of `FACTORS`, its level (a share, or K) and the data its IQL trains on."""

  factor: str
  level: float | int
  training: Training


def resolve_k(level, selected: int) -> int:
  """An `ablations.num_types` entry as K: an int, "selected" or "2x_selected" of the selected K."""
  return {"selected": selected, "2x_selected": 2 * selected}.get(level, level)


def ablation_rows(config: ml_collections.ConfigDict, selected: int) -> list[Row]:
  """Every row of the configured factors, in table order."""
  a, main_fraction, main_k = (
    config.ablations,
    config.agent.sim_fraction,
    config.user_model.num_types,
  )
  rows = []
  if "sim_fraction" in a.factors:
    rows += [Row("sim_fraction", f, Training(f, 1.0, main_k)) for f in sorted(a.sim_fractions)]
  if "real_data" in a.factors:
    rows += [
      Row("real_data", r, Training(f, r, main_k))
      for f in sorted(a.real_sim_fractions)
      for r in sorted(a.real_fractions)
    ]
  if "num_types" in a.factors:
    ks = sorted({resolve_k(level, selected) for level in a.num_types})
    rows += [Row("num_types", k, Training(main_fraction, 1.0, k)) for k in ks]
  return rows


def kept_users(user_ids: list[str], fraction: float, seed: int) -> list[str]:
  """The first round(fraction × U) users of a permutation fixed by `seed` (nested across fractions)."""
  order = np.random.default_rng(seed).permutation(len(user_ids))
  return sorted(user_ids[i] for i in order[: int(round(fraction * len(user_ids)))])


def seed_user_interval(values: np.ndarray, num_samples: int, seed: int) -> dict:
  """Mean and 95% CI (`CI_METHOD`) of values f[S seeds, N users] (row s: the same N users under seed s);
  also each seed's mean with its user-clustered bootstrap CI."""
  values = np.asarray(values, np.float64)
  num_seeds = values.shape[0]
  seed_means = values.mean(axis=1)
  mean = float(seed_means.mean())
  users = metrics.mean_with_ci(values.mean(axis=0), num_samples=num_samples, seed=seed)
  h_user = (users.ci95[1] - users.ci95[0]) / 2
  h_seed = stats.t.ppf(0.975, num_seeds - 1) * seed_means.std(ddof=1) / np.sqrt(num_seeds)
  half = float(np.hypot(h_seed, h_user))
  per_seed = [metrics.mean_with_ci(v, num_samples=num_samples, seed=seed) for v in values]
  return {
    "mean": mean,
    "ci95": [mean - half, mean + half],
    "ci95_seed_half_width": float(h_seed),
    "ci95_user_half_width": float(h_user),
    "seed_means": seed_means.tolist(),
    "seed_ci95": [list(e.ci95) for e in per_seed],
  }


class Sources:
  """The simulated training data of each K and the digests it was made from; `run_key` and `inputs`:
  the ablation's run key (a hash of `TRAINING_FIELDS` and the input digests) and input digests."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str,
    data: artefacts.StageData,
    mesh: jax.sharding.Mesh,
    ledger: provenance.Ledger,
  ):
    self.config, self.workdir, self.data, self.mesh, self.ledger = (
      config,
      workdir,
      data,
      mesh,
      ledger,
    )
    self.run_key, self.inputs = ledger.run_key(OUT), ledger.inputs(OUT)
    self.out = os.path.join(workdir, OUT, "user_model", self.run_key)
    self._cache = {}

  def simulated(self, k: int) -> tuple[agent_data.Transitions, dict[str, str]]:
    """(transitions of simulate.num_users simulated users of the K-type model, the digests read)."""
    if k not in self._cache:
      main = k == self.config.user_model.num_types
      self._cache[k] = self._saved() if main else self._simulate(k)
    return self._cache[k]

  def _saved(self) -> tuple[agent_data.Transitions, dict[str, str]]:
    """The simulate stage's trajectories."""
    name = f"simulate:{artefacts.SIM_TRAJECTORIES}"
    path = os.path.join(self.workdir, artefacts.SIM_TRAJECTORIES)
    transitions = agent_data.transitions_from_trajectories(simulator.load_trajectories(path))
    return transitions, {name: self.inputs[name]}

  def fit(self, k: int) -> tuple[utility.FittedUsers, dict[str, str]]:
    """EM at K as the user_model stage runs it (same key, settings and data), resumed from a copy of
    that stage's checkpoint of K when it fitted K."""
    config, data = self.config, self.data
    source = os.path.join(
      self.workdir, "user_model", "checkpoints", self.ledger.run_key("user_model"), f"k{k}"
    )
    target = os.path.join(self.out, f"k{k}")
    read = {}
    if os.path.isdir(source):
      read[f"user_model checkpoint:{os.path.relpath(source, self.workdir)}"] = (
        self.ledger.digests.digest(source)
      )
      if not os.path.isdir(target) and parallel.is_leader():
        shutil.copytree(source, target)
      parallel.sync(f"ablations copy k{k}")
    settings = em.EMSettings.from_config(config.em)
    model = utility.from_config(config, num_types=k)
    state = em.fit(
      settings,
      model,
      data.table,
      pipeline.global_choices(data.train, em.users_multiple(settings, self.mesh), self.mesh),
      jax.random.fold_in(runs.stage_key(config, "user_model"), k),
      self.mesh,
      checkpoint_dir=target,
      init_params=pipeline.load_init_params(config, data.table.dim),
    )
    _, fitted, _ = select_k.evaluate(
      state, model, data.table, data.train, data.heldout, settings.collapse_mass
    )
    return fitted, read

  def _simulate(self, k: int) -> tuple[agent_data.Transitions, dict[str, str]]:
    """The K-type model's users under the logging policy, keyed as the simulate stage keys its own."""
    fitted, read = self.fit(k)
    users = self.config.simulate.num_users
    trajectories = simulator.run(
      runs.stage_key(self.config, "simulate"),
      np.arange(users),
      np.full(users, -1),
      agent_stage.fitted_simulator(self.config, self.workdir, fitted),
      registry.logging_policy(self.config),
      None,
      self.mesh,
      keep_images=False,
    )
    return agent_data.transitions_from_trajectories(trajectories), read


def _row_config(config: ml_collections.ConfigDict, training: Training) -> ml_collections.ConfigDict:
  """The config a row trains under: `agent.sim_fraction` of a real+sim row (others read none)."""
  row = ml_collections.ConfigDict(config.to_dict())
  if training.data_mix == "real+sim":
    row.agent.sim_fraction = float(training.sim_fraction)
  return row


def train_seeds(
  config: ml_collections.ConfigDict,
  training: Training,
  real: agent_data.Transitions,
  sim: agent_data.Transitions,
  seeds: int,
  mesh: jax.sharding.Mesh,
  checkpoints: str,
) -> list[tuple]:
  """(policy, params) of IQL on `training`'s data for seeds 0..seeds-1 (key fold_in(agent key, s))."""
  row_config, key = _row_config(config, training), runs.stage_key(config, "agent")
  out = []
  for s in range(seeds):
    policy, params, _ = registry.train_policy(
      row_config,
      "iql",
      training.data_mix,
      real,
      sim,
      jax.random.fold_in(key, s),
      mesh,
      os.path.join(checkpoints, training.name, f"seed{s}"),
    )
    out.append((policy, params))
  return out


def final_utility(trajectories: simulator.Trajectories) -> np.ndarray:
  """f[N]: the utility of the prompt each user chose at the last turn."""
  return np.asarray(trajectories.utility)[:, -1]


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """The evaluate stage's headline environment (`environments.environments`' first) and its users:
  num_users users rolled out from `key` (the evaluate stage's key of that environment)."""

  name: str
  environment: agent_eval.Environment
  responders: object
  key: jax.Array
  num_users: int
  mesh: jax.sharding.Mesh

  def final_utilities(self, policies: dict[str, tuple]) -> dict[str, np.ndarray]:
    """name -> f[N] final-turn utility of each policy (name -> (policy, params)) on the same users."""
    trajectories = agent_eval.rollouts(
      self.key, self.num_users, self.environment, policies, self.mesh
    )
    return {name: final_utility(t) for name, t in trajectories.items()}


def headline_evaluation(
  config: ml_collections.ConfigDict,
  workdir: str,
  fitted: utility.FittedUsers,
  mesh: jax.sharding.Mesh,
) -> Evaluation:
  """The users every row and reference policy is scored on: those of the evaluate stage's headline
  environment (the planted users on synthetic data), `evaluate.num_users` of them."""
  name, (environment, responders) = next(
    iter(environments.environments(config, workdir, fitted).items())
  )
  key = jax.random.fold_in(runs.stage_key(config, "evaluate"), 0)
  return Evaluation(name, environment, responders, key, config.evaluate.num_users, mesh)


SPEC = provenance.StageSpec(
  OUT,
  fields=TRAINING_FIELDS,
  upstream=("data", "user_model", "simulate"),
  external=lambda c: {},
  outputs=lambda c: (f"{OUT}/ablations.json",),
)


def _ablate(
  config: ml_collections.ConfigDict,
  workdir: str,
  training: Training,
  data: artefacts.StageData,
  fitted: utility.FittedUsers,
  sources: Sources,
  evaluation: Evaluation,
  checkpoints: str,
) -> dict:
  """One training data set: its sizes and inputs, f[S, N] final-turn utilities of its seeds
  ("utilities") and their `seed_user_interval`."""
  users = kept_users(
    list(data.train_users.ids), training.real_fraction, config.ablations.subsample_seed
  )
  keep = set(users)
  real = agent_stage.real_transitions(
    config,
    fitted,
    data.table,
    [r for r in data.records if r.user_id in keep],
    data.train_users,
    artefacts.load_posteriors(workdir, data.train_users),
    os.path.join(workdir, artefacts.RECORDS),
  )
  sim, sim_inputs = sources.simulated(training.num_types)
  policies = train_seeds(
    config, training, real, sim, config.ablations.seeds, evaluation.mesh, checkpoints
  )
  finals = evaluation.final_utilities({f"seed{s}": p for s, p in enumerate(policies)})
  utilities = np.stack(list(finals.values()))
  mix = training.data_mix
  data_inputs = {k: v for k, v in sources.inputs.items() if not k.startswith("simulate:")}
  return {
    "data_mix": mix,
    "real_users": len(users) if mix != "sim" else 0,
    "real_transitions": int(real.size) if mix != "sim" else 0,
    "sim_transitions": int(sim.size) if mix != "real" else 0,
    "inputs": {**data_inputs, **(sim_inputs if mix != "real" else {})},
    "utilities": utilities,
    **seed_user_interval(utilities, config.evaluate.bootstrap_samples, config.seed),
  }


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates every row of the configured factors (module docstring); writes
  WORKDIR/ablations/ and returns ablations.json's content. The caller holds the workdir's lock."""
  start = time.time()
  ledger = provenance.Ledger(config, workdir, {**pipeline.STAGE_SPECS, OUT: SPEC})
  ledger.check_upstream(OUT)
  out = os.path.join(workdir, OUT)
  os.makedirs(out, exist_ok=True)
  data = artefacts.load_data(config, workdir)
  fitted = artefacts.load_fitted_users(config, workdir, data.table.dim)
  mesh = parallel.make_mesh(config.mesh)
  selected = provenance.read_marker(workdir, "user_model")["result"]["selected_k"]
  rows = ablation_rows(config, selected)
  sources = Sources(config, workdir, data, mesh, ledger)
  evaluation = headline_evaluation(config, workdir, fitted, mesh)
  baselines = registry.baseline_policies(config, fitted, evaluation.responders)
  reference = evaluation.final_utilities(
    {n: baselines[n] for n in config.ablations.reference_policies}
  )
  samples, results = config.evaluate.bootstrap_samples, {}
  checkpoints = os.path.join(out, "checkpoints", sources.run_key)
  for training in progress.progress(list(dict.fromkeys(r.training for r in rows)), "ablations"):
    results[training] = r = _ablate(
      config, workdir, training, data, fitted, sources, evaluation, checkpoints
    )
    runs.say(
      f"ablation {training.name}: final-turn utility {r['mean']:.3f} "
      f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] over {config.ablations.seeds} seeds"
    )
  content = {
    "environment": evaluation.name,
    "metric": "final-turn utility",
    "num_users": evaluation.num_users,
    "seeds": config.ablations.seeds,
    "ci_method": CI_METHOD,
    "run_key": sources.run_key,
    "fields": provenance.field_values(config, TRAINING_FIELDS + ("evaluate", "ablations")),
    "inputs": sources.inputs,
    "selected_k": selected,
    "rows": [_row_json(config, row, results[row.training]) for row in rows],
    "reference": {
      name: metrics.mean_with_ci(u, num_samples=samples, seed=config.seed).to_json()
      for name, u in reference.items()
    },
    "comparisons": _comparisons(rows, results, samples, config.seed),
    "seconds": time.time() - start,
  }
  write_outputs(out, content)
  return content


def write_outputs(out: str, content: dict) -> None:
  """ablations.json, ablations.md and one PNG per factor under `out`."""
  files.write_json(os.path.join(out, "ablations.json"), content)
  files.write_text(os.path.join(out, "ablations.md"), markdown(content))
  if parallel.is_leader():
    for factor in dict.fromkeys(row["factor"] for row in content["rows"]):
      plot_factor(content, factor, os.path.join(out, f"{factor}.png"))


def _row_json(config: ml_collections.ConfigDict, row: Row, result: dict) -> dict:
  t = row.training
  return {
    "factor": row.factor,
    "level": row.level,
    "seeds": list(range(config.ablations.seeds)),
    "config": {
      "agent.sim_fraction": t.sim_fraction,
      "ablations.real_fraction": t.real_fraction,
      "user_model.num_types": t.num_types,
      "agent.iql.steps": config.agent.iql.steps,
      "agent.iql.batch_size": config.agent.iql.batch_size,
      "evaluate.num_users": config.evaluate.num_users,
    },
    **{k: v for k, v in result.items() if k != "utilities"},
  }


def _comparisons(rows: list[Row], results: dict, samples: int, seed: int) -> list[dict]:
  """Each real + sim level of the sim_fraction factor minus the real-only and the sim-only levels (paired
  on users and seed index; CI as `seed_user_interval`)."""
  levels = {row.level: row.training for row in rows if row.factor == "sim_fraction"}
  ends = [level for level in (0.0, 1.0) if level in levels]
  out = []
  for level, training in levels.items():
    for end in ends:
      if 0 < level < 1:
        diff = results[training]["utilities"] - results[levels[end]]["utilities"]
        interval = seed_user_interval(diff, samples, seed)
        out.append(
          {
            "factor": "sim_fraction",
            "level": level,
            "baseline_level": end,
            "diff_mean": interval["mean"],
            "diff_ci95": interval["ci95"],
            "seed_diffs": interval["seed_means"],
          }
        )
  return out


def _ci_text(mean: float, ci) -> str:
  return f"{mean:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def markdown(content: dict) -> str:
  """ablations.json's rows, reference policies and comparisons as Markdown tables."""
  lines = [
    f"# Ablations: {content['metric']} on {content['num_users']} users ({content['environment']})",
    "",
    f"Each row: text-only IQL, mean over {content['seeds']} training seeds. CI: {content['ci_method']}.",
    "",
    "| factor | level | data mix | sim share | real users | real transitions | sim transitions | K |"
    " mean [95% CI] | per-seed means |",
    "|" + " --- |" * 10,
  ]
  for r in content["rows"]:
    c = r["config"]
    lines.append(
      f"| {r['factor']} | {r['level']:g} | {r['data_mix']} | {c['agent.sim_fraction']:g} | "
      f"{r['real_users']} | {r['real_transitions']} | {r['sim_transitions']} | "
      f"{c['user_model.num_types']} | {_ci_text(r['mean'], r['ci95'])} | "
      + ", ".join(f"{m:.3f}" for m in r["seed_means"])
      + " |"
    )
  lines += ["", "| reference policy | mean [95% CI] |", "| --- | --- |"]
  lines += [f"| {n} | {_ci_text(e['mean'], e['ci95'])} |" for n, e in content["reference"].items()]
  if content["comparisons"]:
    lines += ["", "| sim share | minus sim share | difference [95% CI] |", "| --- | --- | --- |"]
    lines += [
      f"| {c['level']:g} | {c['baseline_level']:g} | {_ci_text(c['diff_mean'], c['diff_ci95'])} |"
      for c in content["comparisons"]
    ]
  return "\n".join(lines) + "\n"


AXES = {
  "sim_fraction": "share of simulated transitions per IQL batch (agent.sim_fraction)",
  "real_data": "share of training users whose sessions are kept",
  "num_types": "user types K of the fitted model behind the simulated data",
}


def plot_factor(content: dict, factor: str, path: str) -> str:
  """Mean final-turn utility against the factor's level with 95% CI error bars (one line per share of
  simulated transitions for real_data), each seed's mean as a dot, and the reference policies as lines."""
  fig, ax = plots.plt.subplots(figsize=(6.0, 4.0))
  rows = [r for r in content["rows"] if r["factor"] == factor]
  groups = {}
  for r in rows:
    label = (
      f"IQL, sim share {r['config']['agent.sim_fraction']:g}" if factor == "real_data" else "IQL"
    )
    groups.setdefault(label, []).append(r)
  for label, group in groups.items():
    x = np.array([r["level"] for r in group], np.float64)
    y = np.array([r["mean"] for r in group])
    lo, hi = np.array([r["ci95"] for r in group]).T
    bars = ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o-", capsize=3, label=f"{label} (95% CI)")
    for xi, r in zip(x, group):
      ax.plot(
        [xi] * len(r["seed_means"]), r["seed_means"], ".", color=bars[0].get_color(), alpha=0.4
      )
  for i, (name, estimate) in enumerate(content["reference"].items()):
    ax.axhline(estimate["mean"], ls=":", lw=1, color=f"C{i + 3}", label=name)
  ax.set(
    xlabel=AXES[factor], ylabel=f"{content['metric']} ({content['environment']}, utility units)"
  )
  ax.set_title(f"{content['environment']}, {content['num_users']} users", fontsize=9)
  ax.legend(fontsize=7)
  return plots.save(fig, path)


def _define_flags() -> None:
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a config file with get_config() and an `ablations` block.",
    lock_config=True,
  )
  flags.DEFINE_string("workdir", None, "A workdir where data, user_model and simulate have run.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  parallel.maybe_initialize_distributed()
  config = flags.FLAGS.config
  try:
    config_lib.validate(config)
    validate_config(config)
  except config_lib.ConfigError as e:
    raise app.UsageError(str(e)) from None
  workdir = flags.FLAGS.workdir
  try:
    with provenance.workdir_lock(workdir, "ablations"):
      run(config, workdir)
  except (provenance.StaleInputError, provenance.WorkdirBusyError) as e:
    raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
