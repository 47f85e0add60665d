"""Evaluation metrics: clustered bootstrap CIs, win rates, type posteriors, sim-vs-real scoring, plots."""

import json

import jax
import numpy as np
import pytest

from pasta_jax import types
from pasta_jax.evaluation import metrics, plots, sim_vs_real
from pasta_jax.user_model import em, posterior, utility
from tests import reference

TURNS = 5  # H of the tiny world and of the synthetic calibration data.


def _width(estimate: metrics.Estimate) -> float:
  return estimate.ci95[1] - estimate.ci95[0]


def test_ci_of_a_normal_mean_contains_it_with_the_textbook_width():
  sigma, n = 2.0, 2000
  x = np.random.default_rng(0).normal(1.0, sigma, size=n)
  estimate = metrics.mean_with_ci(x)
  assert estimate.mean == pytest.approx(x.mean())
  assert estimate.ci95[0] < 1.0 < estimate.ci95[1]
  assert _width(estimate) == pytest.approx(2 * 1.96 * sigma / np.sqrt(n), rel=0.15)


def test_ci_covers_the_true_mean_about_95_percent_of_the_time():
  rng = np.random.default_rng(1)
  covered = [
    metrics.mean_with_ci(rng.exponential(1.0, size=200), num_samples=400, seed=s).ci95
    for s in range(200)
  ]
  assert 0.9 <= np.mean([lo < 1.0 < hi for lo, hi in covered]) <= 0.99


def test_clusters_resample_users_not_rows():
  per_user = np.random.default_rng(2).normal(size=200)
  rows, users = np.repeat(per_user, 5), np.repeat(np.arange(200) * 7 + 3, 5)
  clustered = metrics.mean_with_ci(rows, clusters=users)
  by_user = metrics.mean_with_ci(per_user)
  assert clustered.mean == pytest.approx(by_user.mean)
  np.testing.assert_allclose(clustered.ci95, by_user.ci95, rtol=1e-12)
  unclustered = metrics.mean_with_ci(rows)
  assert _width(clustered) > 1.8 * _width(unclustered)  # sqrt(5) ~ 2.24 when rows are independent.


def test_per_turn_means_share_the_draws_and_skip_masked_turns():
  rng = np.random.default_rng(3)
  column = rng.normal(size=50)
  values = np.stack([column, column, np.where(np.arange(50) < 40, column, np.nan)], axis=1)
  mask = np.ones(values.shape, bool)
  mask[40:, 2] = False
  per_turn = metrics.per_turn_mean_with_ci(values, mask=mask)
  assert per_turn[0] == per_turn[1]
  assert per_turn[2].mean == pytest.approx(column[:40].mean())
  assert all(np.isfinite(per_turn[2].ci95))


def test_paired_difference_of_identical_arrays_is_exactly_zero():
  a = np.random.default_rng(4).normal(size=100)
  assert metrics.paired_difference(a, a.copy()) == metrics.Estimate(0.0, (0.0, 0.0))
  with pytest.raises(ValueError, match="same users"):
    metrics.paired_difference(a, a[:-1])


def test_win_rate_counts_ties_as_half():
  a = np.array([3.0, 1.0, 2.0, 5.0])
  b = np.array([1.0, 3.0, 2.0, 5.0 + 1e-9])
  assert metrics.win_rate(a, b).mean == 0.5
  assert metrics.win_rate(np.array([1.0, 1.0]), np.array([1.05, 0.96]), tolerance=0.1).mean == 0.5
  assert metrics.win_rate(a + 10, b) == metrics.Estimate(1.0, (1.0, 1.0))
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=300), rng.normal(size=300)
  forward, backward = metrics.win_rate(x, y), metrics.win_rate(y, x)
  assert forward.mean + backward.mean == pytest.approx(1.0)
  np.testing.assert_allclose(forward.ci95, 1.0 - np.array(backward.ci95)[::-1])


def _hand_built_beliefs():
  """log_belief f32[3 users, 3 steps, 3 types]: uniform, then leaning, then certain (one-hot)."""
  leaning = np.array([[0.7, 0.2, 0.1], [0.1, 0.7, 0.2], [0.1, 0.2, 0.7]])
  certain = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
  with np.errstate(divide="ignore"):
    return np.log(np.stack([np.full((3, 3), 1 / 3), leaning, certain], axis=1)).astype(np.float32)


