"""Long histories: a user whose history is longer than a row fills several consecutive rows
(`schema.to_choices(turns_per_row=...)`), and every user-level quantity is the same as in the
one-row-per-user layout: EM's posteriors, likelihoods and epochs, the online posterior, the
prequential predictive and its clustered CIs. Mini-batch EM on split users (the row table of
incremental EM) reaches the exact fit."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as sk_metrics

from pasta_jax import parallel, types
from pasta_jax.data import schema
from pasta_jax.evaluation import inspect, sim_vs_real
from pasta_jax.user_model import em, posterior, select_k, utility
from tests import test_user_model as user_model_tests

MERGED = 6  # Users of one planted type whose histories become one heavy rater's.


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


@pytest.fixture(scope="module")
def heavy(config, rater_log):
  """(records in which MERGED users of planted type 0 are one rater "heavy" with MERGED times the
  history, the record spec, every user's history length n)."""
  of_type = sorted(
    {r.user_id for r in rater_log.records if r.user_type == 0},
    key=lambda u: int(u.removeprefix("user")),
  )[:MERGED]
  records = [
    dataclasses.replace(r, user_id="heavy") if r.user_id in of_type else r
    for r in rater_log.records
  ]
  lengths = schema.history_lengths(rater_log.records, [rater_log.records[0].user_id])
  return records, schema.RecordSpec.from_config(config), int(lengths[0])


@pytest.fixture(scope="module")
def layouts(heavy):
  """(unsplit, split) `types.Choices` of the same users, and their `UserIndex`: one row per user
  with T = the heavy history, and rows of one ordinary history each."""
  records, spec, n = heavy
  ids = list(dict.fromkeys(r.user_id for r in records))
  unsplit, users = schema.to_choices(records, spec, ids)
  split, split_users = schema.to_choices(records, spec, ids, turns_per_row=n)
  assert split_users.ids == users.ids
  return unsplit, split, users


def test_a_long_history_fills_consecutive_rows_and_costs_memory_in_proportion(heavy, layouts):
  records, _, n = heavy
  unsplit, split, users = layouts
  heavy_user = users.ids.index("heavy")
  assert unsplit.choice.shape == (len(users.ids), MERGED * n)
  assert split.choice.shape == (len(users.ids) + MERGED - 1, n)
  assert split.image_rows.size * (MERGED - 1) < unsplit.image_rows.size
  rows = np.flatnonzero(split.user_index == heavy_user)
  np.testing.assert_array_equal(rows, rows[0] + np.arange(MERGED))
  for field in ("image_rows", "text_rows", "category", "choice", "option_mask", "turn_mask"):
    np.testing.assert_array_equal(
      getattr(split, field)[rows].reshape((MERGED * n,) + getattr(split, field).shape[2:]),
      getattr(unsplit, field)[heavy_user],
      err_msg=field,
    )
  assert schema.user_slots(split).sum() == len(users.ids)
  np.testing.assert_array_equal(
    schema.per_user_sum(split.turn_mask.sum(axis=1), split), unsplit.turn_mask.sum(axis=1)
  )
  turns = schema.session_turns(records, users.ids, n)
  assert turns.shape == split.choice.shape
  np.testing.assert_array_equal(
    turns[rows].reshape(-1), schema.session_turns(records, users.ids, MERGED * n)[heavy_user]
  )


@pytest.mark.parametrize(
  "lengths, turns_per_row, expected",
  [([20] * 96 + [500] * 4, 0, 20), ([20] * 94 + [500] * 6, 0, 500), ([3, 9], 4, 4), ([], 0, 1)],
)
def test_row_length_fits_nineteen_users_in_twenty_in_one_row(lengths, turns_per_row, expected):
  assert schema.row_length(np.asarray(lengths), turns_per_row) == expected


def test_earlier_rows_sums_each_users_earlier_rows():
  rng = np.random.default_rng(0)
  user_index = np.repeat(np.arange(7), [1, 3, 2, 1, 4, 1, 2])
  values = rng.normal(size=(user_index.size, 3)).astype(np.float32)
  starts = np.concatenate([[True], user_index[1:] != user_index[:-1]])
  expected = np.zeros_like(values)
  for r in range(1, user_index.size):
    if user_index[r] == user_index[r - 1]:
      expected[r] = expected[r - 1] + values[r - 1]
  np.testing.assert_allclose(
    np.asarray(posterior.earlier_rows(jnp.asarray(values), jnp.asarray(starts))),
    expected,
    atol=1e-6,
  )


def _fitted(config, rater_log, layouts):
  unsplit, _, _ = layouts
  model = user_model_tests._model(config)
  params = user_model_tests._init_params(model, rater_log.table, unsplit)
  log_priors = jnp.log(jnp.asarray([0.5, 0.3, 0.2])[: model.num_types])
  return model, params, log_priors - jax.nn.logsumexp(log_priors)


def test_em_quantities_are_the_same_in_either_layout(config, rater_log, layouts):
  unsplit, split, _ = layouts
  model, params, log_priors = _fitted(config, rater_log, layouts)
  table = rater_log.table
  gamma_u, ll_u = em.posteriors_and_loglik(params, log_priors, model, table, unsplit)
  gamma_s, ll_s = em.posteriors_and_loglik(params, log_priors, model, table, split)
  slots = schema.user_slots(split)
  np.testing.assert_allclose(np.asarray(gamma_s)[slots], gamma_u, atol=1e-5)
  np.testing.assert_allclose(np.asarray(ll_s)[slots], ll_u, rtol=1e-5)
  for fn in (em.loglik_per_choice, em.gradient_norm):
    np.testing.assert_allclose(
      fn(params, log_priors, model, table, split),
      fn(params, log_priors, model, table, unsplit),
      rtol=1e-5,
    )


def test_exact_em_fits_the_same_model_in_either_layout(config, rater_log, layouts, mesh):
  unsplit, split, _ = layouts
  settings = user_model_tests._settings(config, mode="exact", epochs=4, m_steps=4, restarts=1)
  model = user_model_tests._model(config)
  states = [
    em.fit(settings, model, rater_log.table, c, jax.random.key(5), mesh, show_progress=False)
    for c in (unsplit, split)
  ]
  assert all(s.row_loglik is None for s in states)
  np.testing.assert_allclose(states[1].loglik_history, states[0].loglik_history, rtol=1e-5)
  np.testing.assert_allclose(states[1].log_priors, states[0].log_priors, atol=1e-4)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4),
    utility.trainable(states[1].params),
    utility.trainable(states[0].params),
  )


