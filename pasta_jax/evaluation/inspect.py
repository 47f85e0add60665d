"""What the notebooks show, computed from a trained workdir: the notebooks call these and define no logic.

Tables come back as Markdown (for `IPython.display.Markdown`), figures as PNG paths. Everything reads the
saved artefacts; `type_exemplars`, `heldout_entropy` and `episodes` also run the fitted model or the
simulator on the synthetic world.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from pasta_jax import artefacts, files, parallel, simulator, types
from pasta_jax.agent import registry
from pasta_jax.data import synthetic
from pasta_jax.evaluation import environments, metrics, plots
from pasta_jax.user_model import posterior


def load_config(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The config of "path/to/config.py[:variant]" with dotted-field `overrides` applied."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("notebook_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(variant or None)
  config.update_from_flattened_dict(dict(overrides or {}))
  return config


def _fmt(value) -> str:
  if isinstance(value, float):
    return f"{value:.3f}"
  return str(value)


def markdown_table(header: list[str], rows: list[list]) -> str:
  lines = [f"| {' | '.join(header)} |", "|" + " --- |" * len(header)]
  return "\n".join(lines + [f"| {' | '.join(_fmt(v) for v in row)} |" for row in rows])


def _ci(estimate: dict) -> str:
  lo, hi = estimate["ci95"]
  return f"{estimate['mean']:.3f} [{lo:.3f}, {hi:.3f}]"


def user_model_summary(workdir: str) -> dict:
  return files.read_json(os.path.join(workdir, "user_model", "user_model.json"))


def k_sweep_table(workdir: str) -> str:
  """The K sweep: held-out log-likelihood, BIC and restart agreement per K."""
  summary = user_model_summary(workdir)
  rows = [
    [
      r["k"],
      r["heldout_loglik_per_choice"],
      f"{r['bic']:.1f}",
      r["restart_ari"],
      "selected" if r["k"] == summary["selected_k"] else "",
    ]
    for r in summary["k_sweep"]
  ]
  return markdown_table(
    ["K", "held-out log-lik / choice (nats)", "BIC", "ARI between restarts", ""], rows
  )


def policy_table(workdir: str) -> str:
  """Final-turn utility and win rate against generator order per policy, with 95% CIs."""
  report = files.read_json(os.path.join(workdir, "report.json"))
  rows = [
    [
      name,
      _ci({"mean": r["mean_final_utility"], "ci95": r["ci95"]}),
      _ci({"mean": r["win_rate_vs_generator_order"], "ci95": r["win_rate_ci95"]}),
    ]
    for name, r in sorted(report["agent"].items(), key=lambda item: -item[1]["mean_final_utility"])
  ]
  return f"On {report['agent_environment']}, 95% CIs:\n\n" + markdown_table(
    ["policy", "final-turn utility", "win rate vs generator order"], rows
  )


def _all_prompts(world: synthetic.World) -> synthetic.Prompt:
  """Every prompt of the world (attribute values x templates), in prompt-id order."""
  v, slots = world.values_per_attribute, len(synthetic.SLOTS)
  ids = np.arange(v**slots * len(synthetic.TEMPLATES))
  attributes = (ids[:, None] % v**slots // v ** np.arange(slots)) % v
  return synthetic.Prompt(
    attributes=jnp.asarray(attributes, jnp.int32), template=jnp.asarray(ids // v**slots, jnp.int32)
  )


def _text(world: synthetic.World, prompt: synthetic.Prompt) -> str:
  return synthetic.prompt_text(np.asarray(prompt.attributes), int(prompt.template))


def planted_description(world: synthetic.World, planted_type: int) -> str:
  """What a planted type likes most and least in each attribute slot."""
  weights = np.asarray(world.type_weights[planted_type]).reshape(len(synthetic.SLOTS), -1)
  likes = [synthetic.VOCABULARY[s][int(np.argmax(w))] for s, w in zip(synthetic.SLOTS, weights)]
  dislikes = [synthetic.VOCABULARY[s][int(np.argmin(w))] for s, w in zip(synthetic.SLOTS, weights)]
  return f"likes {', '.join(likes)}; dislikes {', '.join(dislikes)}"


def type_exemplars(config: ml_collections.ConfigDict, workdir: str, top: int = 5) -> str:
  """For each learned type, the world's prompts its head scores highest (mean over the prompt's images),
  its prior, and the planted type it was matched to with that type's description (synthetic data)."""
  if config.data.source != "synthetic":
    raise ValueError(
      "type_exemplars enumerates the synthetic world's prompts; this workdir is on real data"
    )
  data = artefacts.load_data(config, workdir)
  fitted = artefacts.load_fitted_users(config, workdir, data.table.dim)
  world = artefacts.load_world(config, workdir)
  alignment = artefacts.load_alignment(workdir)
  prompts = _all_prompts(world)
  seeds = jnp.broadcast_to(
    jnp.arange(config.interaction.images_per_prompt),
    prompts.template.shape + (config.interaction.images_per_prompt,),
  )
  expander = synthetic.SyntheticExpander(world)
  utilities, _ = jax.jit(fitted.utilities)(
    expander.render(prompts, seeds)[:, None], expander.text_features(prompts)[:, None]
  )
  scores = np.asarray(utilities[:, 0])
  priors = np.exp(np.asarray(fitted.log_priors))
  sections = []
  for k in range(scores.shape[1]):
    best = np.argsort(-scores[:, k])[:top]
    planted = int(alignment[k])
    described = planted_description(world, planted) if planted >= 0 else "no planted type matched"
    rows = [
      [i + 1, _text(world, jax.tree.map(lambda x, j=j: x[j], prompts)), float(scores[j, k])]
      for i, j in enumerate(best)
    ]
    sections.append(
      f"**Learned type {k}** (prior {priors[k]:.2f}), matched to planted type {planted}: "
      f"{described}\n\n" + markdown_table(["rank", "prompt", "utility"], rows)
    )
  return "\n\n".join(sections)