def test_type_posterior_accuracy_and_entropy_per_turn():
  log_belief, true_type = _hand_built_beliefs(), np.array([0, 1, 2])
  np.testing.assert_array_equal(
    metrics.type_accuracy(log_belief, true_type), [[1, 1, 1], [0, 1, 0], [0, 1, 1]]
  )
  type_map = np.array([1, 2, -1])  # Belief type 0 is true type 1, 1 is 2, 2 is unmatched.
  np.testing.assert_array_equal(
    metrics.type_accuracy(log_belief, np.array([1, 2, 0]), type_map),
    [[1, 1, 1], [0, 1, 0], [0, 0, 0]],
  )
  leaning = -np.sum(np.array([0.7, 0.2, 0.1]) * np.log([0.7, 0.2, 0.1]))
  np.testing.assert_allclose(
    metrics.belief_entropy(log_belief), [[np.log(3), leaning, 0.0]] * 3, atol=1e-6
  )
  result = metrics.policy_metrics(np.zeros((3, 2)), log_belief, true_type)
  assert [e.mean for e in result.type_accuracy] == pytest.approx([1 / 3, 1.0, 2 / 3])
  assert [e.mean for e in result.type_entropy] == pytest.approx([np.log(3), leaning, 0.0], abs=1e-6)
  assert result.type_accuracy[1].ci95 == (1.0, 1.0) and result.final_win_rate is None


def test_policy_metrics_against_a_baseline_on_the_same_users():
  rng = np.random.default_rng(6)
  baseline = rng.normal(size=(100, TURNS))
  policy = baseline + 0.5 + 0.1 * rng.normal(size=(100, TURNS))
  log_belief = np.log(np.full((100, TURNS + 1, 2), 0.5))
  result = metrics.policy_metrics(policy, log_belief, np.zeros(100, int), baseline_utility=baseline)
  assert result.final_win_rate == metrics.win_rate(policy[:, -1], baseline[:, -1])
  assert result.final_difference.ci95[0] > 0.4 and len(result.utility) == TURNS
  json.dumps(result.to_json(), allow_nan=False)


def test_to_json_maps_undefined_estimates_and_non_finite_arrays_to_null():
  tree = {
    "estimate": metrics.Estimate(float("nan"), (np.float32("-inf"), 1.0)),
    "per_turn": np.array([0.5, np.nan, np.inf]),
    "count": np.int64(3),
  }
  converted = metrics.to_json(tree)
  assert converted == {
    "estimate": {"mean": None, "ci95": [None, 1.0]},
    "per_turn": [0.5, None, None],
    "count": 3,
  }
  json.dumps(converted, allow_nan=False)


@pytest.fixture(scope="module")
def world(config, rater_log, choices):
  """(fitted users, feature table, Choices): an untrained model on the tiny world with some turns and options
  padded (users 0..9 keep one session; some slates lose option 3 where it was not chosen)."""
  data, _ = choices
  turn_mask = np.asarray(data.turn_mask).copy()
  turn_mask[:10, TURNS:] = False
  option_mask = np.asarray(data.option_mask).copy()
  option_mask[10:20, :, 3] &= np.asarray(data.choice)[10:20] == 3
  data = data.replace(turn_mask=turn_mask, option_mask=option_mask)
  model = utility.from_config(config)
  params = model.init(jax.random.key(1), em.example_options(rater_log.table, data))
  fitted = utility.FittedUsers(
    model=model, params=params, log_priors=np.log(np.array([0.5, 0.3, 0.2], np.float32))
  )
  return fitted, rater_log.table, data


def _numpy_prequential(fitted, table, data, um):
  """Predictive option probabilities by a float64 Bayes filter over each user's turns: f64[U, T, L]."""
  utils, tau = reference.utilities(
    fitted.params,
    *reference.gather(table, data),
    activation=um.activation,
    aggregation=um.aggregation,
    use_text_features=um.use_text_features,
  )
  priors = np.exp(np.asarray(fitted.log_priors, np.float64))
  belief = np.broadcast_to(priors / priors.sum(), (data.num_users, priors.size))
  out = np.zeros(data.option_mask.shape)
  for t in range(data.choice.shape[1]):
    per_type = np.exp(reference.log_prob(utils[:, t], tau, data.option_mask[:, t]))  # [U, L, K]
    real = data.turn_mask[:, t]
    out[:, t] = np.where(real[:, None], np.einsum("ulk,uk->ul", per_type, belief), 0.0)
    chosen = per_type[np.arange(data.num_users), data.choice[:, t]]  # [U, K]
    updated = belief * chosen / np.sum(belief * chosen, axis=1, keepdims=True)
    belief = np.where(real[:, None], updated, belief)
  return out


def test_prequential_probabilities_match_a_numpy_bayes_filter(world, config):
  fitted, table, data = world
  got = sim_vs_real.prequential_probs(fitted, table, data)
  assert got.shape == data.option_mask.shape and got.dtype == np.float32
  np.testing.assert_allclose(
    got, _numpy_prequential(fitted, table, data, config.user_model), atol=1e-5
  )
  assert np.all(got[~data.option_mask] == 0.0) and np.all(got[:10, TURNS:] == 0.0)


