"""The K sweep in one program: a fit of K types inside K_max heads (the other types masked out) is the
K-type fit, the whole sweep compiles once, its pairs split over a "replica" mesh axis, and its
results carry held-out CIs."""

import os

import jax
import numpy as np
import pytest

from configs import k_sweep
from pasta_jax import config as config_lib
from pasta_jax import metrics_log, parallel
from pasta_jax.data import schema
from pasta_jax.evaluation import metrics
from pasta_jax.user_model import em, select_k, utility

K, K_MAX = (
  3,
  4,
)  # The tiny config's K, so the K-type programs are those of tests/test_user_model.py.


def _settings(config, **em_changes):
  c = config.copy_and_resolve_references()
  c.em.update(epochs=2, **em_changes)
  return em.EMSettings.from_config(c.em)


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh()


@pytest.fixture(scope="module")
def split(choices):
  """(training users, held-out users, training users padded to 80 as `em.fit` takes them): the tiny
  world's first 48 users and the other 16."""
  train, heldout = (
    jax.tree.map(lambda x, s=s: np.asarray(x)[s], choices[0]) for s in (np.s_[:48], np.s_[48:])
  )
  return train, heldout, schema.pad_users(train, 40)


def _embedded(sweep_state, k_state, k):
  """`sweep_state` (pairs of K = k first) with the first `k` heads of its first restarts set to
  `k_state`'s heads, so both start from the same function."""
  state = jax.tree.map(np.array, jax.device_get(sweep_state))
  k_state = jax.device_get(k_state)
  restarts = k_state.log_priors.shape[0]
  state.params["params"]["heads"]["kernel"][:restarts, :, :k] = k_state.params["params"]["heads"][
    "kernel"
  ]
  return state


@pytest.mark.parametrize("mode", em.MODES)
def test_masked_fit_equals_the_k_type_fit(config, rater_log, split, mesh, mode):
  """K = 3 of 4 heads (with a K = 1 fit beside it, the pairs split over 2 replicas) against the plain
  3-type fit from the same keys and the same first heads: params, priors and log-likelihoods."""
  settings = _settings(config, mode=mode)
  k_model = utility.from_config(config, num_types=K)
  sweep_model = utility.from_config(config, num_types=K_MAX)
  sweep_mesh = em.replica_mesh(mesh, 2)
  table, ch = em.place(rater_log.table, split[2], settings, mesh)
  stats = utility.feature_stats(table, ch)
  example = em.example_options(table, ch)
  key = jax.random.key(11)
  k_state = em.init_state(
    jax.random.fold_in(key, K), k_model, settings, example, ch.num_users, None, stats
  )
  pairs = em.sweep_pairs((K, 1), settings.restarts, multiple=2)
  sweep_state = em.init_sweep_state(
    key, sweep_model, settings, example, ch.num_users, pairs, None, stats
  )
  host = jax.device_get(sweep_state)
  np.testing.assert_array_equal(
    host.params["params"]["trunk_0"]["kernel"][:2],
    jax.device_get(k_state.params["params"]["trunk_0"]["kernel"]),
  )
  np.testing.assert_array_equal(
    host.active, [[1, 1, 1, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
  )
  sweep_state = parallel.put(_embedded(sweep_state, k_state, K), em.pair_sharding(sweep_mesh))
  initial_heads = np.array(host.params["params"]["heads"]["kernel"])
  s_table, s_ch = em.place(rater_log.table, split[2], settings, sweep_mesh)
  for _ in range(settings.epochs):
    k_state, _ = em.run_epoch(k_state, table, ch, k_model, settings, mesh)
    sweep_state, _ = em.run_epoch(sweep_state, s_table, s_ch, sweep_model, settings, sweep_mesh)
  assert sweep_state.log_priors.sharding.spec[0] == em.REPLICA
  got, want = jax.device_get(sweep_state), jax.device_get(k_state)
  r = settings.restarts
  heads = got.params["params"]["heads"]["kernel"]
  np.testing.assert_allclose(heads[:r, :, :K], want.params["params"]["heads"]["kernel"], atol=1e-5)
  np.testing.assert_array_equal(heads[:r, :, K:], initial_heads[:r, :, K:])
  for name in ("trunk_0", "log_inverse_temperature"):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a[:r], b, atol=1e-5),
      got.params["params"][name],
      want.params["params"][name],
    )
  np.testing.assert_allclose(np.exp(got.log_priors[:r, :K]), np.exp(want.log_priors), atol=1e-5)
  assert np.all(np.isneginf(got.log_priors[:r, K:])) and np.all(np.isneginf(got.log_priors[r:, 1:]))
  np.testing.assert_allclose(got.log_priors[r:, 0], 0.0, atol=1e-6)
  np.testing.assert_allclose(got.loglik_history[:r], want.loglik_history, atol=1e-5)
  assert np.all(np.isfinite(got.loglik_history))


