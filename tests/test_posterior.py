"""The online type posterior against a NumPy Bayes filter."""

import numpy as np

from pasta_jax.user_model import posterior


def _numpy_filter(log_priors, utilities, tau, option_mask, chosen, turn_mask):
  belief = np.exp(log_priors - np.logaddexp.reduce(log_priors))
  out = [belief]
  for u, m, c, real in zip(utilities, option_mask, chosen, turn_mask):
    if real:
      p = np.exp(tau * u) * m[:, None]
      p /= p.sum(axis=0, keepdims=True)
      belief = belief * p[c]
      belief /= belief.sum()
    out.append(belief)
  return np.log(np.stack(out))


def test_filter_matches_numpy_bayes():
  rng = np.random.default_rng(0)
  turns, slate, num_types = 6, 4, 3
  utilities = rng.normal(size=(turns, slate, num_types))
  option_mask = np.ones((turns, slate), bool)
  option_mask[2, 3] = False
  chosen = rng.integers(0, 3, size=turns)
  turn_mask = np.array([1, 1, 1, 1, 0, 0], bool)
  log_priors = np.log(np.array([0.2, 0.5, 0.3]))
  got = posterior.filter_beliefs(
    log_priors, utilities.astype(np.float32), 1.7, option_mask, chosen, turn_mask
  )
  want = _numpy_filter(log_priors, utilities, 1.7, option_mask, chosen, turn_mask)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_predictive_is_the_belief_mixture_of_choice_probabilities():
  rng = np.random.default_rng(1)
  utilities = rng.normal(size=(4, 3)).astype(np.float32)
  log_belief = np.log(np.array([0.6, 0.1, 0.3], np.float32))
  mask = np.array([True, True, True, False])
  got = np.exp(np.asarray(posterior.predictive_log_prob(log_belief, utilities, 2.0, mask)))
  per_type = np.exp(2.0 * utilities) * mask[:, None]
  per_type /= per_type.sum(axis=0)
  np.testing.assert_allclose(got, per_type @ np.exp(log_belief), atol=1e-6)
  assert got[3] == 0.0 and abs(got.sum() - 1) < 1e-6


def test_a_choice_only_one_type_would_make_moves_the_belief_to_it():
  utilities = np.array(
    [[10.0, -10.0], [-10.0, 10.0]], np.float32
  )  # Type 0 picks option 0, type 1 option 1.
  log_belief = posterior.initial(np.zeros(2, np.float32))
  after = posterior.update(log_belief, utilities, 1.0, np.ones(2, bool), np.int32(1))
  np.testing.assert_allclose(np.exp(np.asarray(after)), [0.0, 1.0], atol=1e-6)
  assert np.all(np.isfinite(np.asarray(after)))