def test_prequential_turn_zero_is_the_prior_mixture_and_later_choices_are_not_seen(world):
  fitted, table, data = world
  log_probs = np.asarray(posterior.prequential_log_probs(fitted, table, data))
  first_turn = data.replace(
    turn_mask=np.asarray(data.turn_mask) & (np.arange(data.choice.shape[1]) == 0)
  )
  _, prior_mixture = em.posteriors_and_loglik(
    fitted.params, fitted.log_priors, fitted.model, table, first_turn
  )
  np.testing.assert_allclose(
    log_probs[np.arange(data.num_users), 0, data.choice[:, 0]], prior_mixture, atol=1e-5
  )
  choice = np.asarray(data.choice).copy()
  choice[:, -1] = (choice[:, -1] + 1) % 3
  compiled = posterior.prequential_log_probs._cache_size()
  changed_last = np.asarray(
    posterior.prequential_log_probs(fitted, table, data.replace(choice=choice))
  )
  np.testing.assert_array_equal(changed_last, log_probs)
  assert posterior.prequential_log_probs._cache_size() == compiled


def test_heldout_loglik_and_report_on_the_tiny_world(world):
  fitted, table, data = world
  log_probs = np.asarray(posterior.prequential_log_probs(fitted, table, data))
  result = sim_vs_real.evaluate(log_probs, data, TURNS, num_samples=200)
  chosen = np.take_along_axis(log_probs, data.choice[..., None], axis=-1)[..., 0][data.turn_mask]
  assert result.loglik.per_choice.mean == pytest.approx(chosen.mean(), abs=1e-6)
  assert result.loglik.per_choice.ci95[0] < chosen.mean() < result.loglik.per_choice.ci95[1]
  options = data.option_mask.sum(axis=-1)[data.turn_mask]
  assert result.loglik.uniform.mean == pytest.approx(-np.log(options).mean())
  assert len(result.loglik.per_turn) == TURNS and len(result.calibration.per_turn) == TURNS
  json.dumps(result.to_json(), allow_nan=False)


def test_turn_in_session_rejects_partial_sessions(world):
  _, _, data = world
  turn_mask = np.asarray(data.turn_mask).copy()
  turn_mask[30, 7:] = False
  with pytest.raises(ValueError, match=r"users \[30\]"):
    sim_vs_real.turn_in_session(data.replace(turn_mask=turn_mask), TURNS)


def _synthetic_choices(num_users=400, sessions=2, slate=4, seed=7):
  """(probs f64[U, T, L] from a flat Dirichlet, Choices whose choices are drawn from those probs)."""
  rng = np.random.default_rng(seed)
  shape = (num_users, sessions * TURNS)
  probs = rng.dirichlet(np.ones(slate), size=shape)
  choice = np.argmax(np.cumsum(probs, axis=-1) > rng.uniform(size=shape + (1,)), axis=-1)
  zeros = np.zeros(shape + (slate,), np.int32)
  data = types.Choices(
    image_rows=zeros[..., None],
    text_rows=zeros,
    category=zeros,
    choice=choice.astype(np.int32),
    option_mask=np.ones(shape + (slate,), bool),
    turn_mask=np.ones(shape, bool),
    user_index=np.arange(num_users, dtype=np.int32),
  )
  return probs, data


def test_calibration_is_small_for_calibrated_and_large_for_overconfident_predictions():
  probs, data = _synthetic_choices()
  calibrated = sim_vs_real.calibration(probs, data, TURNS)
  assert calibrated.overall.ece.mean < 0.03 and all(r.ece.mean < 0.06 for r in calibrated.per_turn)
  assert sum(calibrated.overall.count) == probs.size
  observed = np.array([e.mean for e in calibrated.overall.observed])
  predicted, count = np.array(calibrated.overall.predicted), np.array(calibrated.overall.count)
  assert np.all(np.abs(observed - predicted) < 4 * np.sqrt(predicted * (1 - predicted) / count))
  sharp = probs**3 / np.sum(probs**3, axis=-1, keepdims=True)
  overconfident = sim_vs_real.calibration(sharp, data, TURNS)
  assert overconfident.overall.ece.ci95[0] > 0.1 and all(
    r.ece.mean > 0.1 for r in overconfident.per_turn
  )


def test_plots_write_png_files(tmp_path):
  rng = np.random.default_rng(8)
  utilities = {
    name: metrics.per_turn_mean_with_ci(rng.normal(shift, size=(50, TURNS)), num_samples=100)
    for name, shift in (("pasta", 0.5), ("generator order", 0.0))
  }
  accuracy = {
    "pasta": metrics.per_turn_mean_with_ci(rng.uniform(size=(50, TURNS + 1)) > 0.4, num_samples=100)
  }
  probs, data = _synthetic_choices(num_users=50)
  paths = [
    plots.plot_utility_per_turn(utilities, str(tmp_path / "utility.png")),
    plots.plot_type_accuracy(accuracy, str(tmp_path / "plots" / "type_accuracy.png")),
    plots.plot_reliability(
      sim_vs_real.calibration(probs, data, TURNS, num_samples=100),
      str(tmp_path / "reliability.png"),
    ),
  ]
  for path in paths:
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert sorted(p.name for p in tmp_path.rglob("*")) == [
    "plots",
    "reliability.png",
    "type_accuracy.png",
    "utility.png",
  ]