def test_the_sweep_compiles_once_and_scores_every_k(config, rater_log, split, mesh, tmp_path):
  """Three Ks x 2 restarts on a 2 x 4 (replica, data) mesh: one EM program and one scoring program,
  each K's fit restricted to its own heads, held-out CIs from the saved per-user values."""
  # A prior floor no other test uses, so these programs are new to the compilation caches.
  settings = _settings(config, mode="minibatch", prior_floor=2.75e-6)
  train, heldout, fit_choices = split
  model = utility.from_config(config)
  em_before, score_before = em.run_epoch._cache_size(), select_k._score_fits._cache_size()
  fits = select_k.sweep(
    settings,
    model,
    rater_log.table,
    fit_choices,
    train,
    heldout,
    (3, 1, 2),
    jax.random.key(4),
    mesh,
    replicas=-1,
    show_progress=False,
    bootstrap_samples=200,
  )
  assert em.run_epoch._cache_size() == em_before + 1
  assert select_k._score_fits._cache_size() == score_before + 1
  assert list(fits) == [1, 2, 3]
  heldout_choices = np.sum(heldout.turn_mask, axis=1)
  for k, fit in fits.items():
    r = fit.result
    assert fit.fitted.model.num_types == k and fit.fitted.log_priors.shape == (k,)
    np.testing.assert_allclose(np.sum(np.exp(fit.fitted.log_priors)), 1.0, atol=1e-5)
    gamma, user_ll = em.posteriors_and_loglik(
      fit.fitted.params, fit.fitted.log_priors, fit.fitted.model, rater_log.table, heldout
    )
    np.testing.assert_allclose(fit.heldout_user_loglik, user_ll, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
      r.heldout_loglik_per_choice, np.sum(user_ll) / np.sum(heldout_choices), rtol=1e-5
    )
    estimate, lo, hi = metrics.bootstrap(np.divide, [user_ll, heldout_choices], 200)
    np.testing.assert_allclose(r.heldout_loglik_ci95, (lo, hi), rtol=1e-4)
    assert lo < r.heldout_loglik_per_choice < hi
    assert r.num_params == utility.num_parameters(fit.fitted.params) + k - 1
    assert r.bic == pytest.approx(
      select_k.bic(r.train_loglik, r.num_params, np.sum(train.turn_mask))
    )
    assert fit.posteriors.shape == (48, k) and len(r.restart_train_loglik) == settings.restarts
    assert r.row()["heldout_loglik_per_choice_ci95"] == list(r.heldout_loglik_ci95)
  assert fits[1].result.restart_ari == 1.0
  path = tmp_path / "heldout.npz"
  select_k.save_heldout_loglik(str(path), fits, [f"u{i}" for i in range(16)])
  with np.load(path) as saved:
    np.testing.assert_array_equal(saved["k2"], fits[2].heldout_user_loglik)
  select_k.plot_sweep([f.result for f in fits.values()], 2, str(tmp_path / "k_sweep.png"), 3)
  assert (tmp_path / "k_sweep.png").stat().st_size > 0


def test_a_stopped_sweep_resumes_bit_identical_and_writes_curves_per_k(
  config, rater_log, split, mesh, tmp_path
):
  """The sweep's state (active masks and pairs split over "replica" included) through an Orbax
  checkpoint: stopped after one epoch and resumed, it ends as the uninterrupted sweep; the metric
  writer gets each K's restarts."""
  settings = _settings(config, mode="minibatch", prior_floor=2.75e-6)
  model, sweep_mesh, key = utility.from_config(config), em.replica_mesh(mesh, 2), jax.random.key(9)

  def fit(**kwargs):
    return em.fit(
      settings,
      model,
      rater_log.table,
      split[2],
      key,
      sweep_mesh,
      show_progress=False,
      ks=(1, 2, 3),
      **kwargs,
    )

  log_dir = str(tmp_path / "metrics")
  writer = metrics_log.open_writer(log_dir)
  try:
    full = jax.device_get(fit(writer=writer))
  finally:
    writer.close()
  checkpoints = str(tmp_path / "checkpoints")
  fit(checkpoint_dir=checkpoints, stop_after_epoch=1)
  resumed = jax.device_get(fit(checkpoint_dir=checkpoints))
  jax.tree.map(np.testing.assert_array_equal, resumed, full)
  assert full.log_priors.shape == (6, 3)
  curves = metrics_log.read_jsonl_metrics(os.path.join(log_dir, metrics_log.JSONL_NAME))
  for i, k in enumerate((1, 2, 3)):
    for r in range(settings.restarts):
      np.testing.assert_allclose(
        curves[f"loglik_per_choice/k{k}/restart_{r}"], full.loglik_history[2 * i + r], rtol=1e-6
      )


