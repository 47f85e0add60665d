"""Evaluation statistics with user-clustered bootstrap 95% confidence intervals (NumPy, on the host).

The user is the unit of resampling: a user with several rows (turns, sessions, shown options) is one
cluster, and a bootstrap sample draws clusters with replacement, every row of a drawn cluster coming
along. Every statistic here is a function of per-cluster sums, so a bootstrap sample is the vector of
how often each cluster was drawn (multinomial counts) and its sums are one matrix product. Intervals
are percentiles (2.5, 97.5) of the statistic over `num_samples` samples drawn from a fixed seed;
statistics that share a seed and a cluster set share their draws.

`scipy.stats.bootstrap` resamples observations, not clusters, and propagates an undefined (NaN) sample,
such as an empty calibration bin, into the interval; hence the resampling here.
"""

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
from scipy import special

from pasta_jax import files

NUM_SAMPLES = 1000
# Bootstrap samples per chunk x (clusters + statistic inputs) held at once.
_CHUNK_ELEMENTS = 1 << 24


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A point estimate on all users and its percentile 95% bootstrap interval (NaN where undefined)."""

  mean: float
  ci95: tuple[float, float]

  def to_json(self) -> dict:
    """{"mean": m, "ci95": [lo, hi]}, None for NaN (JSON has no NaN)."""
    return files.json_ready({"mean": float(self.mean), "ci95": [float(x) for x in self.ci95]})


def to_json(tree):
  """JSON-ready copy of a tree of Estimates, dataclasses, dicts, lists, arrays and numbers."""
  if isinstance(tree, Estimate):
    return tree.to_json()
  if dataclasses.is_dataclass(tree):
    return {f.name: to_json(getattr(tree, f.name)) for f in dataclasses.fields(tree)}
  if isinstance(tree, dict):
    return {k: to_json(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple, np.ndarray)):
    return [to_json(v) for v in tree]
  return files.json_ready(tree)


def estimates(mean: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> list[Estimate]:
  """One Estimate per entry of equal-shape f[G] arrays."""
  return [Estimate(float(m), (float(a), float(b))) for m, a, b in zip(mean, lo, hi)]


def group_sums(
  values: np.ndarray, groups: np.ndarray, num_groups: int, clusters: np.ndarray | None = None
) -> np.ndarray:
  """Per-cluster, per-group sums of row values.

  Args:
    values: f[N] one value per row.
    groups: i[N] in [0, num_groups): the group of each row (turn index, bin, ...).
    clusters: i[N] any labels (users); None: every row is its own cluster.

  Returns:
    f64[C, num_groups], clusters in sorted label order (the same order for any `values` with these labels).
  """
  values, groups = np.asarray(values, np.float64), np.asarray(groups)
  clusters = np.arange(len(values)) if clusters is None else np.asarray(clusters)
  if values.ndim != 1 or values.shape != groups.shape or values.shape != clusters.shape:
    raise ValueError(
      f"values, groups and clusters must all be [N]; got shapes {values.shape}, {groups.shape}, "
      f"{clusters.shape}"
    )
  _, cluster = np.unique(clusters, return_inverse=True)
  sums = np.zeros((cluster.max(initial=-1) + 1, num_groups))
  np.add.at(sums, (cluster, groups), values)
  return sums


def bootstrap(
  statistic: Callable[..., np.ndarray],
  per_cluster: Sequence[np.ndarray],
  num_samples: int = NUM_SAMPLES,
  seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """User-clustered bootstrap of a statistic of sums over clusters.

  Args:
    statistic: maps totals, one f64[S, ...] per entry of `per_cluster` (sums over each of S samples of
      clusters), to f[S, ...]; NaN where undefined in a sample (e.g. 0 / 0).
    per_cluster: arrays f[C, ...], row c holding cluster c's sums; at least two clusters.

  Returns:
    (estimate on all clusters, lo, hi), each f64[...]: lo and hi are the 2.5th and 97.5th percentiles over
    the samples where the statistic is defined (NaN if it never is).
  """
  per_cluster = [np.asarray(x, np.float64) for x in per_cluster]
  num_clusters = per_cluster[0].shape[0]
  if num_clusters < 2:
    raise ValueError(
      f"bootstrap: {num_clusters} cluster(s) (users); a confidence interval needs at least 2"
    )
  flat = [x.reshape(num_clusters, -1) for x in per_cluster]
  chunk = max(1, _CHUNK_ELEMENTS // (num_clusters + sum(x.shape[1] for x in flat)))
  rng = np.random.default_rng(seed)
  uniform = np.full(num_clusters, 1.0 / num_clusters)
  samples = []
  with np.errstate(divide="ignore", invalid="ignore"):
    estimate = statistic(*[x.sum(axis=0)[None] for x in per_cluster])[0]
    for start in range(0, num_samples, chunk):
      counts = rng.multinomial(num_clusters, uniform, size=min(chunk, num_samples - start)).astype(
        np.float64
      )
      samples.append(
        statistic(*[(counts @ f).reshape((-1,) + x.shape[1:]) for f, x in zip(flat, per_cluster)])
      )
  lo, hi = _percentile_interval(np.concatenate(samples))
  return np.asarray(estimate), lo, hi


def _percentile_interval(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """samples f[S, ...] -> (2.5th, 97.5th) percentiles f[...], ignoring NaN samples; NaN if all are."""
  defined = ~np.all(np.isnan(samples), axis=0)
  lo, hi = np.nanpercentile(np.where(defined, samples, 0.0), [2.5, 97.5], axis=0)
  return np.where(defined, lo, np.nan), np.where(defined, hi, np.nan)


def grouped_mean_with_ci(
  values: np.ndarray,
  groups: np.ndarray,
  num_groups: int,
  clusters: np.ndarray | None = None,
  num_samples: int = NUM_SAMPLES,
  seed: int = 0,
) -> list[Estimate]:
  """Mean of the rows of each group (values f[N], groups i[N]); one set of cluster draws for all groups.

  A group's mean is over its rows, so a cluster weighs by its number of rows in the group; a group with
  no rows is NaN.
  """
  values = np.asarray(values, np.float64)
  sums = group_sums(values, groups, num_groups, clusters)
  counts = group_sums(np.ones_like(values), groups, num_groups, clusters)
  return estimates(*bootstrap(np.divide, [sums, counts], num_samples, seed))


def mean_with_ci(
  values: np.ndarray,
  clusters: np.ndarray | None = None,
  num_samples: int = NUM_SAMPLES,
  seed: int = 0,
) -> Estimate:
  """Mean of values f[N] (one per user, or several per user with `clusters` i[N] naming the user)."""
  values = np.asarray(values)
  return grouped_mean_with_ci(
    values, np.zeros(values.shape, np.int64), 1, clusters, num_samples, seed
  )[0]


def per_turn_mean_with_ci(
  values: np.ndarray,
  clusters: np.ndarray | None = None,
  mask: np.ndarray | None = None,
  num_samples: int = NUM_SAMPLES,
  seed: int = 0,
) -> list[Estimate]:
  """Per-column means of values f[N, H] (row n a user, or a session of user `clusters[n]`), one Estimate per
  turn, from the same draws of users for every turn; mask bool[N, H] drops missing turns."""
  values = np.asarray(values, np.float64)
  rows, turns = np.indices(values.shape)
  clusters = rows if clusters is None else np.asarray(clusters)[rows]
  keep = np.ones(values.shape, bool) if mask is None else np.asarray(mask, bool)
  return grouped_mean_with_ci(
    values[keep], turns[keep], values.shape[1], clusters[keep], num_samples, seed
  )


def paired_difference(
  a: np.ndarray,
  b: np.ndarray,
  clusters: np.ndarray | None = None,
  num_samples: int = NUM_SAMPLES,
  seed: int = 0,
) -> Estimate:
  """mean(a - b) for a f[N], b f[N] measured on the same users (row n of both is the same user)."""
  a, b = _paired(a, b)
  return mean_with_ci(a - b, clusters, num_samples, seed)


def win_rate(
  a: np.ndarray,
  b: np.ndarray,
  tolerance: float = 1e-6,
  clusters: np.ndarray | None = None,
  num_samples: int = NUM_SAMPLES,
  seed: int = 0,
) -> Estimate:
  """mean(1[a > b] + 0.5 · 1[a == b]) over paired rows a f[N], b f[N]; |a - b| <= tolerance is a tie."""
  a, b = _paired(a, b)
  score = np.where(np.abs(a - b) <= tolerance, 0.5, (a > b).astype(np.float64))
  return mean_with_ci(score, clusters, num_samples, seed)


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(
      f"paired values must both be f[N] over the same users; got shapes {a.shape} and {b.shape}"
    )
  return a, b


def type_accuracy(
  log_belief: np.ndarray, true_type: np.ndarray, type_map: np.ndarray | None = None
) -> np.ndarray:
  """1.0 where the belief's most probable type is the user's true type, else 0.0: f64[N, H + 1].

  Args:
    log_belief: f[N, H + 1, K_belief] log posterior before each turn and after the last.
    true_type: i[N] each user's true type.
    type_map: i[K_belief] the true type matched to each belief type (`select_k.align_types`); -1 (unmatched)
      never counts as correct. None: belief types are true types.
  """
  guess = np.argmax(np.asarray(log_belief), axis=-1)
  if type_map is not None:
    guess = np.asarray(type_map)[guess]
  return (guess == np.asarray(true_type)[:, None]).astype(np.float64)


def belief_entropy(log_belief: np.ndarray) -> np.ndarray:
  """Entropy in nats of each belief: log_belief f[N, H + 1, K] -> f64[N, H + 1] (0 · log 0 = 0)."""
  return np.sum(special.entr(np.exp(np.asarray(log_belief, np.float64))), axis=-1)


@dataclasses.dataclass(frozen=True)
class PolicyMetrics:
  """One policy's results on N users.

  utility: mean utility of the chosen prompt at each of the H turns.
  type_accuracy, type_entropy: of the type posterior before each turn and after the last (H + 1 entries).
  final_win_rate, final_difference: final-turn utility against the baseline's on the same users (None
    without a baseline).
  """

  utility: list[Estimate]
  type_accuracy: list[Estimate]
  type_entropy: list[Estimate]
  final_win_rate: Estimate | None = None
  final_difference: Estimate | None = None

  def to_json(self) -> dict:
    return to_json(self)


def policy_metrics(
  utility: np.ndarray,
  log_belief: np.ndarray,
  true_type: np.ndarray,
  baseline_utility: np.ndarray | None = None,
  type_map: np.ndarray | None = None,
  tolerance: float = 1e-6,
  num_samples: int = NUM_SAMPLES,
  seed: int = 0,
) -> PolicyMetrics:
  """A policy's metrics from its trajectories (`simulator.Trajectories` fields).

  Args:
    utility: f[N, H] chosen prompt's utility per turn; log_belief: f[N, H + 1, K] type posterior;
      true_type: i[N]; type_map: see `type_accuracy`.
    baseline_utility: f[N, H] the baseline (generator order) on the same users, row for row.
  """
  utility = np.asarray(utility, np.float64)
  compared = {}
  if baseline_utility is not None:
    baseline_final = np.asarray(baseline_utility, np.float64)[:, -1]
    compared = dict(
      final_win_rate=win_rate(utility[:, -1], baseline_final, tolerance, None, num_samples, seed),
      final_difference=paired_difference(utility[:, -1], baseline_final, None, num_samples, seed),
    )
  return PolicyMetrics(
    utility=per_turn_mean_with_ci(utility, num_samples=num_samples, seed=seed),
    type_accuracy=per_turn_mean_with_ci(
      type_accuracy(log_belief, true_type, type_map), num_samples=num_samples, seed=seed
    ),
    type_entropy=per_turn_mean_with_ci(
      belief_entropy(log_belief), num_samples=num_samples, seed=seed
    ),
    **compared,
  )
