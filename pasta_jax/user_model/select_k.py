"""Model selection over the number of user types K, restart agreement and label alignment.

Two ways to fit the sweep: one `em.fit` per K (`evaluate` scores it), or `sweep`, every (K, restart)
pair in one compiled program (`em.fit(..., ks=...)`, `select_k.compile_once`), its pairs split over
a "replica" mesh axis of `select_k.replicas` devices (-1: as many as divide the devices and pairs).
Either way each K gets a `KResult`: BIC, restart agreement, and the held-out log-likelihood per
choice with a 95% CI from a bootstrap over held-out users."""

import dataclasses
import functools
import itertools
import os
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from scipy import optimize

from pasta_jax import files, parallel, types
from pasta_jax.config_checks import (
  check,
  check_real,
  is_int,
  num_training_users,
  training_users_text,
)
from pasta_jax.data import schema
from pasta_jax.evaluation import metrics
from pasta_jax.user_model import em, utility

CRITERIA = ("bic", "heldout")
# Restarts whose training LL per choice is within AT_BEST nats of the best reached the same maximum:
# mini-batch EM stops near it, and restarts that end at the same clustering (pairwise ARI 1.0) differ by up
# to ~5e-4 nats per choice on the quickstart's world.
AT_BEST = 1e-3


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid `select_k` field; on the synthetic world no K may
  exceed the training users (a type needs users to be fitted to)."""
  s = config.select_k
  check(
    len(s.ks) >= 1 and all(is_int(k) and k >= 1 for k in s.ks),
    "select_k.ks",
    s.ks,
    "must be one or more positive integers",
  )
  users = num_training_users(config)
  if users is not None:
    check(
      max(s.ks) <= users,
      "select_k.ks",
      s.ks,
      f"K={max(s.ks)} exceeds {training_users_text(config)}",
    )
  check(s.criterion in CRITERIA, "select_k.criterion", s.criterion, f"one of {CRITERIA}")
  check_real(config, "select_k.heldout_tolerance", at_least=0)
  compile_once = s.get("compile_once", False)
  check(isinstance(compile_once, bool), "select_k.compile_once", compile_once, "True or False")
  replicas = s.get("replicas", 1)
  check(
    is_int(replicas) and (replicas >= 1 or replicas == -1),
    "select_k.replicas",
    replicas,
    "a positive number of devices on the sweep's replica axis, or -1 (as many as divide the "
    "devices and the (K, restart) pairs)",
  )
  check(
    replicas == 1 or compile_once,
    "select_k.replicas",
    replicas,
    "splits the compiled-once sweep's pairs: set select_k.compile_once=True or replicas=1",
  )


@dataclasses.dataclass(frozen=True)
class KResult:
  k: int
  num_params: int
  train_loglik: float  # Σ over training users of log Σ_k π_k p(data_u | k).
  train_loglik_per_choice: float
  heldout_loglik_per_choice: float
  bic: float  # -2 train_loglik + num_params log(training choices).
  restart_ari: float  # Mean pairwise ARI of the restarts' user assignments (1.0 with one restart).
  best_restart: int
  restart_train_loglik: list[float]
  restart_loglik_per_choice: list[float]  # Each restart's training LL per choice (nats).
  collapsed_types: list[int]  # Types of the best restart below the collapse threshold.
  restart_converged: list[bool]  # Each restart met EM's stopping rule (em.converged).
  restart_epochs: list[int]  # Epochs that updated each restart.
  restart_grad_norm: list[float]  # |∇ training LL per choice| w.r.t. the params, at the end.
  restart_loglik_spread: float  # Best minus worst restart's training LL per choice (nats).
  restarts_at_best: int  # Restarts within AT_BEST nats per choice of the best training LL.
  # 95% CI of heldout_loglik_per_choice: a bootstrap over held-out users (None: fewer than 2).
  heldout_loglik_ci95: tuple[float, float] | None = None

  def row(self) -> dict:
    return {
      "k": self.k,
      "heldout_loglik_per_choice": self.heldout_loglik_per_choice,
      "heldout_loglik_per_choice_ci95": (
        None if self.heldout_loglik_ci95 is None else list(self.heldout_loglik_ci95)
      ),
      "bic": self.bic,
      "train_loglik_per_choice": self.train_loglik_per_choice,
      "num_params": self.num_params,
      "restart_ari": self.restart_ari,
      "collapsed_types": self.collapsed_types,
      "restart_converged": self.restart_converged,
      "restart_epochs": self.restart_epochs,
      "restart_grad_norm": self.restart_grad_norm,
      "restart_loglik_per_choice": self.restart_loglik_per_choice,
      "restart_loglik_spread": self.restart_loglik_spread,
      "restarts_at_best": self.restarts_at_best,
    }

  def warning(self) -> str | None:
    """A message when no restart of this K converged, else None."""
    if any(self.restart_converged):
      return None
    return (
      f"K={self.k}: no EM restart converged within {max(self.restart_epochs)} epochs (final "
      f"gradient norms {np.round(self.restart_grad_norm, 6).tolist()}); raise em.epochs, or in "
      "mini-batch EM lower em.decay_rate or em.decay_from_epoch"
    )

  def stability_warning(self) -> str | None:
    """A message when more than one restart ran and only the best reached its maximum (within
    AT_BEST), so another restart might find a better one; else None."""
    restarts = len(self.restart_train_loglik)
    if restarts < 2 or self.restarts_at_best > 1:
      return None
    below = self.train_loglik_per_choice - np.asarray(self.restart_loglik_per_choice)
    below = below[below > 0]
    return (
      f"K={self.k}: only 1 of {restarts} EM restarts reached the best training log-likelihood (the "
      f"others end {below.min():.2e} to {below.max():.2e} nats per choice below it), so the best "
      "fit may not be stable; raise em.restarts"
    )


def num_free_parameters(params, num_types: int) -> int:
  """Network parameters plus the K - 1 free prior probabilities."""
  return utility.num_parameters(params) + num_types - 1


def bic(total_loglik: float, num_params: int, num_observations: int) -> float:
  return -2.0 * total_loglik + num_params * np.log(num_observations)


def mean_pairwise_ari(assignments: np.ndarray) -> float:
  """assignments i32[R, U] -> mean ARI over restart pairs (1.0 for one restart)."""
  from sklearn import metrics

  pairs = list(itertools.combinations(range(assignments.shape[0]), 2))
  if not pairs:
    return 1.0
  return float(
    np.mean([metrics.adjusted_rand_score(assignments[a], assignments[b]) for a, b in pairs])
  )


def _real_user_rows(choices: types.Choices) -> tuple[np.ndarray, np.ndarray]:
  """(bool[R] the slots of per-user arrays (`em.per_user`) that hold a user, i64[U] each user's
  number of real choices), on the host (from the small `user_index` and `turn_mask`, gathered from
  every process when `choices` are global arrays)."""
  turns = np.sum(parallel.host_array(choices.turn_mask), axis=1)
  return schema.user_slots(choices), schema.per_user_sum(turns, choices)


def heldout_ci95(
  user_loglik: np.ndarray, user_choices: np.ndarray, num_samples: int = metrics.NUM_SAMPLES
) -> tuple[float, float] | None:
  """95% CI of Σ_u ℓ_u / Σ_u n_u (held-out log-likelihood per choice) from held-out users'
  log-likelihoods user_loglik f[U] (nats) and choices user_choices i[U], resampling users
  (`metrics.bootstrap`); None for fewer than 2 users."""
  if len(user_loglik) < 2:
    return None
  _, lo, hi = metrics.bootstrap(np.divide, [user_loglik, user_choices], num_samples)
  return float(lo), float(hi)


def _k_result(
  k: int,
  best_params: Any,
  best_log_priors: np.ndarray,
  train_ll: list[float],
  assignments: np.ndarray,
  grad_norms: list[float],
  converged: np.ndarray,
  epochs: np.ndarray,
  train_choices: int,
  heldout_user_ll: np.ndarray,
  heldout_user_choices: np.ndarray,
  collapse_mass: float,
  bootstrap_samples: int,
) -> KResult:
  """K types' scores from their R restarts: training LL Σ_u (train_ll f[R]), argmax-γ assignments
  i[R, U], gradient norms f[R], convergence bool[R] and epochs i[R], and the best restart's
  K-type variables and log priors f32[K] and each real held-out user's LL f[U_h] and choices."""
  best = int(np.argmax(train_ll))
  p = num_free_parameters(best_params, k)
  priors = np.exp(np.asarray(best_log_priors))
  return KResult(
    k=k,
    num_params=p,
    train_loglik=train_ll[best],
    train_loglik_per_choice=train_ll[best] / train_choices,
    heldout_loglik_per_choice=float(np.sum(heldout_user_ll, dtype=np.float64))
    / int(np.sum(heldout_user_choices)),
    bic=bic(train_ll[best], p, train_choices),
    restart_ari=mean_pairwise_ari(assignments),
    best_restart=best,
    restart_train_loglik=train_ll,
    restart_loglik_per_choice=[ll / train_choices for ll in train_ll],
    collapsed_types=[t for _, t in em.collapsed_types(priors[None], collapse_mass)],
    restart_converged=np.asarray(converged).tolist(),
    restart_epochs=np.asarray(epochs).tolist(),
    restart_grad_norm=grad_norms,
    restart_loglik_spread=(max(train_ll) - min(train_ll)) / train_choices,
    restarts_at_best=int(np.sum(np.asarray(train_ll) >= train_ll[best] - AT_BEST * train_choices)),
    heldout_loglik_ci95=heldout_ci95(heldout_user_ll, heldout_user_choices, bootstrap_samples),
  )


