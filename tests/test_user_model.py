"""The user model and EM against a NumPy float64 reference, sampling, EM's guarantees, K selection."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics

from pasta_jax import parallel, types
from pasta_jax.data import schema, synthetic
from pasta_jax.user_model import choice, em, select_k, utility
from tests import reference
from tests import test_em_convergence as convergence_panel

# Exact EM on the tiny world: the one-step and monotonicity tests share one compilation.
EXACT = dict(mode="exact", epochs=10, m_steps=4)


def _config(config, em_changes=None, user_model_changes=None):
  c = config.copy_and_resolve_references()
  c.em.update(em_changes or {})
  c.user_model.update(user_model_changes or {})
  return c


def _settings(config, **em_changes):
  return em.EMSettings.from_config(_config(config, em_changes).em)


def _model(config, **user_model_changes):
  return utility.from_config(_config(config, user_model_changes=user_model_changes))


def _model_kwargs(model):
  return dict(
    activation=model.activation,
    aggregation=model.aggregation,
    use_text_features=model.use_text_features,
  )


def _init_params(model, table, choices, seed=0, log_tau=0.4):
  """Random params of `model` with a non-trivial inverse temperature exp(log_tau)."""
  example = jax.tree.map(lambda x: x[0, 0], types.gather_options(table, choices))
  params = jax.device_get(model.init(jax.random.key(seed), example))
  params["params"]["log_inverse_temperature"] = np.float32(log_tau)
  return params


def _masked_choices(choices):
  """A copy with padding: option L-1 is masked out on even users' turns that did not choose it, and
  user 1's last three turns are padded turns."""
  c = jax.tree.map(np.array, choices)
  last = c.option_mask.shape[-1] - 1
  drop = (c.choice != last) & (np.arange(c.num_users)[:, None] % 2 == 0)
  c.option_mask[..., last] &= ~drop
  c.turn_mask[1, -3:] = False
  assert (~c.option_mask).any() and np.take_along_axis(c.option_mask, c.choice[..., None], -1).all()
  return c


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


# --- Forward pass, choice model and per-user log-likelihood against NumPy --------------------------

MODEL_VARIANTS = [
  dict(aggregation="mean", activation="gelu", use_text_features=True, hidden=(8,)),
  dict(aggregation="max", activation="relu", use_text_features=False, hidden=(8,)),
  dict(aggregation="logsumexp", activation="tanh", use_text_features=True, hidden=(8, 6)),
  dict(aggregation="logsumexp", activation="linear", use_text_features=False, hidden=()),
]