def test_the_compiled_once_sweep_scores_the_same_in_either_layout(config, rater_log, layouts, mesh):
  """`select_k.sweep` (exact EM) on the split layout: the same training LL per choice, BIC, held-out
  scores and posteriors as on the one-row layout (its choice count sums every row of a user)."""
  unsplit, split, users = layouts
  settings = user_model_tests._settings(config, mode="exact", epochs=3, m_steps=4, restarts=1)
  model = user_model_tests._model(config)
  fits = [
    select_k.sweep(
      settings,
      model,
      rater_log.table,
      c,
      c,
      c,
      (1, 2),
      jax.random.key(6),
      mesh,
      show_progress=False,
      bootstrap_samples=50,
    )
    for c in (unsplit, split)
  ]
  for k in (1, 2):
    one_row, rows = fits[0][k], fits[1][k]
    for field in ("train_loglik_per_choice", "heldout_loglik_per_choice", "bic"):
      np.testing.assert_allclose(
        getattr(rows.result, field), getattr(one_row.result, field), rtol=1e-5, err_msg=field
      )
    np.testing.assert_allclose(rows.posteriors, one_row.posteriors, atol=1e-4)
    assert rows.posteriors.shape == (len(users.ids), k)


def test_the_prior_step_weighs_each_user_once():
  gamma = np.asarray([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], np.float32)
  choices = types.Choices(
    image_rows=np.zeros((5, 1, 2, 1), np.int32),
    text_rows=np.zeros((5, 1, 2), np.int32),
    category=np.zeros((5, 1, 2), np.int32),
    choice=np.zeros((5, 1), np.int32),
    option_mask=np.ones((5, 1, 2), bool),
    turn_mask=np.ones((5, 1), bool),
    user_index=np.asarray([0, 0, 0, 1, -1], np.int32),
  )
  np.testing.assert_allclose(
    em._mean_posterior(jnp.asarray(gamma), em._row_shares(choices)), [0.5, 0.5], atol=1e-7
  )