def heldout_entropy(config: ml_collections.ConfigDict, workdir: str) -> list[metrics.Estimate]:
  """Entropy (nats) of the held-out users' type posterior after each number of observed choices, with
  user-clustered bootstrap 95% CIs."""
  data = artefacts.load_data(config, workdir)
  fitted = artefacts.load_fitted_users(config, workdir, data.table.dim)
  heldout = jax.tree.map(jnp.asarray, data.heldout)
  return entropy_by_choices_observed(
    posterior.user_beliefs(fitted, data.table, heldout),
    heldout,
    config.evaluate.bootstrap_samples,
    config.seed,
  )


def entropy_by_choices_observed(
  log_belief: np.ndarray, choices: types.Choices, num_samples: int, seed: int
) -> list[metrics.Estimate]:
  """Mean entropy (nats) of the beliefs log_belief f[R, T + 1, K] (`posterior.user_beliefs`) after
  each number of a user's observed choices, over all of the user's rows, with user-clustered
  bootstrap 95% CIs: one Estimate per number of choices, 0 to the longest history."""
  entropy = metrics.belief_entropy(log_belief)
  turns = np.asarray(choices.turn_mask)
  user = np.asarray(choices.user_index)
  first_row = np.asarray(choices.first_rows())
  earlier = np.asarray(
    posterior.earlier_rows(jnp.sum(turns, axis=1), jnp.asarray(first_row)), np.int64
  )
  keep = np.concatenate([first_row[:, None], turns], axis=1) & (user >= 0)[:, None]
  observed = earlier[:, None] + np.arange(turns.shape[1] + 1)
  return metrics.grouped_mean_with_ci(
    entropy[keep],
    observed[keep],
    int(observed[keep].max()) + 1,
    np.broadcast_to(user[:, None], keep.shape)[keep],
    num_samples=num_samples,
    seed=seed,
  )


def plot_entropy(estimates: list[metrics.Estimate], path: str) -> str:
  return plots.plot_per_turn(
    {"held-out users": estimates},
    path,
    ylabel="type-posterior entropy (nats), 95% CI",
    xlabel="choices observed",
  )


def episodes(
  config: ml_collections.ConfigDict,
  workdir: str,
  user_id: int = 0,
  names: tuple[str, ...] = ("greedy", "iql/real+sim", "oracle"),
) -> dict[str, simulator.Trajectories]:
  """One user of the headline environment (the planted users on synthetic data) under each named policy:
  the same type and start prompt for every policy."""
  data = artefacts.load_data(config, workdir)
  fitted = artefacts.load_fitted_users(config, workdir, data.table.dim)
  environment, responders = next(iter(environments.environments(config, workdir, fitted).values()))
  policies = registry.baseline_policies(config, fitted, responders)
  mesh, key = parallel.make_mesh(config.mesh), jax.random.key(config.seed)
  out = {}
  for name in names:
    policy = (
      policies[name]
      if name in policies
      else registry.load_policy(config, workdir, name, data.table.dim, fitted)
    )
    out[name] = simulator.run(
      key, np.array([user_id]), np.array([-1]), environment.params, *policy, mesh, keep_images=False
    )
  return out


def _shown_text(world: synthetic.World, run: simulator.Trajectories, turn: int, column: int) -> str:
  return _text(world, jax.tree.map(lambda x: x[0, turn, column], run.shown))


def episode_table(
  config: ml_collections.ConfigDict, workdir: str, runs: dict[str, simulator.Trajectories]
) -> str:
  """The runs side by side, turn by turn: each policy's slate (the chosen prompt in bold), the utility of
  the choice, and the belief's most probable type."""
  world, alignment = artefacts.load_world(config, workdir), artefacts.load_alignment(workdir)
  first = next(iter(runs.values()))
  categories = config.interaction.categories
  out = [
    f"User of planted type {int(first.user_type[0])}, starting from: "
    f"*{_text(world, jax.tree.map(lambda x: x[0], first.start))}*"
  ]
  for t in range(first.choice.shape[1]):
    rows = []
    for name, run in runs.items():
      cells = []
      for j in range(run.slate.shape[2]):
        text = f"{_shown_text(world, run, t, j)} ({categories[run.category[0, t, j]]})"
        cells.append(f"**{text}**" if j == run.choice[0, t] else text)
      belief = np.exp(run.log_belief[0, t + 1])
      rows.append(
        [
          name,
          "<br>".join(cells),
          float(run.utility[0, t]),
          f"type {int(np.argmax(belief))} = planted {int(alignment[np.argmax(belief)])} ({belief.max():.2f})",
        ]
      )
    out.append(
      f"**Turn {t + 1}**\n\n"
      + markdown_table(["policy", "slate (chosen in bold)", "utility", "belief after"], rows)
    )
  return "\n\n".join(out)
