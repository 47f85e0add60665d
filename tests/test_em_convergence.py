"""EM reaches the maximum likelihood on features of very different scales.

A generated panel: attributes on scales 1, 10 and 100 (a price-like column next to a 0/1 flag), K*
planted types choosing by softmax. For K ∈ {1, 2, 3}, both EM modes (standardised features, stopped
on convergence) reach the log-likelihood of a direct maximum-likelihood fit: SciPy L-BFGS on the
marginal likelihood in float64 from many random starts.
"""

import jax
import numpy as np
import pytest
from scipy import optimize, special

from pasta_jax import parallel, types
from pasta_jax.user_model import em, select_k, utility

USERS, TURNS, OPTIONS = 240, 8, 3
SCALES = np.array([1.0, 10.0, 100.0, 1.0])
OFFSETS = np.array([0.0, 50.0, 1000.0, 0.0])
PLANTED = np.array([[2.0, -1.5, 0.5, 1.0], [-1.5, 1.0, 1.5, -1.0], [0.5, 1.5, -2.0, 0.0]])
RELATIVE = 1e-4
SETTINGS = dict(
  batch_users=48,
  m_steps=10,
  learning_rate=0.05,
  prior_step=0.1,
  prior_floor=1e-6,
  restarts=4,
  collapse_mass=0.0,
  on_collapse="warn",
  checkpoint_every_epochs=1000,
  tolerance=1e-7,
  patience=3,
  gradient_tolerance=1e-5,
)
EPOCHS = {"exact": 300, "minibatch": 120}


def _panel(seed: int = 0) -> tuple[types.FeatureTable, types.Choices]:
  """USERS users of len(PLANTED) equally likely types, TURNS slates of OPTIONS images each.

  Attribute j is OFFSETS[j] + SCALES[j] · N(0, 1), the last a 0/1 flag; type k's utility is
  PLANTED[k] · the standardised attributes.
  """
  rng = np.random.default_rng(seed)
  rows = USERS * TURNS * OPTIONS
  z = rng.normal(size=(rows, len(SCALES)))
  z[:, -1] = rng.integers(0, 2, size=rows)
  image = (OFFSETS + SCALES * z).astype(np.float32)
  planted = rng.integers(0, len(PLANTED), size=USERS)
  standard = (image - image.mean(0)) / image.std(0)
  utilities = (standard @ PLANTED.T).reshape(USERS, TURNS, OPTIONS, -1)
  chosen_type = np.take_along_axis(utilities, planted[:, None, None, None], -1)[..., 0]
  gumbel = rng.gumbel(size=chosen_type.shape)
  table = types.FeatureTable(image=image, text=np.zeros((1, len(SCALES)), np.float32))
  choices = types.Choices(
    image_rows=np.arange(rows, dtype=np.int32).reshape(USERS, TURNS, OPTIONS, 1),
    text_rows=np.zeros((USERS, TURNS, OPTIONS), np.int32),
    category=np.zeros((USERS, TURNS, OPTIONS), np.int32),
    choice=np.argmax(chosen_type + gumbel, -1).astype(np.int32),
    option_mask=np.ones((USERS, TURNS, OPTIONS), bool),
    turn_mask=np.ones((USERS, TURNS), bool),
    user_index=np.arange(USERS, dtype=np.int32),
  )
  return table, choices


def _negative_loglik(theta: np.ndarray, z: np.ndarray, chosen: np.ndarray, k: int):
  """(-Σ_u log Σ_k π_k Π_t softmax_l(z β_k)[c_t], its gradient) in float64.

  theta = [β f64[D, K] flattened, α f64[K]] with π = softmax(α); z f64[U, T, L, D].
  """
  dim = z.shape[-1]
  beta, alpha = theta[: dim * k].reshape(dim, k), theta[dim * k :]
  log_prob = special.log_softmax(z @ beta, axis=2)  # [U, T, L, K]
  per_user = np.take_along_axis(log_prob, chosen[..., None, None], 2)[:, :, 0].sum(1)
  joint = special.log_softmax(alpha) + per_user  # [U, K]
  total = special.logsumexp(joint, axis=1)
  gamma = np.exp(joint - total[:, None])
  weights = np.eye(z.shape[2])[chosen][..., None] - np.exp(log_prob)  # [U, T, L, K]
  grad_beta = np.einsum("utld,utlk->dk", z, weights * gamma[:, None, None, :])
  grad_alpha = gamma.sum(0) - len(gamma) * special.softmax(alpha)
  return -total.sum(), -np.concatenate([grad_beta.ravel(), grad_alpha])


def _direct_max_loglik_per_choice(table, choices, k: int, starts: int = 12) -> float:
  """The best marginal log-likelihood per choice of SciPy L-BFGS from `starts` random starts."""
  image = np.asarray(table.image, np.float64)
  z = ((image - image.mean(0)) / image.std(0))[choices.image_rows[..., 0]]
  rng = np.random.default_rng(k)
  best = -np.inf
  for _ in range(starts):
    theta = np.concatenate([rng.normal(size=z.shape[-1] * k), np.zeros(k)])
    result = optimize.minimize(
      _negative_loglik,
      theta,
      args=(z, choices.choice, k),
      jac=True,
      method="L-BFGS-B",
      options=dict(maxiter=2000, gtol=1e-9, ftol=1e-14),
    )
    best = max(best, -result.fun)
  return best / choices.choice.size


@pytest.fixture(scope="module")
def panel():
  return _panel()


@pytest.fixture(scope="module")
def direct(panel):
  """{K: the direct maximum log-likelihood per choice}, computed once per K for both modes."""
  return {k: _direct_max_loglik_per_choice(*panel, k) for k in (1, 2, 3)}


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("mode", em.MODES)
def test_em_reaches_the_direct_maximum_likelihood(panel, direct, mode, k):
  """Both modes stop on their own, every restart converged before the most epochs: exact EM with its
  gradient norm below tolerance, mini-batch EM once its decaying steps (EMSettings' defaults) let the
  log-likelihood settle."""
  table, choices = panel
  settings = em.EMSettings(mode=mode, epochs=EPOCHS[mode], **SETTINGS)
  model = utility.UtilityModel(num_types=k, hidden=(), use_text_features=False, standardize=True)
  state = em.fit(
    settings, model, table, choices, jax.random.key(k), parallel.make_mesh(), show_progress=False
  )
  result, _, _ = select_k.evaluate(state, model, table, choices, choices, 0.0)
  assert result.train_loglik_per_choice == pytest.approx(direct[k], rel=RELATIVE)
  assert result.train_loglik_per_choice < direct[k] + 1e-6
  assert all(result.restart_converged), result
  assert max(result.restart_epochs) < settings.epochs
  if mode == "exact":
    assert max(result.restart_grad_norm) <= settings.gradient_tolerance * 1.5
