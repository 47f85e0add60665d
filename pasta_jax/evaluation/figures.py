"""The report's figures, drawn from saved artefacts only (report.json, user_model.json, done-markers,
metric JSON Lines): each function takes their JSON and returns a matplotlib Figure with labelled axes,
units, and 95% CIs where the artefact holds them (the caption says so where it holds none)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

UTILITY = "utility of the chosen prompt (model utility units)"
ROLLING = 20


def _estimates(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean, lo, hi) f[n] of JSON estimates {"mean", "ci95"}; None (undefined) becomes NaN."""

  def number(x):
    return np.nan if x is None else float(x)

  mean = np.array([number(r["mean"]) for r in rows])
  lo = np.array([number(r["ci95"][0]) for r in rows])
  hi = np.array([number(r["ci95"][1]) for r in rows])
  return mean, lo, hi


def _errors(mean: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
  return np.stack([mean - lo, hi - mean])


def k_sweep(section: dict) -> plt.Figure:
  """Held-out log-likelihood per choice, BIC and restart agreement against K."""
  rows = section["k_sweep"]
  ks = [r["k"] for r in rows]
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
  panels = (
    ("heldout_loglik_per_choice", "held-out log-lik per choice (nats)"),
    ("bic", "BIC (nats, lower is better)"),
    ("restart_ari", "mean ARI between restarts (0 to 1)"),
  )
  for ax, (key, label) in zip(axes, panels):
    values = np.array([r[key] for r in rows], float)
    ci = [r.get(f"{key}_ci95") for r in rows]
    if all(c is not None for c in ci):
      bounds = np.array(ci, float)
      ax.errorbar(
        ks, values, yerr=[values - bounds[:, 0], bounds[:, 1] - values], fmt="o-", capsize=3
      )
    else:
      ax.plot(ks, values, "o-")
    ax.set(xlabel="K (number of user types)", ylabel=label)
    ax.axvline(
      section["selected_k"], color="gray", ls="--", label=f"selected K={section['selected_k']}"
    )
    if "planted_num_types" in section:
      ax.axvline(
        section["planted_num_types"],
        color="green",
        ls=":",
        label=f"planted K*={section['planted_num_types']}",
      )
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.legend(fontsize=7)
  fig.suptitle(
    "Best restart per K; held-out log-likelihood with its 95% CI over held-out users (bootstrap)",
    fontsize=9,
  )
  return fig


def final_utility(section: dict) -> plt.Figure:
  """Mean final-turn utility per policy with 95% CIs, and win rate against generator order."""
  names = list(section)
  fig, (ax_u, ax_w) = plt.subplots(1, 2, figsize=(11, 0.45 * len(names) + 1.6))
  y = np.arange(len(names))
  for ax, mean_key, ci_key, label in (
    (ax_u, "mean_final_utility", "ci95", "final-turn " + UTILITY),
    (
      ax_w,
      "win_rate_vs_generator_order",
      "win_rate_ci95",
      "win rate vs generator order (fraction of users)",
    ),
  ):
    mean, lo, hi = _estimates(
      [{"mean": section[n][mean_key], "ci95": section[n][ci_key]} for n in names]
    )
    ax.errorbar(mean, y, xerr=_errors(mean, lo, hi), fmt="o", capsize=3)
    ax.set(xlabel=label + ", 95% CI", yticks=y, yticklabels=names, ylabel="policy")
    ax.invert_yaxis()
  ax_w.axvline(0.5, color="gray", ls="--", lw=1)
  return fig


def per_turn(section: dict, key: str, ylabel: str, xlabel: str) -> plt.Figure:
  """One line per policy of a per-turn list of estimates, with its 95% CI band."""
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for name, row in section.items():
    mean, lo, hi = _estimates(row[key])
    x = np.arange(len(mean))
    (line,) = ax.plot(x, mean, "o-", label=name, ms=3)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
  ax.set(xlabel=xlabel, ylabel=ylabel + " (band: 95% CI)")
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.legend(fontsize=7)
  return fig


def comparisons(rows: list[dict]) -> plt.Figure:
  """The main policy minus every other policy in final-turn utility, with 95% CIs."""
  names = [r["baseline"] for r in rows]
  mean, lo, hi = _estimates([{"mean": r["diff_mean"], "ci95": r["diff_ci95"]} for r in rows])
  fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.6))
  y = np.arange(len(rows))
  ax.errorbar(mean, y, xerr=_errors(mean, lo, hi), fmt="o", capsize=3)
  ax.axvline(0.0, color="gray", ls="--", lw=1)
  ax.set(
    xlabel=f"{rows[0]['policy']} minus baseline: final-turn utility (model units), 95% CI",
    yticks=y,
    yticklabels=names,
    ylabel="baseline",
  )
  ax.invert_yaxis()
  return fig