@pytest.mark.parametrize(
  "variant", MODEL_VARIANTS, ids=lambda v: f"{v['aggregation']}-{v['activation']}"
)
def test_log_probs_and_user_loglik_match_numpy(config, rater_log, choices, variant):
  model = _model(config, **variant)
  table, ch = rater_log.table, _masked_choices(choices[0])
  params = _init_params(model, table, ch)
  image, text = reference.gather(table, ch)
  ref_utils, ref_tau = reference.utilities(params, image, text, **_model_kwargs(model))
  ref_log_prob = reference.log_prob(ref_utils, ref_tau, ch.option_mask)
  ref_loglik = reference.trajectory_loglik(
    ref_utils, ref_tau, ch.option_mask, ch.choice, ch.turn_mask
  )
  with jax.default_matmul_precision("highest"):
    utils, tau = model.apply(params, types.gather_options(table, ch))
    log_prob = choice.log_prob(utils, tau, ch.option_mask)
    loglik = choice.trajectory_loglik(utils, tau, ch)
    user_loglik = em.user_loglik(params, model, table, ch)
  np.testing.assert_allclose(tau, np.exp(0.4), rtol=1e-6)
  np.testing.assert_allclose(utils, ref_utils, rtol=1e-5, atol=1e-5)
  assert np.all(np.isneginf(log_prob) == ~ch.option_mask[..., None])
  np.testing.assert_allclose(log_prob, ref_log_prob, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(loglik, ref_loglik, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(user_loglik, ref_loglik, rtol=1e-5, atol=1e-5)


def test_gelu_reference_is_the_tanh_approximation():
  x = np.linspace(-4.0, 4.0, 81)
  np.testing.assert_allclose(reference.gelu(x), jax.nn.gelu(x, approximate=True), atol=1e-6)
  assert np.max(np.abs(reference.gelu(x) - jax.nn.gelu(x, approximate=False))) > 1e-4


# --- One exact EM step against NumPy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def padded_choices(choices):
  """The tiny world's 64 users plus 16 padded users (80: a multiple of the 8 devices, so `em.fit` keeps it)."""
  ch = schema.pad_users(choices[0], 40)
  assert ch.num_users == 80 and int(np.sum(ch.user_mask)) == 64
  return ch


@pytest.fixture(scope="module")
def exact_step(config, rater_log, padded_choices, mesh):
  """One exact EM epoch (`em.exact_epoch`, vmapped over 2 restarts by `em.run_epoch` as in `em.fit`)
  from τ = exp(0.4) and priors (0.5, 0.3, 0.2), next to the NumPy E-step at the same params."""
  settings, model = _settings(config, **EXACT), _model(config)
  table, ch = em.place(rater_log.table, padded_choices, settings, mesh)
  example = jax.tree.map(lambda x: x[0, 0], types.gather_options(rater_log.table, padded_choices))
  state = em.init_state(jax.random.key(1), model, settings, example, ch.num_users)
  params = jax.device_get(state.params)
  params["params"]["log_inverse_temperature"] = np.full((settings.restarts,), 0.4, np.float32)
  log_priors = np.log(np.array([0.5, 0.3, 0.2], np.float32))
  state = jax.device_put(
    state.replace(params=params, log_priors=np.tile(log_priors, (settings.restarts, 1))),
    parallel.replicated(mesh),
  )
  new, metrics = jax.device_get(em.run_epoch(state, table, ch, model, settings, mesh))
  params = [jax.tree.map(lambda x, r=r: x[r], params) for r in range(settings.restarts)]
  loglik = [
    reference.user_loglik(p, rater_log.table, padded_choices, **_model_kwargs(model))
    for p in params
  ]
  gamma = [reference.posteriors(log_priors, ll, padded_choices.user_mask) for ll in loglik]
  return dict(
    settings=settings,
    model=model,
    table=rater_log.table,
    choices=padded_choices,
    params=params,
    log_priors=log_priors,
    loglik=loglik,
    gamma=gamma,
    new=new,
    metrics=metrics,
  )


def test_exact_epoch_prior_update_is_the_mean_posterior_of_real_users(exact_step):
  s = exact_step
  mask = s["choices"].user_mask
  for r, gamma in enumerate(s["gamma"]):
    expected = reference.prior_update(gamma, mask, s["settings"].prior_floor)
    np.testing.assert_allclose(s["new"].log_priors[r], expected, atol=1e-5)
    # Counting the 16 padded users (whose posterior is the prior) would move π visibly.
    wrong = reference.prior_update(
      gamma + np.exp(s["log_priors"]) * ~mask[:, None],
      np.ones_like(mask),
      s["settings"].prior_floor,
    )
    assert np.max(np.abs(wrong - expected)) > 1e-2


def test_exact_epoch_records_the_marginal_loglik_per_choice_at_its_end(exact_step):
  """The real users' log-likelihood under the params and priors the epoch ends with, not those it started
  from."""
  s = exact_step
  ch, new = s["choices"], s["new"]
  history = new.loglik_history
  for r in range(s["settings"].restarts):
    params = jax.tree.map(lambda x, r=r: x[r], new.params)
    loglik = reference.user_loglik(params, s["table"], ch, **_model_kwargs(s["model"]))
    expected = reference.marginal_loglik(new.log_priors[r], loglik, ch.user_mask) / np.sum(
      ch.turn_mask
    )
    np.testing.assert_allclose(history[r, 0], expected, rtol=1e-5)
    before = reference.marginal_loglik(s["log_priors"], s["loglik"][r], ch.user_mask) / np.sum(
      ch.turn_mask
    )
    assert history[r, 0] > before + 1e-3
  assert np.isnan(history[:, 1:]).all()
  np.testing.assert_array_equal(new.epoch, 1)
  np.testing.assert_array_equal(s["metrics"]["loglik_per_choice"], history[None, :, 0])


@pytest.mark.parametrize("mode", em.MODES)
def test_loglik_history_is_the_full_data_loglik_after_each_epoch(
  config, rater_log, padded_choices, mesh, mode
):
  """Mini-batch EM too records the log-likelihood of all real users at the epoch's end parameters and
  priors (not a sum of per-batch E-step totals taken while the parameters move)."""
  settings, model = _settings(config, mode=mode, epochs=2), _model(config)
  table, ch = em.place(rater_log.table, padded_choices, settings, mesh)
  state = em.init_state(
    jax.random.key(7), model, settings, em.example_options(table, ch), ch.num_users
  )
  state = jax.device_put(state, parallel.replicated(mesh))
  for epoch in range(settings.epochs):
    state, metrics = em.run_epoch(state, table, ch, model, settings, mesh)
    for r in range(settings.restarts):
      one = em.unbatch(state, r)
      _, user_ll = em.posteriors_and_loglik(
        one.params, one.log_priors, model, rater_log.table, padded_choices
      )
      expected = np.sum(np.where(padded_choices.user_mask, user_ll, 0.0)) / np.sum(
        padded_choices.turn_mask
      )
      np.testing.assert_allclose(one.loglik_history[epoch], expected, rtol=1e-5, err_msg=(epoch, r))
      assert float(metrics["loglik_per_choice"][0, r]) == float(one.loglik_history[epoch])


def test_exact_epoch_m_step_lowers_the_weighted_nll(exact_step):
  s = exact_step
  for r, (params, gamma) in enumerate(zip(s["params"], s["gamma"])):
    objective = functools.partial(
      reference.weighted_nll,
      table=s["table"],
      choices=s["choices"],
      weights=gamma,
      **_model_kwargs(s["model"]),
    )
    before, after = objective(params), objective(jax.tree.map(lambda x, r=r: x[r], s["new"].params))
    assert after < before - 1e-3, (r, before, after)


def test_weighted_nll_gradient_matches_finite_differences(exact_step):
  """On the last 32 users (16 real, 16 padded) to keep the 2 × 292 NumPy evaluations cheap."""
  s = exact_step
  params, gamma = s["params"][0], s["gamma"][0][48:]
  batch = jax.tree.map(lambda x: x[48:], s["choices"])
  with jax.default_matmul_precision("highest"):
    grads = jax.device_get(
      jax.jit(jax.grad(em._weighted_nll), static_argnums=2)(
        params["params"],
        params,
        s["model"],
        s["table"],
        jax.tree.map(jnp.asarray, batch),
        jnp.asarray(gamma, jnp.float32),
      )
    )
  features = reference.gather(s["table"], batch)
  fd = reference.finite_difference_grad(
    lambda p: reference.weighted_nll(
      p, s["table"], batch, gamma, features, **_model_kwargs(s["model"])
    ),
    {"params": params["params"]},
  )["params"]
  assert jax.tree.structure(grads) == jax.tree.structure(fd)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    expected = functools.reduce(lambda node, key: node[key.key], path, fd)
    np.testing.assert_allclose(
      g, expected, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path)
    )
  assert max(np.max(np.abs(g)) for g in jax.tree.leaves(fd)) > 1e-2  # A non-trivial gradient.


# --- Sampling agrees with the log-probabilities ----------------------------------------------------


def test_sample_frequencies_match_log_prob():
  num_slates, num_options, num_types, draws = 3, 4, 3, 20000
  utils = jax.random.normal(jax.random.key(7), (num_slates, num_options, num_types))
  tau = jnp.float32(1.7)
  mask = np.ones((num_slates, num_options), bool)
  mask[1, 2] = False  # A padded option.
  probs = np.exp(np.asarray(choice.log_prob(utils, tau, mask)))  # [S, L, K]
  samples = np.asarray(
    choice.sample(
      jax.random.key(8),
      jnp.broadcast_to(utils, (draws,) + utils.shape),
      tau,
      jnp.broadcast_to(mask, (draws,) + mask.shape),
    )
  )  # [N, S, K]
  assert samples.shape == (draws, num_slates, num_types)
  for s in range(num_slates):
    real = np.flatnonzero(mask[s])
    for k in range(num_types):
      counts = np.bincount(samples[:, s, k], minlength=num_options)
      assert counts[~mask[s]].sum() == 0, "a padded option was sampled"
      expected = probs[s, real, k].astype(np.float64)
      np.testing.assert_allclose(expected.sum(), 1.0, rtol=1e-5)
      result = stats.chisquare(counts[real], draws * expected / expected.sum())
      assert result.pvalue > 1e-3, (s, k, counts, draws * probs[s, :, k])


# --- EM's guarantees on the tiny world -------------------------------------------------------------


def test_exact_em_loglik_never_decreases(config, rater_log, padded_choices, mesh):
  settings = _settings(config, **EXACT)
  state = em.fit(
    settings,
    _model(config),
    rater_log.table,
    padded_choices,
    jax.random.key(2),
    mesh,
    show_progress=False,
  )
  history = np.asarray(state.loglik_history)
  assert history.shape == (settings.restarts, settings.epochs) and np.isfinite(history).all()
  assert np.all(np.diff(history, axis=1) >= -1e-5), history
  assert np.all(history[:, -1] > history[:, 0] + 0.1), history  # It did learn.


def _best_fit(settings, model, table, choices, mesh, key):
  """(γ, per-choice training LL, priors, loglik_history) of the best restart (by training LL)."""
  state = em.fit(settings, model, table, choices, key, mesh, show_progress=False)
  fits = []
  for r in range(settings.restarts):
    one = em.unbatch(state, r)
    gamma, loglik = em.posteriors_and_loglik(one.params, one.log_priors, model, table, choices)
    fits.append(
      (
        np.asarray(gamma),
        float(jnp.sum(loglik)) / np.sum(choices.turn_mask),
        np.exp(np.asarray(one.log_priors)),
        np.asarray(one.loglik_history),
      )
    )
  return max(fits, key=lambda f: f[1])


def test_minibatch_em_reaches_the_exact_em_fixed_point(config, rater_log, choices, mesh):
  """The tiny world's 3 planted types are well separated (the planted model's MAP types have ARI 1).

  With a linear model on image features, the planted utilities v_k·x lie in the model class and the
  M-step is nearly convex. Exact EM is run until it stops moving (< 1e-5 nats per choice per epoch).
  Mini-batch EM (4 batches of 16 users, Adam and ρ = 0.1, both decaying after 5 epochs)
  approximates the same iteration stochastically and, with a finite number of Adam steps, ends just
  below that fixed point. Tolerance 0.02 nats per choice:
  under the standard error of the per-choice LL over these 64 users (std of a user's LL / (√64 · 10
  turns) ≈ 0.033 nats), so the two fits are statistically indistinguishable, while a fit that merges
  two types (a local optimum seen with other seeds) is 0.19 nats worse. Priors agree to within one
  user's mass, 1/64.
  """
  ch, index = choices
  truth = rater_log.user_types[np.array([int(u.removeprefix("user")) for u in index.ids])]
  planted = synthetic.planted_user_loglik(rater_log.world, rater_log.table, ch)
  assert (
    metrics.adjusted_rand_score(truth, planted.argmax(-1)) == 1.0
  )  # Separable at the planted model.
  model = _model(config, hidden=(), use_text_features=False)
  exact_gamma, exact_ll, exact_priors, exact_history = _best_fit(
    _settings(config, mode="exact", epochs=40, m_steps=10),
    model,
    rater_log.table,
    ch,
    mesh,
    jax.random.key(3),
  )
  mb_gamma, mb_ll, mb_priors, _ = _best_fit(
    _settings(config, mode="minibatch", epochs=30, m_steps=4, learning_rate=0.1),
    model,
    rater_log.table,
    ch,
    mesh,
    jax.random.key(4),
  )
  exact_history = exact_history[np.isfinite(exact_history)]
  assert abs(exact_history[-1] - exact_history[-2]) < 1e-5, exact_history  # At its fixed point.
  assert metrics.adjusted_rand_score(truth, exact_gamma.argmax(-1)) > 0.9
  assert metrics.adjusted_rand_score(truth, mb_gamma.argmax(-1)) > 0.9
  assert abs(mb_ll - exact_ll) < 0.02, (mb_ll, exact_ll)
  assert exact_ll > -np.log(4) + 0.5  # Far from the uniform model.
  perm = select_k.align_types(mb_gamma, exact_gamma)
  np.testing.assert_allclose(exact_priors[perm], mb_priors, atol=1 / 64)


@pytest.mark.parametrize("mode", ["minibatch", "exact"])
def test_em_on_ragged_slates_ignores_what_the_masks_hide(config, rater_log, choices, mesh, mode):
  """Slates with unavailable options and options with missing images: EM (either mode, through
  `em.fit`, standardisation included) gives the same fit whatever feature rows stand behind the
  masks, so nothing padded reaches the likelihood, its gradient, the priors or the statistics."""
  ch, _ = choices
  rng = np.random.default_rng(0)
  slots = np.arange(ch.option_mask.shape[-1])
  chosen = slots == np.asarray(ch.choice)[..., None]
  option_mask = np.asarray(ch.option_mask) & (chosen | (rng.random(chosen.shape) < 0.6))
  image_mask = rng.random(ch.image_rows.shape) < 0.6
  image_mask[..., 0] = True
  ragged = ch.replace(option_mask=option_mask, image_mask=image_mask)
  hidden_images = ~(option_mask[..., None] & image_mask)
  table = rater_log.table
  scrambled = ragged.replace(
    image_rows=np.where(
      hidden_images, rng.integers(0, table.image.shape[0], hidden_images.shape), ch.image_rows
    ).astype(np.int32),
    text_rows=np.where(
      option_mask, ch.text_rows, rng.integers(0, table.text.shape[0], option_mask.shape)
    ).astype(np.int32),
  )
  assert (~option_mask & np.asarray(ch.option_mask)).mean() > 0.2 and (~image_mask).mean() > 0.2
  settings = _settings(config, mode=mode, epochs=3, restarts=2)
  model = _model(config, standardize=True)
  fits = [
    em.fit(settings, model, table, c, jax.random.key(7), mesh, show_progress=False)
    for c in (ragged, scrambled)
  ]
  history = np.asarray(fits[0].loglik_history)[:, :3]
  assert np.isfinite(history).all() and (history < 0).all()
  np.testing.assert_allclose(fits[1].loglik_history, fits[0].loglik_history, rtol=1e-6)
  np.testing.assert_allclose(fits[1].log_priors, fits[0].log_priors, atol=1e-6)
  for a, b in zip(jax.tree.leaves(fits[0].params), jax.tree.leaves(fits[1].params)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


# --- Model selection helpers ------------------------------------------------------------------------


def _soft_labels(labels, num_types, sharpness=0.7):
  one_hot = np.eye(num_types)[labels]
  return sharpness * one_hot + (1 - sharpness) / num_types


def test_align_types_recovers_a_known_permutation():
  labels = np.random.default_rng(0).integers(0, 4, size=40)
  reference_gamma = np.eye(4)[labels]
  perm = np.array([2, 0, 3, 1])
  # Type k of the fit is reference label perm[k]: column k of γ is column perm[k] of the reference.
  gamma = _soft_labels(np.argsort(perm)[labels], 4)
  np.testing.assert_array_equal(select_k.align_types(gamma, reference_gamma), perm)


def test_align_types_with_fewer_types_than_the_reference():
  labels = np.random.default_rng(1).integers(0, 3, size=30)
  ref = np.eye(5)[np.array([4, 1, 3])[labels]]  # Reference uses labels 4, 1, 3 only.
  np.testing.assert_array_equal(select_k.align_types(np.eye(3)[labels], ref), [4, 1, 3])


def test_permute_types_relabels_heads_and_priors(config, rater_log, choices):
  model = _model(config)
  ch = jax.tree.map(lambda x: x[:4], choices[0])
  params = _init_params(model, rater_log.table, ch)
  original_kernel = params["params"]["heads"]["kernel"].copy()
  fitted = utility.FittedUsers(
    model=model, params=params, log_priors=np.log(np.array([0.5, 0.3, 0.2]))
  )
  perm = np.array([2, 0, 1])
  relabelled = select_k.permute_types(fitted, perm)
  options = types.gather_options(rater_log.table, ch)
  old_utils = np.asarray(model.apply(fitted.params, options)[0])
  new_utils = np.asarray(model.apply(relabelled.params, options)[0])
  np.testing.assert_allclose(
    new_utils[..., perm], old_utils, rtol=1e-6
  )  # New type perm[k] is old type k.
  np.testing.assert_allclose(relabelled.log_priors[perm], fitted.log_priors)
  np.testing.assert_array_equal(
    fitted.params["params"]["heads"]["kernel"], original_kernel
  )  # Not mutated.


def test_mean_pairwise_ari():
  assert select_k.mean_pairwise_ari(np.array([[0, 0, 1, 1]])) == 1.0
  assert select_k.mean_pairwise_ari(np.array([[0, 0, 1, 2], [2, 2, 0, 1]])) == pytest.approx(1.0)
  # Pairs: (a, b) relabelled = 1; (a, c) and (b, c): 2x2 contingency of ones, ARI = (0 - 2/3) / (2 - 2/3) = -1/2.
  assert select_k.mean_pairwise_ari(
    np.array([[0, 0, 1, 1], [1, 1, 0, 0], [0, 1, 0, 1]])
  ) == pytest.approx(0.0)


def test_bic():
  assert select_k.bic(-100.0, 10, 100) == pytest.approx(200.0 + 10 * np.log(100))
  assert select_k.bic(-100.0, 11, 100) > select_k.bic(-100.0, 10, 100)


def _k_result(k, bic, heldout):
  return select_k.KResult(
    k=k,
    num_params=10 * k,
    train_loglik=-bic / 2,
    train_loglik_per_choice=-1.0,
    heldout_loglik_per_choice=heldout,
    bic=bic,
    restart_ari=1.0,
    best_restart=0,
    restart_train_loglik=[-bic / 2],
    restart_loglik_per_choice=[-1.0],
    collapsed_types=[],
    restart_converged=[True],
    restart_epochs=[10],
    restart_grad_norm=[1e-5],
    restart_loglik_spread=0.0,
    restarts_at_best=1,
  )


def _restart_scores(restart_loglik_per_choice, choices=1000):
  """`select_k._k_result` of K = 2 whose restarts end at these training LLs per choice."""
  train_ll = [ll * choices for ll in restart_loglik_per_choice]
  return select_k._k_result(
    2,
    {"params": {"w": np.zeros(3)}},
    np.log([0.5, 0.5]),
    train_ll,
    np.zeros((len(train_ll), 4), np.int32),
    [1e-3] * len(train_ll),
    np.ones(len(train_ll), bool),
    np.full(len(train_ll), 10),
    choices,
    np.array([-1.0, -2.0]),
    np.array([1, 2]),
    collapse_mass=0.01,
    bootstrap_samples=10,
  )


def test_restarts_within_a_thousandth_of_a_nat_per_choice_reach_the_best():
  result = _restart_scores([-0.8, -0.8009, -0.81])
  assert result.restarts_at_best == 2
  assert result.restart_loglik_per_choice == pytest.approx([-0.8, -0.8009, -0.81])
  assert result.stability_warning() is None


def test_a_best_that_one_restart_alone_reached_is_flagged_as_unstable():
  result = _restart_scores([-0.8, -0.8011, -0.83])
  assert result.restarts_at_best == 1
  assert re.search(
    r"K=2: only 1 of 3 EM restarts .* 1\.10e-03 to 3\.00e-02 nats per choice .* em\.restarts",
    result.stability_warning(),
  )
  assert _restart_scores([-0.8]).stability_warning() is None


K_RESULTS = [
  _k_result(1, 500.0, -1.0),
  _k_result(4, 480.0, -0.8985),
  _k_result(2, 450.0, -0.9),
  _k_result(3, 470.0, -0.899),
]


@pytest.mark.parametrize(
  "criterion, tolerance, expected",
  [
    ("bic", 0.0, 2),
    ("heldout", 0.0, 4),
    ("heldout", 0.001, 3),
    ("heldout", 0.002, 2),
    ("heldout", 0.2, 1),
  ],
)
def test_select(criterion, tolerance, expected):
  assert select_k.select(K_RESULTS, criterion, tolerance) == expected


def test_select_rejects_an_unknown_criterion():
  with pytest.raises(ValueError, match="aic"):
    select_k.select(K_RESULTS, "aic", 0.0)


# --- Collapsed types --------------------------------------------------------------------------------


def test_collapsed_types_flags_an_empty_type():
  priors = np.array(
    [[0.5, 0.5, 0.0], [0.3, 0.3, 0.4], [0.007, 0.4965, 0.4965]]
  )  # Threshold 0.02 / 3.
  assert em.collapsed_types(priors, 0.02) == [(0, 2)]


def test_check_collapse_raises_or_warns(config):
  priors = np.array([[0.3, 0.3, 0.4], [0.6, 0.001, 0.399]])
  with pytest.raises(em.CollapsedTypesError, match=r"epoch 3.*\(1, 1\)"):
    em.check_collapse(priors, _settings(config, on_collapse="raise"), epoch=3)
  assert em.check_collapse(priors, _settings(config, on_collapse="warn"), epoch=3) == [(1, 1)]
  assert em.check_collapse(priors[:1], _settings(config, on_collapse="raise"), epoch=3) == []


# --- Warm start from a pretrained model -----------------------------------------------------------------


def test_warm_start_copies_the_trunk_and_repeats_fewer_heads_over_the_types(
  config, rater_log, choices
):
  ch, _ = choices
  one, three = _model(config, num_types=1), _model(config, num_types=3)
  pretrained, fresh = (
    _init_params(one, rater_log.table, ch, seed=1),
    _init_params(three, rater_log.table, ch, seed=2),
  )
  started = jax.device_get(utility.warm_start(fresh, pretrained))
  for name in ("trunk_0", "log_inverse_temperature"):
    jax.tree.map(np.testing.assert_array_equal, started["params"][name], pretrained["params"][name])
  heads = pretrained["params"]["heads"]["kernel"]
  np.testing.assert_allclose(
    started["params"]["heads"]["kernel"],
    np.tile(heads, (1, 3)) + fresh["params"]["heads"]["kernel"],
    rtol=1e-6,
  )
  same_k = jax.device_get(
    utility.warm_start(_init_params(one, rater_log.table, ch, seed=3), pretrained)
  )
  jax.tree.map(np.testing.assert_array_equal, same_k, pretrained)


def test_warm_start_names_a_parameter_of_another_shape_or_name(config, rater_log, choices):
  ch, _ = choices
  pretrained = _init_params(_model(config, hidden=(5,)), rater_log.table, ch)
  with pytest.raises(
    ValueError, match=r"parameter params/heads/kernel has shape \(5, 3\) in the pretrained"
  ):
    utility.warm_start(_init_params(_model(config, hidden=(8,)), rater_log.table, ch), pretrained)
  with pytest.raises(
    ValueError, match=r"parameters \['params/trunk_0/bias', 'params/trunk_0/kernel'\] that "
  ):
    utility.warm_start(_init_params(_model(config, hidden=()), rater_log.table, ch), pretrained)


def test_em_from_a_fitted_model_starts_at_its_likelihood(config, rater_log, padded_choices, mesh):
  """A warm-started fit starts every restart at the pretrained params (their marginal likelihood under
  uniform priors, computed here directly, is far above a random start's), and exact EM never falls below
  it."""
  settings = _settings(config, mode="exact", epochs=2, m_steps=4)
  model = _model(config)
  first = em.fit(
    settings, model, rater_log.table, padded_choices, jax.random.key(5), mesh, show_progress=False
  )
  pretrained = jax.device_get(em.unbatch(first, 0).params)
  uniform = jnp.full((model.num_types,), -np.log(model.num_types))

  def start_loglik(init_params):
    state = em.init_state(
      jax.random.key(6),
      model,
      settings,
      em.example_options(rater_log.table, padded_choices),
      padded_choices.num_users,
      init_params,
    )
    return [
      float(
        em.loglik_per_choice(
          em.unbatch(state, r).params, uniform, model, rater_log.table, padded_choices
        )
      )
      for r in range(settings.restarts)
    ]

  loglik = em.user_loglik(pretrained, model, rater_log.table, padded_choices)
  expected = em.marginal_loglik(uniform, loglik, padded_choices.user_mask) / np.sum(
    padded_choices.turn_mask
  )
  np.testing.assert_allclose(start_loglik(pretrained), float(expected), rtol=1e-5)
  assert min(start_loglik(pretrained)) > max(start_loglik(None)) + 0.05
  warm = em.fit(
    settings,
    model,
    rater_log.table,
    padded_choices,
    jax.random.key(6),
    mesh,
    show_progress=False,
    init_params=pretrained,
  )
  assert np.all(np.asarray(warm.loglik_history)[:, 0] >= float(expected) - 1e-5)


# --- Feature standardisation ----------------------------------------------------------------------


def test_feature_stats_weigh_the_options_real_users_were_shown(rater_log, choices):
  """Each image row counts once per real image of a real option of a real turn of a real user;
  padded users, turns and options do not count."""
  ch = schema.pad_users(_masked_choices(choices[0]), 40)
  stats = jax.device_get(utility.feature_stats(rater_log.table, ch))
  shown = ch.option_mask & ch.turn_mask[..., None] & ch.user_mask[:, None, None]
  rows = ch.image_rows[shown].ravel()
  image = np.asarray(rater_log.table.image, np.float64)[rows]
  np.testing.assert_allclose(stats.image_mean, image.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats.image_scale, image.std(0), rtol=1e-4)
  text = np.asarray(rater_log.table.text, np.float64)[ch.text_rows[shown]]
  np.testing.assert_allclose(stats.text_mean, text.mean(0), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(stats.text_scale, text.std(0), rtol=1e-4)


def test_a_constant_feature_gets_scale_one():
  table = types.FeatureTable(
    image=np.array([[1.0, 5.0], [3.0, 5.0]], np.float32), text=np.ones((1, 2), np.float32)
  )
  ch = types.Choices(
    image_rows=np.array([[[[0], [1]]]], np.int32),
    text_rows=np.zeros((1, 1, 2), np.int32),
    category=np.zeros((1, 1, 2), np.int32),
    choice=np.zeros((1, 1), np.int32),
    option_mask=np.ones((1, 1, 2), bool),
    turn_mask=np.ones((1, 1), bool),
    user_index=np.zeros(1, np.int32),
  )
  stats = jax.device_get(utility.feature_stats(table, ch))
  np.testing.assert_allclose(stats.image_mean, [2.0, 5.0])
  np.testing.assert_allclose(stats.image_scale, [1.0, 1.0])
  np.testing.assert_allclose(stats.text_scale, [1.0, 1.0])


@pytest.mark.parametrize("variant", MODEL_VARIANTS[:2], ids=lambda v: v["aggregation"])
def test_a_standardising_model_is_the_plain_model_on_standardised_features(
  config, rater_log, choices, variant
):
  ch = choices[0]
  model = _model(config, standardize=True, **variant)
  stats = utility.feature_stats(rater_log.table, ch)
  example = em.example_options(rater_log.table, ch)
  variables = jax.device_get(model.init(jax.random.key(3), example, stats))
  assert sorted(variables) == ["feature_stats", "params"]
  image, text = reference.gather(rater_log.table, ch)
  image = (image - stats.image_mean) / stats.image_scale
  text = (text - stats.text_mean) / stats.text_scale
  expected, _ = reference.utilities(variables, image, text, **_model_kwargs(model))
  with jax.default_matmul_precision("highest"):
    utils, _ = model.apply(variables, types.gather_options(rater_log.table, ch))
  np.testing.assert_allclose(utils, expected, rtol=1e-4, atol=1e-4)
  assert utility.num_parameters(variables) == utility.num_parameters(
    {"params": variables["params"]}
  )


@pytest.mark.parametrize("mode", em.MODES)
def test_em_keeps_the_training_statistics_and_a_warm_start_the_pretrained_ones(
  config, rater_log, padded_choices, mesh, mode
):
  """The optimisers never move "feature_stats": every restart ends with the statistics of the
  training users; a warm start keeps the pretrained model's (it starts from the pretrained
  function)."""
  settings = _settings(config, mode=mode, epochs=2, m_steps=2)
  model = _model(config, standardize=True)
  state = jax.device_get(
    em.fit(
      settings, model, rater_log.table, padded_choices, jax.random.key(8), mesh, show_progress=False
    )
  )
  stats = jax.device_get(utility.feature_stats(rater_log.table, padded_choices))
  for name, value in state.params["feature_stats"].items():
    np.testing.assert_array_equal(value, np.broadcast_to(getattr(stats, name), value.shape))
  pretrained = jax.tree.map(lambda x: x[0], state.params)
  pretrained["feature_stats"] = jax.tree.map(lambda x: x + 1.0, pretrained["feature_stats"])
  warm = em.init_state(
    jax.random.key(9),
    model,
    settings,
    em.example_options(rater_log.table, padded_choices),
    padded_choices.num_users,
    pretrained,
    stats,
  )
  for name, value in warm.params["feature_stats"].items():
    np.testing.assert_array_equal(value[1], pretrained["feature_stats"][name])


# --- Stopping on convergence ----------------------------------------------------------------------


@pytest.mark.parametrize(
  "history, epoch, expected",
  [
    ([-2.0, -1.0, -1.0, -1.0, -1.0, np.nan], 5, True),
    ([-2.0, -1.0, -1.0, -1.0, -1.0, np.nan], 4, False),  # The jump at epoch 1.
    ([-1.0, -1.0, -1.0, np.nan], 3, False),  # Two changes only.
    ([-1.0, -1.0, -1.0, -1.0, -0.9, np.nan], 5, False),
    ([-1.0, -1.0, -1.0, -1.0 + 5e-7, -1.0, -1.0], 6, True),
    ([-1.0, -1.0, -1.0, -1.0 + 2e-6, -1.0, -1.0], 6, False),
  ],
)
def test_plateaued(config, history, epoch, expected):
  settings = _settings(config, tolerance=1e-6, patience=3)
  assert bool(em.plateaued(jnp.asarray(history), jnp.int32(epoch), settings)) == expected


def test_exact_em_stops_when_every_restart_converged_and_holds_converged_restarts(mesh):
  """On the scaled panel of test_em_convergence, exact EM stops before its most epochs; a restart
  that converged earlier repeats its log-likelihood (its state is held) until the last one
  converges."""
  table, ch = convergence_panel._panel()
  settings = em.EMSettings(mode="exact", epochs=60, **convergence_panel.SETTINGS)
  model = utility.UtilityModel(num_types=2, hidden=(), use_text_features=False, standardize=True)
  state = jax.device_get(
    em.fit(settings, model, table, ch, jax.random.key(2), mesh, show_progress=False)
  )
  epochs = int(state.epoch[0])
  assert state.converged.all() and epochs < settings.epochs
  assert len(set(state.epochs_used.tolist())) > 1
  assert np.isnan(state.loglik_history[:, epochs:]).all()
  assert np.all(state.grad_norm <= settings.gradient_tolerance)
  for r, used in enumerate(state.epochs_used):
    history = state.loglik_history[r, :epochs]
    np.testing.assert_array_equal(history[used:], history[used - 1])
    assert bool(em.converged(em.unbatch(state, r).replace(epoch=used), settings))
  assert int(np.max(state.epochs_used)) == epochs


@pytest.mark.parametrize("decay_from_epoch, decay_rate", [(5.0, 0.7), (0.5, 0.5), (3.0, 1.0)])
def test_step_scale_and_the_learning_rate_follow_the_decay(config, decay_from_epoch, decay_rate):
  """Both mini-batch steps are scaled by decay_rate ** max(0, epochs done - decay_from_epoch); with
  4 batches of 2 M-steps per epoch, Adam's M-step t (whose step on a constant gradient is its
  learning rate) is at t / 8 epochs done."""
  settings = _settings(
    config, decay_from_epoch=decay_from_epoch, decay_rate=decay_rate, batch_users=16, m_steps=2
  )
  epochs_done = np.arange(96) / 8
  expected = decay_rate ** np.maximum(epochs_done - decay_from_epoch, 0.0)
  np.testing.assert_allclose(em.step_scale(settings, jnp.asarray(epochs_done)), expected, rtol=1e-5)
  optimizer = em.make_optimizer(settings, num_users=64)
  params = {"w": jnp.zeros(())}
  state = optimizer.init(params)
  steps = []
  for _ in epochs_done:
    updates, state = optimizer.update({"w": jnp.ones(())}, state, params)
    steps.append(-float(updates["w"]))
  np.testing.assert_allclose(steps, settings.learning_rate * expected, rtol=1e-4)


def test_decaying_steps_make_minibatch_em_converge_where_constant_steps_do_not(mesh):
  """On the scaled panel of test_em_convergence (K = 2), mini-batch EM with constant steps jitters
  around the maximum and no restart meets the stopping rule within 40 epochs; the default decay
  (held 5 epochs, then 0.7 per epoch) lets every restart converge before then, closer to the
  maximum (smaller gradient norm) and no lower in log-likelihood."""
  table, ch = convergence_panel._panel()
  model = utility.UtilityModel(num_types=2, hidden=(), use_text_features=False, standardize=True)
  fits = {}
  for decay_rate in (1.0, 0.7):
    settings = em.EMSettings(
      mode="minibatch",
      epochs=40,
      decay_from_epoch=5.0,
      decay_rate=decay_rate,
      **{**convergence_panel.SETTINGS, "restarts": 2, "tolerance": 1e-6},
    )
    state = em.fit(settings, model, table, ch, jax.random.key(1), mesh, show_progress=False)
    result, _, _ = select_k.evaluate(state, model, table, ch, ch, 0.0, bootstrap_samples=10)
    fits[decay_rate] = jax.device_get(state), result
  constant, constant_result = fits[1.0]
  decayed, decayed_result = fits[0.7]
  assert not constant.converged.any() and (constant.epochs_used == 40).all()
  assert decayed.converged.all() and int(decayed.epoch[0]) < 40
  assert max(decayed_result.restart_grad_norm) < min(constant_result.restart_grad_norm)
  assert decayed_result.train_loglik_per_choice >= constant_result.train_loglik_per_choice - 1e-4
