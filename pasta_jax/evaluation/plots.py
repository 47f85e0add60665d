"""PNG plots of the evaluation: per-turn curves with 95% CI bands per policy, and reliability diagrams.

Every function writes its figure to `path` through a temporary file renamed into place (the PNG is complete
once it exists) and returns `path`.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import ticker  # noqa: E402

from pasta_jax import files  # noqa: E402
from pasta_jax.evaluation import metrics, sim_vs_real  # noqa: E402


def save(fig: plt.Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  with files.replacing(path) as tmp:
    fig.savefig(tmp, format="png", dpi=120)
  plt.close(fig)
  return path


def _draw_per_turn(ax, series: dict[str, list[metrics.Estimate]]) -> None:
  """One line per policy (name -> per-turn Estimates) with its 95% CI as a band, on `ax`."""
  for name, values in series.items():
    x = np.arange(len(values))
    mean = np.array([v.mean for v in values])
    lo, hi = np.array([v.ci95 for v in values]).T
    (line,) = ax.plot(x, mean, "o-", label=name)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.legend(fontsize=8)


def plot_per_turn(
  series: dict[str, list[metrics.Estimate]],
  path: str,
  ylabel: str,
  xlabel: str = "turn",
  ylim: tuple[float, float] | None = None,
) -> str:
  """One line per policy (name -> per-turn Estimates) with its 95% CI as a band."""
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  _draw_per_turn(ax, series)
  ax.set(xlabel=xlabel, ylabel=ylabel)
  if ylim is not None:
    ax.set_ylim(*ylim)
  return save(fig, path)


def plot_utility_and_accuracy(
  utility: dict[str, list[metrics.Estimate]], accuracy: dict[str, list[metrics.Estimate]], path: str
) -> str:
  """One figure, two panels with 95% CI bands: mean utility of the chosen prompt per turn (Estimates [H] per
  policy) and type-posterior accuracy after each number of observed choices (Estimates [H + 1])."""
  fig, (left, right) = plt.subplots(1, 2, figsize=(10.0, 3.8))
  _draw_per_turn(left, utility)
  left.set(xlabel="turn", ylabel="mean utility of the chosen prompt")
  _draw_per_turn(right, accuracy)
  right.set(xlabel="choices observed", ylabel="type-posterior accuracy", ylim=(0.0, 1.0))
  return save(fig, path)


def plot_utility_per_turn(series: dict[str, list[metrics.Estimate]], path: str) -> str:
  """Mean utility of the chosen prompt per turn (Estimates [H] per policy)."""
  return plot_per_turn(series, path, ylabel="mean utility of the chosen prompt")


def plot_type_accuracy(series: dict[str, list[metrics.Estimate]], path: str) -> str:
  """Type-posterior accuracy after each number of observed choices (Estimates [H + 1] per policy)."""
  return plot_per_turn(
    series, path, ylabel="type-posterior accuracy", xlabel="choices observed", ylim=(0.0, 1.0)
  )


def plot_reliability(calibration: sim_vs_real.Calibration, path: str) -> str:
  """Reliability diagram: observed choice frequency against mean predicted probability per bin (95% CIs), one
  line per turn within a session and one for all turns, each labelled with its ECE."""
  fig, ax = plt.subplots(figsize=(5.0, 4.5))
  ax.plot([0.0, 1.0], [0.0, 1.0], color="gray", ls="--", lw=1, label="perfect calibration")
  groups = [(f"turn {h}", r, 0.6) for h, r in enumerate(calibration.per_turn)]
  for name, reliability, alpha in groups + [("all turns", calibration.overall, 1.0)]:
    x = np.array(reliability.predicted)
    y = np.array([e.mean for e in reliability.observed])
    lo, hi = np.array([e.ci95 for e in reliability.observed]).T
    shown = np.isfinite(x)
    ax.errorbar(
      x[shown],
      y[shown],
      yerr=[y[shown] - lo[shown], hi[shown] - y[shown]],
      fmt="o-",
      ms=3,
      capsize=2,
      alpha=alpha,
      label=f"{name} (ECE {reliability.ece.mean:.3f})",
    )
  ax.set(
    xlabel="predicted probability",
    ylabel="observed choice frequency",
    xlim=(0.0, 1.0),
    ylim=(0.0, 1.0),
  )
  ax.legend(fontsize=7)
  return save(fig, path)