def sim_vs_real(section: dict) -> plt.Figure:
  """Prequential log-likelihood per turn and the reliability diagram on held-out users, with 95% CIs."""
  fig, (ax_ll, ax_cal) = plt.subplots(1, 2, figsize=(11, 4.2))
  loglik = section["loglik"]
  mean, lo, hi = _estimates(loglik["per_turn"])
  x = np.arange(len(mean))
  ax_ll.errorbar(x, mean, yerr=_errors(mean, lo, hi), fmt="o-", capsize=3, label="fitted model")
  ax_ll.axhline(loglik["uniform"]["mean"], color="gray", ls="--", label="uniform choice")
  ax_ll.set(xlabel="turn within the user's data", ylabel="log-lik per choice (nats), 95% CI")
  ax_ll.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax_ll.legend(fontsize=7)
  overall = section["calibration"]["overall"]
  predicted = np.array([np.nan if p is None else p for p in overall["predicted"]], float)
  mean, lo, hi = _estimates(overall["observed"])
  shown = np.isfinite(predicted) & np.isfinite(mean)
  ax_cal.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="perfect calibration")
  ax_cal.errorbar(
    predicted[shown],
    mean[shown],
    yerr=_errors(mean, lo, hi)[:, shown],
    fmt="o-",
    capsize=3,
    label=f"all turns (ECE {overall['ece']['mean']:.3f})",
  )
  ax_cal.set(
    xlabel="predicted choice probability",
    ylabel="observed choice frequency, 95% CI",
    xlim=(0, 1),
    ylim=(0, 1),
  )
  ax_cal.legend(fontsize=7)
  return fig


def stage_seconds(seconds: dict[str, float]) -> plt.Figure:
  """Wall-clock seconds of each stage's last run (one measurement each: no CI)."""
  fig, ax = plt.subplots(figsize=(6.5, 3.2))
  names = list(seconds)
  ax.barh(names, [seconds[n] for n in names])
  ax.set(xlabel="wall-clock time of the stage's last run (s); one run, no CI", ylabel="stage")
  ax.invert_yaxis()
  return fig


def rolling_band(
  values: np.ndarray, window: int = ROLLING
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Trailing-window mean and its normal 95% CI (mean ± 1.96 sd / sqrt(n)) of a curve f[n]."""
  values = np.asarray(values, float)
  mean, lo, hi = (np.full(values.shape, np.nan) for _ in range(3))
  for i in range(len(values)):
    chunk = values[max(0, i - window + 1) : i + 1]
    chunk = chunk[np.isfinite(chunk)]
    if chunk.size:
      half = 1.96 * chunk.std(ddof=1) / np.sqrt(chunk.size) if chunk.size > 1 else 0.0
      mean[i], lo[i], hi[i] = chunk.mean(), chunk.mean() - half, chunk.mean() + half
  return mean, lo, hi


def training_curves(run: str, curves: dict[str, np.ndarray]) -> plt.Figure:
  """Every metric of one training run against its step: a trailing mean with its 95% CI band."""
  names = [n for n in curves if n != "step"]
  fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
  for ax, name in zip(axes[0], names):
    mean, lo, hi = rolling_band(curves[name])
    ax.plot(curves["step"], mean)
    ax.fill_between(curves["step"], lo, hi, alpha=0.25, linewidth=0)
    ax.set(
      xlabel="training step (updates)", ylabel=f"{name} (band: 95% CI of the {ROLLING}-point mean)"
    )
    ax.yaxis.label.set_size(7)
  fig.suptitle(run, fontsize=9)
  return fig
