"""Sim vs real: how well the fitted user model (the simulator's responders) predicts held-out real choices.

Prequential (online) scoring: a held-out user's type belief starts at the fitted priors and is updated by
Bayes after each of their choices, in time order over all their sessions (`posterior.filter_beliefs`); the
choice at turn t is scored by the predictive distribution Σ_k b_{t-1}(k) P(i | slate_t, k), formed before
it is seen. Reported: per-choice log-likelihood (all turns, and per turn within a session) and, per turn
within a session, the calibration of the predicted probabilities of every shown option; each number with a
user-clustered bootstrap 95% CI (`metrics`).

`types.Choices` has no turn-within-session field: callers with the records pass it (`session_turn`,
`schema.session_turns`), so sessions may be shorter than H; without it the turn within a session is t mod H,
valid only when every session has exactly H turns (`turn_in_session` checks).
"""

import dataclasses

import numpy as np

from pasta_jax import types
from pasta_jax.evaluation import metrics
from pasta_jax.user_model import posterior, utility


def prequential_probs(
  fitted: utility.FittedUsers,
  table: types.FeatureTable,
  choices: types.Choices,
  batch_users: int = 64,
) -> np.ndarray:
  """Predictive probability of every option: f32[R, T, L] on the host (0 on padded options and turns)."""
  return np.exp(np.asarray(posterior.prequential_log_probs(fitted, table, choices, batch_users)))


def turn_in_session(choices: types.Choices, turns_per_session: int) -> np.ndarray:
  """Turn within its session of every turn slot, t mod H: i64[R, T].

  Raises ValueError unless each user's real turns come first and number a multiple of H.
  """
  turn_mask = np.asarray(choices.turn_mask, bool)
  num_turns = turn_mask.sum(axis=1)
  prefix = turn_mask == (np.arange(turn_mask.shape[1]) < num_turns[:, None])
  bad = np.flatnonzero((num_turns % turns_per_session != 0) | ~prefix.all(axis=1))
  if bad.size:
    raise ValueError(
      f"turn_in_session: users {bad[:5].tolist()} (of {bad.size}) have real turns that are not "
      f"whole sessions of H={turns_per_session} in order (real turns {num_turns[bad[:5]].tolist()})"
    )
  return np.broadcast_to(np.arange(turn_mask.shape[1]) % turns_per_session, turn_mask.shape)


def _session_turn(
  choices: types.Choices, turns_per_session: int, session_turn: np.ndarray | None
) -> np.ndarray:
  """i[R, T] turn within its session: `session_turn` when given (checked to lie in [0, H)), else t mod H
  (which counts within a row: valid when every row holds whole sessions)."""
  if session_turn is None:
    return turn_in_session(choices, turns_per_session)
  session_turn = np.asarray(session_turn)
  real = _real_turns(choices)
  if session_turn.shape != real.shape or np.any(
    (session_turn[real] < 0) | (session_turn[real] >= turns_per_session)
  ):
    raise ValueError(
      f"session_turn: expected i[R, T] = {real.shape} with real turns in [0, {turns_per_session}); "
      f"got shape {session_turn.shape}"
    )
  return session_turn


def _real_turns(choices: types.Choices) -> np.ndarray:
  """bool[R, T]: real turns of real users' rows."""
  return np.asarray(choices.turn_mask, bool) & np.asarray(choices.user_mask, bool)[:, None]


@dataclasses.dataclass(frozen=True)
class LogLikelihood:
  """Prequential log-likelihood per choice (nats): over all real choices, and per turn within a session [H];
  `uniform` is the same average for a uniformly random choice among the shown options."""

  per_choice: metrics.Estimate
  per_turn: list[metrics.Estimate]
  uniform: metrics.Estimate


def heldout_loglik(
  log_probs: np.ndarray,
  choices: types.Choices,
  turns_per_session: int,
  num_samples: int = metrics.NUM_SAMPLES,
  seed: int = 0,
  session_turn: np.ndarray | None = None,
) -> LogLikelihood:
  """Per-choice log-likelihood of the real choices under log_probs f[R, T, L], clustered by user (a
  user's rows, `types.Choices`, are one cluster); per turn within a session by `session_turn`
  i[R, T] (default t mod H)."""
  log_probs = np.asarray(log_probs, np.float64)
  real = _real_turns(choices)
  chosen = np.take_along_axis(log_probs, np.asarray(choices.choice)[..., None], axis=-1)[..., 0]
  uniform = -np.log(np.maximum(np.asarray(choices.option_mask).sum(axis=-1), 1))
  users = np.broadcast_to(np.asarray(choices.user_index)[:, None], real.shape)[real]
  turn = _session_turn(choices, turns_per_session, session_turn)[real]
  return LogLikelihood(
    per_choice=metrics.mean_with_ci(chosen[real], users, num_samples, seed),
    per_turn=metrics.grouped_mean_with_ci(
      chosen[real], turn, turns_per_session, users, num_samples, seed
    ),
    uniform=metrics.mean_with_ci(uniform[real], users, num_samples, seed),
  )