def evaluate(
  state: em.EMState,
  model: utility.UtilityModel,
  table: types.FeatureTable,
  train: types.Choices,
  heldout: types.Choices,
  collapse_mass: float,
  bootstrap_samples: int = metrics.NUM_SAMPLES,
) -> tuple[KResult, utility.FittedUsers, np.ndarray]:
  """Scores every restart of a restart-batched EM state; returns the best (by training LL) and its γ."""
  restarts = state.log_priors.shape[0]
  train_real, train_choices = _real_user_rows(train)
  train_ll, assignments, posteriors, grad_norms = [], [], [], []
  for r in range(restarts):
    one = em.unbatch(state, r)
    gamma, ll = em.posteriors_and_loglik(one.params, one.log_priors, model, table, train)
    train_ll.append(float(np.sum(parallel.host_array(ll)[train_real], dtype=np.float64)))
    posteriors.append(parallel.host_array(gamma)[train_real])
    assignments.append(np.argmax(posteriors[-1], axis=-1))
    grad_norms.append(float(em.gradient_norm(one.params, one.log_priors, model, table, train)))
  best = int(np.argmax(train_ll))
  one = em.unbatch(state, best)
  _, heldout_ll = em.posteriors_and_loglik(one.params, one.log_priors, model, table, heldout)
  real, heldout_choices = _real_user_rows(heldout)
  result = _k_result(
    model.num_types,
    one.params,
    one.log_priors,
    train_ll,
    np.stack(assignments),
    grad_norms,
    parallel.host_array(state.converged),
    parallel.host_array(state.epochs_used),
    int(np.sum(train_choices)),
    parallel.host_array(heldout_ll)[real],
    heldout_choices,
    collapse_mass,
    bootstrap_samples,
  )
  fitted = utility.FittedUsers(
    model=model,
    params=parallel.on_host(one.params),
    log_priors=parallel.host_array(one.log_priors),
  )
  return result, fitted, posteriors[best]


