"""Model selection over the number of user types K, restart agreement and label alignment."""

import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from scipy import optimize

from pasta_jax import types
from pasta_jax.config_checks import (
  check,
  check_real,
  is_int,
  num_training_users,
  training_users_text,
)
from pasta_jax.user_model import em, utility

CRITERIA = ("bic", "heldout")
AT_BEST = 1e-4  # Restarts whose training LL is within this relative distance of the best agree.


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
  collapsed_types: list[int]  # Types of the best restart below the collapse threshold.
  restart_converged: list[bool]  # Each restart met EM's stopping rule (em.converged).
  restart_epochs: list[int]  # Epochs that updated each restart.
  restart_grad_norm: list[float]  # |∇ training LL per choice| w.r.t. the params, at the end.
  restart_loglik_spread: float  # Best minus worst restart's training LL per choice (nats).
  restarts_at_best: int  # Restarts within AT_BEST (relative) of the best training LL.

  def row(self) -> dict:
    return {
      "k": self.k,
      "heldout_loglik_per_choice": self.heldout_loglik_per_choice,
      "bic": self.bic,
      "train_loglik_per_choice": self.train_loglik_per_choice,
      "num_params": self.num_params,
      "restart_ari": self.restart_ari,
      "collapsed_types": self.collapsed_types,
      "restart_converged": self.restart_converged,
      "restart_epochs": self.restart_epochs,
      "restart_grad_norm": self.restart_grad_norm,
      "restart_loglik_spread": self.restart_loglik_spread,
      "restarts_at_best": self.restarts_at_best,
    }

  def warning(self) -> str | None:
    """A message when no restart of this K converged, else None."""
    if any(self.restart_converged):
      return None
    return (
      f"K={self.k}: no EM restart converged within {max(self.restart_epochs)} epochs (final "
      f"gradient norms {np.round(self.restart_grad_norm, 6).tolist()}); raise em.epochs"
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


def evaluate(
  state: em.EMState,
  model: utility.UtilityModel,
  table: types.FeatureTable,
  train: types.Choices,
  heldout: types.Choices,
  collapse_mass: float,
) -> tuple[KResult, utility.FittedUsers, np.ndarray]:
  """Scores every restart of a restart-batched EM state; returns the best (by training LL) and its γ."""
  restarts = state.log_priors.shape[0]
  train_ll, assignments, posteriors, grad_norms = [], [], [], []
  for r in range(restarts):
    one = em.unbatch(state, r)
    gamma, ll = em.posteriors_and_loglik(one.params, one.log_priors, model, table, train)
    train_ll.append(float(jnp.sum(ll)))
    posteriors.append(np.asarray(gamma))
    assignments.append(np.argmax(np.asarray(gamma), axis=-1))
    grad_norms.append(float(em.gradient_norm(one.params, one.log_priors, model, table, train)))
  best = int(np.argmax(train_ll))
  one = em.unbatch(state, best)
  _, heldout_ll = em.posteriors_and_loglik(one.params, one.log_priors, model, table, heldout)
  train_choices = int(np.sum(train.turn_mask))
  p = num_free_parameters(one.params, model.num_types)
  priors = np.exp(np.asarray(one.log_priors))
  result = KResult(
    k=model.num_types,
    num_params=p,
    train_loglik=train_ll[best],
    train_loglik_per_choice=train_ll[best] / train_choices,
    heldout_loglik_per_choice=float(jnp.sum(heldout_ll)) / int(np.sum(heldout.turn_mask)),
    bic=bic(train_ll[best], p, train_choices),
    restart_ari=mean_pairwise_ari(np.stack(assignments)),
    best_restart=best,
    restart_train_loglik=train_ll,
    collapsed_types=[t for _, t in em.collapsed_types(priors[None], collapse_mass)],
    restart_converged=np.asarray(state.converged).tolist(),
    restart_epochs=np.asarray(state.epochs_used).tolist(),
    restart_grad_norm=grad_norms,
    restart_loglik_spread=(max(train_ll) - min(train_ll)) / train_choices,
    restarts_at_best=int(
      np.sum(np.asarray(train_ll) >= train_ll[best] - AT_BEST * abs(train_ll[best]))
    ),
  )
  fitted = utility.FittedUsers(
    model=model, params=jax.device_get(one.params), log_priors=np.asarray(one.log_priors)
  )
  return result, fitted, posteriors[best]


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
  heads = fitted.params["params"]["heads"]
  params = jax.tree.map(lambda x: x, fitted.params)
  params["params"]["heads"] = {"kernel": heads["kernel"][..., inverse]}
  return dataclasses.replace(fitted, params=params, log_priors=fitted.log_priors[inverse])


def plot_sweep(
  results: list[KResult], selected: int, path: str, planted: int | None = None
) -> None:
  """Held-out LL per choice and BIC against K, as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  ks = [r.k for r in results]
  fig, (ax_ll, ax_bic) = plt.subplots(1, 2, figsize=(9, 3.5))
  ax_ll.plot(ks, [r.heldout_loglik_per_choice for r in results], "o-")
  ax_ll.set(xlabel="K (user types)", ylabel="held-out log-lik / choice")
  ax_bic.plot(ks, [r.bic for r in results], "o-", color="tab:orange")
  ax_bic.set(xlabel="K (user types)", ylabel="BIC")
  for ax in (ax_ll, ax_bic):
    ax.axvline(selected, color="gray", ls="--", label=f"selected K={selected}")
    if planted is not None:
      ax.axvline(planted, color="green", ls=":", label=f"planted K*={planted}")
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)
  plt.close(fig)