def test_heldout_ci95_is_the_bootstrap_over_users_and_none_for_one_user():
  rng = np.random.default_rng(0)
  user_ll, user_choices = -rng.uniform(1, 5, 30), rng.integers(1, 6, 30)
  lo, hi = select_k.heldout_ci95(user_ll, user_choices, 500)
  draws = rng.integers(0, 30, (2000, 30))
  ratio = user_ll[draws].sum(1) / user_choices[draws].sum(1)
  assert lo == pytest.approx(np.percentile(ratio, 2.5), abs=0.02)
  assert hi == pytest.approx(np.percentile(ratio, 97.5), abs=0.02)
  assert select_k.heldout_ci95(user_ll[:1], user_choices[:1]) is None


@pytest.mark.parametrize(
  "devices, pairs, expected", [(8, 6, 2), (8, 28, 4), (8, 7, 1), (8, 8, 8), (16, 28, 4), (1, 28, 1)]
)
def test_replicas_for_divides_devices_and_pairs(devices, pairs, expected):
  assert em.replicas_for(devices, pairs) == expected


def test_replica_mesh_names_a_replica_count_that_does_not_divide_the_devices(mesh):
  assert em.replica_mesh(mesh, 1) is mesh
  assert dict(em.replica_mesh(mesh, 4).shape) == {em.REPLICA: 4, parallel.DATA: 2}
  with pytest.raises(ValueError, match=r"select_k.replicas=3 does not divide the mesh's 8 devices"):
    em.replica_mesh(mesh, 3)


def test_sweep_pairs_and_ks_checks(config):
  np.testing.assert_array_equal(
    em.sweep_pairs((1, 4), 2, multiple=3), [[1, 0], [1, 1], [4, 0], [4, 1], [4, 1], [4, 1]]
  )
  model = utility.from_config(config, num_types=4)
  for ks in ((1, 1), (0, 2), (2, 5)):
    with pytest.raises(ValueError, match="distinct and from 1 to the model's 4 heads"):
      em.check_sweep(ks, model)


def test_collapsed_types_of_a_sweep_count_active_types_only():
  priors = np.array([[0.5, 0.495, 0.005, 0.0], [1.0, 0.0, 0.0, 0.0]])
  active = np.array([[True, True, True, False], [True, False, False, False]])
  assert em.collapsed_types(priors, 0.02, active) == [(0, 2)]


@pytest.mark.parametrize(
  "field, value, message",
  [
    ("compile_once", 1, "True or False"),
    ("replicas", 0, "positive number of devices"),
    ("replicas", 2, "set select_k.compile_once=True"),
  ],
)
def test_validate_config_names_the_sweep_fields(config, field, value, message):
  c = config.copy_and_resolve_references()
  with c.select_k.unlocked():
    del c.select_k[field]
    c.select_k[field] = value
  with pytest.raises(
    config_lib.ConfigError, match=rf"config.select_k.{field}={value!r}.*{message}"
  ):
    select_k.validate_config(c)


def test_the_k_sweep_config_sweeps_k_to_64_in_one_program():
  c = k_sweep.get_config()
  assert tuple(c.select_k.ks) == (1, 2, 4, 8, 16, 32, 64)
  assert c.select_k.compile_once and c.select_k.replicas == -1
  config_lib.validate(c)
  small = k_sweep.get_config("small")
  config_lib.validate(small)
  assert small.select_k.compile_once and small.world.num_users < c.world.num_users


def test_the_user_model_stage_runs_the_compiled_once_sweep(tmp_path):
  """pipeline.run with select_k.compile_once: user_model.json's K rows carry held-out CIs, the per-user
  values are saved and declared as an output, and the K-sweep figure is drawn."""
  from pasta_jax import pipeline
  from tests import conftest

  config = conftest.tiny_config()
  config.stages = ("data", "user_model")
  config.select_k.compile_once = True
  workdir = str(tmp_path / "run")
  summary = pipeline.run(config, workdir)["user_model"]
  rows = {row["k"]: row for row in summary["k_sweep"]}
  assert sorted(rows) == sorted(config.select_k.ks)
  for row in rows.values():
    low, high = row["heldout_loglik_per_choice_ci95"]
    assert low <= row["heldout_loglik_per_choice"] <= high
  saved = np.load(os.path.join(workdir, "user_model", pipeline.HELDOUT_LOGLIK))
  assert len(saved.files) >= 1
  assert os.path.isfile(os.path.join(workdir, "user_model", "k_sweep.png"))
  assert f"user_model/{pipeline.HELDOUT_LOGLIK}" in pipeline.STAGE_SPECS["user_model"].outputs(
    config
  )