@dataclasses.dataclass(frozen=True)
class KFit:
  """One K of a compiled-once sweep: its scores, its best restart as a K-type model, the training
  users' γ f32[U, K] under it, and each real held-out user's log-likelihood f32[U_h] (nats,
  log Σ_k π_k p(data_u | k), in the order of the held-out choices' users)."""

  result: KResult
  fitted: utility.FittedUsers
  posteriors: np.ndarray
  heldout_user_loglik: np.ndarray


@functools.partial(jax.jit, static_argnames="model")
def _score_fits(
  params, log_priors, model: utility.UtilityModel, table, train, heldout
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Every fit of a batched EM state (leading axis [P]), one at a time (`lax.map`): γ f32[P, R, K]
  and per-user marginal log-likelihoods f32[P, R] of the training users, those f32[P, R_h] of the
  held-out users (per-user slots, `em.posteriors_and_loglik`: the first U hold the users), and the
  norm of the gradient of the training LL per choice f32[P]."""

  def one(fit):
    p, lp = fit
    gamma, train_ll = em.posteriors_and_loglik(p, lp, model, table, train)
    _, heldout_ll = em.posteriors_and_loglik(p, lp, model, table, heldout)
    return gamma, train_ll, heldout_ll, em.gradient_norm(p, lp, model, table, train)

  return jax.lax.map(one, (params, log_priors))


def _with_heads(params, kernel: np.ndarray) -> Any:
  """A copy of a model's variables whose heads' kernel is `kernel` f32[H, K]."""
  params = jax.tree.map(lambda x: x, params)
  params["params"]["heads"] = {"kernel": kernel}
  return params


def first_types(params, k: int) -> Any:
  """The variables of the K-type model made of the first `k` heads of `params`."""
  return _with_heads(params, params["params"]["heads"]["kernel"][..., :k])


def sweep_replicas(replicas: int, mesh: jax.sharding.Mesh, pairs: int) -> int:
  """`select_k.replicas`, with -1 resolved by `em.replicas_for` over the mesh's devices."""
  if replicas != -1:
    return replicas
  return em.replicas_for(mesh.devices.size, pairs)


def sweep(
  settings: em.EMSettings,
  model: utility.UtilityModel,
  table: types.FeatureTable,
  fit_choices: types.Choices,
  train: types.Choices,
  heldout: types.Choices,
  ks: Sequence[int],
  key: jax.Array,
  mesh: jax.sharding.Mesh,
  *,
  replicas: int = 1,
  checkpoint_dir: str | None = None,
  init_params: Any = None,
  writer=None,
  show_progress: bool = True,
  bootstrap_samples: int = metrics.NUM_SAMPLES,
) -> dict[int, KFit]:
  """The K sweep compiled once: every (K, restart) pair of the distinct `ks` fitted as one
  program by `em.fit(..., ks=...)` with `model`'s architecture and max(ks) heads (pair (K, r)
  keyed fold_in(fold_in(key, K), r), as restart r of the per-K fit with key fold_in(key, K)),
  the pairs split over `replicas` devices of a "replica" mesh axis (`em.replica_mesh`; -1: as
  many as `em.replicas_for` allows), then every fit scored by one compiled program.

  `fit_choices`: the training users as `em.fit` takes them (padded, possibly global arrays);
  `train`, `heldout`: the training and held-out users to score, on the host or as global arrays
  split over `mesh`'s "data" axis (`layout.global_choices`). Returns {K: KFit} in increasing
  K, each as `evaluate` scores a per-K fit (the best restart by training LL) plus its held-out
  users' log-likelihoods."""
  ks = sorted(set(ks))
  heads = model.clone(num_types=max(ks))
  pairs = len(ks) * settings.restarts
  sweep_mesh = em.replica_mesh(mesh, sweep_replicas(replicas, mesh, pairs))
  state = em.fit(
    settings,
    heads,
    table,
    fit_choices,
    key,
    sweep_mesh,
    checkpoint_dir=checkpoint_dir,
    show_progress=show_progress,
    init_params=init_params,
    writer=writer,
    ks=ks,
  )
  fits_on_data_mesh = parallel.put((state.params, state.log_priors), parallel.replicated(mesh))
  scores = _score_fits(*fits_on_data_mesh, heads, table, train, heldout)
  gamma, train_ll, heldout_ll, grad_norms = (parallel.host_array(x) for x in scores)
  params = parallel.on_host(state.params)
  log_priors = parallel.host_array(state.log_priors)
  converged = parallel.host_array(state.converged)
  epochs = parallel.host_array(state.epochs_used)
  train_real, train_choices = _real_user_rows(train)
  heldout_real, heldout_choices = _real_user_rows(heldout)
  fits = {}
  for i, k in enumerate(ks):
    rows = np.arange(i * settings.restarts, (i + 1) * settings.restarts)
    totals = [float(np.sum(train_ll[r][train_real], dtype=np.float64)) for r in rows]
    best = rows[int(np.argmax(totals))]
    best_params = first_types(jax.tree.map(lambda x, b=best: x[b], params), k)
    result = _k_result(
      k,
      best_params,
      log_priors[best, :k],
      totals,
      np.argmax(gamma[rows][:, train_real, :k], axis=-1),
      grad_norms[rows].tolist(),
      converged[rows],
      epochs[rows],
      int(np.sum(train_choices)),
      heldout_ll[best][heldout_real],
      heldout_choices,
      settings.collapse_mass,
      bootstrap_samples,
    )
    fitted = utility.FittedUsers(
      model=heads.clone(num_types=k), params=best_params, log_priors=log_priors[best, :k]
    )
    fits[k] = KFit(result, fitted, gamma[best][train_real, :k], heldout_ll[best][heldout_real])
  return fits


def save_heldout_loglik(path: str, fits: dict[int, KFit], user_ids: Sequence[str]) -> None:
  """Each K's per-held-out-user log-likelihoods ("k<K>": f32[U_h], nats) and "user_ids", as .npz."""
  files.save_npz(
    path,
    user_ids=np.asarray(user_ids),
    **{f"k{k}": fit.heldout_user_loglik for k, fit in fits.items()},
  )


def select(results: list[KResult], criterion: str, heldout_tolerance: float) -> int:
  """The K with the lowest BIC, or the smallest K whose held-out LL per choice is within
  `heldout_tolerance` (nats) of the best."""
  if criterion == "bic":
    return min(results, key=lambda r: r.bic).k
  if criterion == "heldout":
    best = max(r.heldout_loglik_per_choice for r in results)
    return min(r.k for r in results if r.heldout_loglik_per_choice >= best - heldout_tolerance)
  raise ValueError(f"unknown criterion {criterion!r}; expected one of {CRITERIA}")


def align_types(posteriors: np.ndarray, reference: np.ndarray) -> np.ndarray:
  """Hungarian matching of types to reference labels.

  Args:
    posteriors: f32[U, K] (soft or one-hot) assignments to align.
    reference: f32[U, K_ref] assignments of the same users.

  Returns:
    i32[K]: perm[k] = the reference label matched to type k, maximising Σ_u γ_u(k) γ_ref_u(perm[k]);
    -1 for the K - K_ref types left unmatched when K > K_ref.
  """
  overlap = posteriors.T @ reference  # [K, K_ref]
  rows, cols = optimize.linear_sum_assignment(-overlap)
  perm = np.full(posteriors.shape[1], -1, np.int64)
  perm[rows] = cols
  return perm


def permute_types(fitted: utility.FittedUsers, perm: np.ndarray) -> utility.FittedUsers:
  """Relabels types so that new type perm[k] is old type k (heads' outputs and priors); perm must be a
  permutation of range(K)."""
  if sorted(perm.tolist()) != list(range(len(perm))):
    raise ValueError(f"perm {perm.tolist()} is not a permutation of range({len(perm)})")
  inverse = np.argsort(perm)
  params = _with_heads(fitted.params, fitted.params["params"]["heads"]["kernel"][..., inverse])
  return dataclasses.replace(fitted, params=params, log_priors=fitted.log_priors[inverse])


def plot_sweep(
  results: list[KResult], selected: int, path: str, planted: int | None = None
) -> None:
  """Held-out log-likelihood per choice (with its 95% CI where the results have one), BIC and
  restart agreement against K, as a PNG; K on a log2 axis when it spans a factor of 8 or more."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  results = sorted(results, key=lambda r: r.k)
  ks = np.array([r.k for r in results])
  heldout = np.array([r.heldout_loglik_per_choice for r in results])
  ci = np.array([r.heldout_loglik_ci95 or (np.nan, np.nan) for r in results]).reshape(-1, 2)
  fig, (ax_ll, ax_bic, ax_ari) = plt.subplots(1, 3, figsize=(12, 3.6))
  ax_ll.errorbar(
    ks,
    heldout,
    yerr=np.abs(np.stack([heldout - ci[:, 0], ci[:, 1] - heldout])),
    fmt="o-",
    capsize=3,
  )
  ax_ll.set(
    ylabel="held-out log-lik per choice (nats)",
    title="95% CI: bootstrap over held-out users",
  )
  ax_bic.plot(ks, [r.bic for r in results], "o-", color="tab:orange")
  ax_bic.set(ylabel="BIC (nats, lower is better)")
  ax_ari.plot(ks, [r.restart_ari for r in results], "o-", color="tab:green")
  ax_ari.set(ylabel="mean ARI between restarts (0 to 1)")
  for ax in (ax_ll, ax_bic, ax_ari):
    ax.set(xlabel="K (number of user types)")
    if ks.max() >= 8 * ks.min():
      ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.axvline(selected, color="gray", ls="--", label=f"selected K={selected}")
    if planted is not None:
      ax.axvline(planted, color="green", ls=":", label=f"planted K*={planted}")
    ax.legend(fontsize=7)
  ax_ll.title.set_fontsize(8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