def test_minibatch_em_on_split_users_reaches_the_exact_fit(config, rater_log, layouts, mesh):
  """Mini-batch EM on the split layout (the heavy rater's rows meet in few batches, so its E-step
  reads the row table) ends within 0.02 nats per choice of exact EM on the one-row layout, and
  finds the planted types (the tolerance of test_user_model's mini-batch fixed-point test)."""
  unsplit, split, users = layouts
  model = user_model_tests._model(config, hidden=(), use_text_features=False)
  exact_gamma, exact_ll, _, _ = user_model_tests._best_fit(
    user_model_tests._settings(config, mode="exact", epochs=40, m_steps=10),
    model,
    rater_log.table,
    unsplit,
    mesh,
    jax.random.key(3),
  )
  settings = user_model_tests._settings(
    config, mode="minibatch", epochs=30, m_steps=4, learning_rate=0.1
  )
  state = em.fit(
    settings, model, rater_log.table, split, jax.random.key(4), mesh, show_progress=False
  )
  assert state.row_loglik is not None and state.row_loglik.shape[1] >= split.num_users
  result, _, gamma = select_k.evaluate(state, model, rater_log.table, split, split, 0.0, 10)
  assert abs(result.train_loglik_per_choice - exact_ll) < 0.02, (result, exact_ll)
  assert sk_metrics.adjusted_rand_score(exact_gamma.argmax(-1), gamma.argmax(-1)) > 0.9
  assert gamma.shape == (len(users.ids), model.num_types)


def _reassembled(split_values: np.ndarray, split: types.Choices, num_users: int) -> list:
  """Each user's per-turn values f[T, ...] of the split layout, its rows concatenated."""
  index = np.asarray(split.user_index)
  return [np.concatenate(list(split_values[index == u])) for u in range(num_users)]


def test_the_online_posterior_and_the_predictive_carry_over_rows(config, rater_log, layouts):
  unsplit, split, users = layouts
  model, params, log_priors = _fitted(config, rater_log, layouts)
  fitted = utility.FittedUsers(model=model, params=params, log_priors=log_priors)
  table = rater_log.table
  preq_u = np.asarray(posterior.prequential_log_probs(fitted, table, unsplit))
  preq_s = np.asarray(posterior.prequential_log_probs(fitted, table, split))
  beliefs_u = np.asarray(posterior.user_beliefs(fitted, table, unsplit))
  beliefs_s = np.asarray(posterior.user_beliefs(fitted, table, split))
  for u, (preq, before) in enumerate(
    zip(
      _reassembled(preq_s, split, len(users.ids)),
      _reassembled(beliefs_s[:, :-1], split, len(users.ids)),
    )
  ):
    turns = preq.shape[0]
    np.testing.assert_allclose(preq, preq_u[u, :turns], atol=1e-5)
    np.testing.assert_allclose(before, beliefs_u[u, :turns], atol=1e-5)
  heavy_user = users.ids.index("heavy")
  last = np.flatnonzero(np.asarray(split.user_index) == heavy_user)[-1]
  np.testing.assert_allclose(beliefs_s[last, -1], beliefs_u[heavy_user, -1], atol=1e-5)


def _numbers(tree) -> np.ndarray:
  """The numbers of a JSON-ready tree, in order (None, for NaN, as NaN)."""
  return np.asarray(
    [np.nan if x is None else x for x in jax.tree.leaves(tree, is_leaf=lambda x: x is None)], float
  )


def test_sim_vs_real_and_the_entropy_curve_cluster_a_users_rows(config, rater_log, heavy, layouts):
  records, _, n = heavy
  unsplit, split, users = layouts
  model, params, log_priors = _fitted(config, rater_log, layouts)
  fitted = utility.FittedUsers(model=model, params=params, log_priors=log_priors)
  checks = [
    sim_vs_real.evaluate(
      np.asarray(posterior.prequential_log_probs(fitted, rater_log.table, choices)),
      choices,
      config.interaction.turns,
      num_samples=200,
      session_turn=schema.session_turns(records, users.ids, turns),
    ).to_json()
    for choices, turns in ((unsplit, MERGED * n), (split, n))
  ]
  np.testing.assert_allclose(_numbers(checks[1]), _numbers(checks[0]), rtol=1e-5)
  curves = [
    [
      e.to_json()
      for e in inspect.entropy_by_choices_observed(
        posterior.user_beliefs(fitted, rater_log.table, choices), choices, 200, 0
      )
    ]
    for choices in (unsplit, split)
  ]
  assert len(curves[1]) == len(curves[0]) == MERGED * n + 1
  np.testing.assert_allclose(_numbers(curves[1]), _numbers(curves[0]), rtol=1e-5)