@dataclasses.dataclass(frozen=True)
class Reliability:
  """Calibration of one group of shown options (one turn within a session, or all turns).

  count: i[B] options per probability bin; predicted: f[B] their mean predicted probability (NaN if empty);
  observed: [B] the fraction of them chosen; ece: Σ_b (count_b / Σ count) |observed_b - predicted_b|.
  """

  count: list[int]
  predicted: list[float]
  observed: list[metrics.Estimate]
  ece: metrics.Estimate


@dataclasses.dataclass(frozen=True)
class Calibration:
  """bin_edges: f[B + 1] equal-width probability bins on [0, 1]; per_turn: [H] turn within a session;
  overall: every turn."""

  bin_edges: list[float]
  per_turn: list[Reliability]
  overall: Reliability


def _ece(gap: np.ndarray, count: np.ndarray) -> np.ndarray:
  """Σ_b |Σ (chosen - predicted)|_b / Σ_b count_b: gap, count f[S, G, B] -> f[S, G]."""
  return np.abs(gap).sum(axis=-1) / count.sum(axis=-1)


def calibration(
  probs: np.ndarray,
  choices: types.Choices,
  turns_per_session: int,
  num_bins: int = 10,
  num_samples: int = metrics.NUM_SAMPLES,
  seed: int = 0,
  session_turn: np.ndarray | None = None,
) -> Calibration:
  """Reliability of predicted option probabilities probs f[U, T, L] against the real choices, per turn within
  a session and overall; CIs resample users (one set of draws for every number)."""
  real = _real_turns(choices)
  shown = np.asarray(choices.option_mask, bool) & real[..., None]
  probs = np.asarray(probs, np.float64)[shown]
  chosen = (np.arange(shown.shape[-1]) == np.asarray(choices.choice)[..., None])[shown].astype(
    np.float64
  )
  users = np.broadcast_to(np.asarray(choices.user_index)[:, None, None], shown.shape)[shown]
  turn = np.broadcast_to(
    _session_turn(choices, turns_per_session, session_turn)[..., None], shown.shape
  )[shown]
  groups = turn * num_bins + np.minimum((probs * num_bins).astype(np.int64), num_bins - 1)

  def sums(values: np.ndarray) -> np.ndarray:
    """f[C, H + 1, B]: per user, turn within a session (then all turns), bin."""
    per_turn = metrics.group_sums(values, groups, turns_per_session * num_bins, users)
    per_turn = per_turn.reshape(-1, turns_per_session, num_bins)
    return np.concatenate([per_turn, per_turn.sum(axis=1, keepdims=True)], axis=1)

  count, predicted, observed = sums(np.ones_like(probs)), sums(probs), sums(chosen)
  frequency = metrics.bootstrap(np.divide, [observed, count], num_samples, seed)
  ece = metrics.estimates(
    *metrics.bootstrap(_ece, [observed - predicted, count], num_samples, seed)
  )
  total = count.sum(axis=0)
  with np.errstate(invalid="ignore"):
    mean_predicted = predicted.sum(axis=0) / total
  reliability = [
    Reliability(
      count=total[g].astype(int).tolist(),
      predicted=mean_predicted[g].tolist(),
      observed=metrics.estimates(*(x[g] for x in frequency)),
      ece=ece[g],
    )
    for g in range(turns_per_session + 1)
  ]
  return Calibration(
    bin_edges=np.linspace(0.0, 1.0, num_bins + 1).tolist(),
    per_turn=reliability[:-1],
    overall=reliability[-1],
  )


@dataclasses.dataclass(frozen=True)
class SimVsReal:
  loglik: LogLikelihood
  calibration: Calibration

  def to_json(self) -> dict:
    return metrics.to_json(self)


def evaluate(
  log_probs: np.ndarray,
  choices: types.Choices,
  turns_per_session: int,
  num_bins: int = 10,
  num_samples: int = metrics.NUM_SAMPLES,
  seed: int = 0,
  session_turn: np.ndarray | None = None,
) -> SimVsReal:
  """Prequential log-likelihood and calibration of held-out real users' choices from the fitted
  model's prequential log-probabilities f32[R, T, L] of `choices` (`posterior.prequential_log_probs`);
  `session_turn` i[R, T] as in `heldout_loglik`."""
  return SimVsReal(
    loglik=heldout_loglik(log_probs, choices, turns_per_session, num_samples, seed, session_turn),
    calibration=calibration(
      np.exp(log_probs), choices, turns_per_session, num_bins, num_samples, seed, session_turn
    ),
  )
