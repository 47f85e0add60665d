"""Latent user types by EM: exact batch EM and the paper's mini-batch EM (Algorithm 1).

E-step: γ_u(k) ∝ π_k Π_t P(c_t | slate_t, k) over user u's whole history (log space). M-step:
optimizer steps on -Σ_u Σ_k γ_u(k) log p_θ(data_u | k) / (number of choices), and π ← mean γ (exact)
or π ← (1 - ρ) π + ρ mean_batch γ (mini-batch, whose M-step is Adam). Exact EM's M-step is L-BFGS
with a zoom line search, so every step raises the expected complete-data log-likelihood and the data
log-likelihood never falls. Optimisers update the model's trainable "params" only; its
"feature_stats" (see `utility`) are set at initialisation from the training users' options.

Mini-batch step sizes (`step_scale`): the learning rate and the prior step ρ are held for
`decay_from_epoch` epochs, then both shrink by the factor `decay_rate` per epoch (continuously,
batch by batch). Constant steps (`decay_rate` = 1) leave the parameters and priors jittering at the
scale of the step, so the log-likelihood never settles to `tolerance`; decaying steps let it
settle. The geometric decay anneals (its steps have a finite sum) rather than meeting the
Robbins–Monro conditions, so the fit stops near, not at, the maximum: the norm of the gradient at
the end (select_k's `restart_grad_norm`) says how near.

Stopping: a restart has converged once its training log-likelihood per choice ℓ changed by at most
`tolerance` · |ℓ| in each of the last `patience` epochs and, in exact EM, the norm of the gradient
of ℓ with respect to the params is at most `gradient_tolerance` (which also ends each L-BFGS M-step
early). A converged restart is held (its state no longer changes) while the others go on; the fit
ends when every restart has converged, or after `epochs` epochs.

A whole epoch is one `lax.scan`; restarts are `vmap`ped; users are sharded over the mesh's "data"
axis and parameters are replicated. Every sum over users (the M-step objective and its gradient, the
prior update, the log-likelihood and its gradient) adds per-device partial sums in device order
(`parallel.device_sums`, `parallel.summed_objective`), so a fit is bitwise the same however the
mesh's devices are split into processes. `fit` runs the epochs through `train_loop.run`.

Long histories (`types.Choices` rows): a user whose history is longer than a row fills several
consecutive rows, and every user-level quantity (p(data_u | k), γ_u, the prior mean over users) sums
the user's rows (`per_user`). Exact EM is unchanged by the layout. Mini-batches are batches of rows;
when some user spans several rows, a row's E-step needs the rest of its user's history, which the
batch need not hold: the state then keeps each row's latest log-likelihood under each type
(`EMState.row_loglik`, the incremental EM of Neal & Hinton, 1998), a batch refreshes its own rows
and reads the others' (rows not yet visited in the fit count as uninformative, 0), and each row
weighs 1 / (its user's rows) in the prior step, so the step moves towards the mean γ over users. When
every user fills one row, this is exactly Algorithm 1 and the state keeps no table.

The K sweep in one program (`fit(..., ks=...)`): every fit has the model's K_max heads, and a fit of
K types has the first K active (`EMState.active`). An inactive type has log prior −inf, so its
posterior weight, its share of the M-step objective and its prior are 0; the prior floor and the
renormalisation run over the active types only. A fit of K types inside K_max heads is thus the
K-type fit (tests/test_k_sweep.py), and every (K, restart) pair is one row of the vmapped state:
one compilation for the whole sweep. On a mesh with a "replica" axis (`replica_mesh`) the pairs
are split over it and the users over "data"."""

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import struct

from pasta_jax import parallel, train_loop, types
from pasta_jax.config_checks import (
  check,
  check_positive_int,
  check_real,
  largest_k,
  training_rows,
  training_users_text,
)
from pasta_jax.data import schema
from pasta_jax.user_model import choice, utility

MODES = ("minibatch", "exact")
REPLICA = "replica"


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid `em` field."""
  e = config.em
  check(e.mode in MODES, "em.mode", e.mode, f"one of {MODES}")
  for field in (
    "epochs",
    "batch_users",
    "m_steps",
    "restarts",
    "checkpoint_every_epochs",
    "patience",
  ):
    check_positive_int(config, f"em.{field}")
  check_real(config, "em.tolerance", at_least=0)
  check_real(config, "em.gradient_tolerance", at_least=0)
  check_real(config, "em.learning_rate", above=0)
  check_real(config, "em.prior_step", above=0, at_most=1)
  check_real(config, "em.decay_from_epoch", at_least=0)
  check_real(config, "em.decay_rate", above=0, at_most=1)
  check_real(config, "em.prior_floor", at_least=0, below=1)
  check_real(config, "em.collapse_mass", at_least=0, below=1)
  check(e.on_collapse in ("warn", "raise"), "em.on_collapse", e.on_collapse, "'warn' or 'raise'")
  k = largest_k(config)
  check(
    e.prior_floor * k < 1,
    "em.prior_floor",
    e.prior_floor,
    f"x K={k} (the largest of select_k.ks and user_model.num_types) = {e.prior_floor * k:.3g} >= 1 "
    f"forces every prior to 1/K; must be < {1 / k:.6g}",
  )
  layout = training_rows(config)
  check(
    layout is None or e.mode != "minibatch" or e.batch_users <= layout[2],
    "em.batch_users",
    e.batch_users,
    f"a mini-batch of rows must not exceed the {layout and layout[2]} rows of "
    f"{training_users_text(config)}",
  )


class CollapsedTypesError(RuntimeError):
  """A user type lost (almost) all its mass and `em.on_collapse` is "raise"."""


@dataclasses.dataclass(frozen=True)
class EMSettings(train_loop.FromConfig):
  """config.em.

  Mini-batch step sizes: the M-step's Adam learning rate and the prior step ρ are `learning_rate`
  and `prior_step` for the first `decay_from_epoch` epochs, then both shrink by `decay_rate` per
  epoch (`step_scale`; 1 = constant steps, which never settle to `tolerance`). Exact EM ignores
  them."""

  config_name = "em"
  mode: str
  epochs: int
  batch_users: int
  m_steps: int
  learning_rate: float
  prior_step: float
  prior_floor: float
  restarts: int
  collapse_mass: float
  on_collapse: str
  checkpoint_every_epochs: int
  tolerance: float = 1e-6
  patience: int = 3
  gradient_tolerance: float = 1e-4
  decay_from_epoch: float = 5.0
  decay_rate: float = 0.7


@struct.dataclass
class EMState:
  """One EM run (leading axis [R] over restarts when batched).

  params: the utility model's variables ("params" and, when it standardises, "feature_stats");
  opt_state: the mini-batch optimizer's state (empty for exact EM); log_priors: f32[K];
  epoch: i32[] epochs done by the fit; key: u32[2] raw PRNG key data;
  loglik_history: f32[E] training log-likelihood per choice of all real users under the params and
  priors at the end of each epoch (NaN: not yet; a held restart repeats its value);
  converged: bool[] the stopping rule has held (the restart is held from then on);
  epochs_used: i32[] epochs that updated this restart;
  grad_norm: f32[] exact EM: the norm of the gradient of the training log-likelihood per choice
  with respect to the params at the end of the last epoch (NaN before the first, and in mini-batch
  EM, which does not compute it);
  active: bool[K] the types this fit uses (a K sweep's fit, module docstring; their log priors are
  −inf elsewhere), or None: all K;
  row_loglik: f32[R, K] mini-batch EM on users spanning several rows: each row's log-likelihood
  under each type at its latest visit (0 before the first; module docstring), else None.
  """

  params: Any
  opt_state: Any
  log_priors: chex.Array
  epoch: chex.Array
  key: chex.Array
  loglik_history: chex.Array
  converged: chex.Array
  epochs_used: chex.Array
  grad_norm: chex.Array
  active: chex.Array | None = None
  row_loglik: chex.Array | None = None


def user_loglik(
  params, model: utility.UtilityModel, table: types.FeatureTable, choices: types.Choices
) -> chex.Array:
  """f32[R, K]: each row's log-likelihood under each type (the user's whole history when it fills
  one row; `per_user` adds a user's rows)."""
  utilities, inverse_temperature = model.apply(params, types.gather_options(table, choices))
  return choice.trajectory_loglik(utilities, inverse_temperature, choices)


def per_user(row_values: chex.Array, choices: types.Choices) -> chex.Array:
  """f32[R, ...]: `row_values` f32[R, ...] summed over each user's rows, slot u holding the u-th user
  in row order (`types.Choices.user_segments`; slots without a user are 0, `real_users` marks the
  others)."""
  segments = jnp.where(choices.user_mask, choices.user_segments(), choices.num_users)
  return jax.ops.segment_sum(row_values, segments, num_segments=choices.num_users)


def real_users(choices: types.Choices) -> chex.Array:
  """bool[R]: the slots of `per_user` that hold a user."""
  return per_user(choices.user_mask.astype(jnp.int32), choices) > 0


def _row_shares(choices: types.Choices) -> chex.Array:
  """f32[R]: 1 / (the number of rows of the row's user), 0 on padded rows: a user's rows weigh 1
  in all."""
  rows = per_user(choices.user_mask.astype(jnp.float32), choices)
  shares = 1.0 / jnp.maximum(rows[choices.user_segments()], 1.0)
  return jnp.where(choices.user_mask, shares, 0.0)


def _rows_of(per_user_values: chex.Array, segments: chex.Array, mask: chex.Array) -> chex.Array:
  """f32[R', ...]: the value of `per_user_values` f32[R, ...] (`per_user`) of each row's user, rows
  given by their user segments i32[R'] (`types.Choices.user_segments`) and realness bool[R'] (0 on
  padded rows)."""
  values = per_user_values[segments]
  return jnp.where(mask[:, None], values, 0.0)


def log_posteriors(log_priors: chex.Array, loglik: chex.Array) -> chex.Array:
  """log γ_u(k) = log softmax_k(log π_k + log p(data_u | k)): f32[U, K]."""
  return jax.nn.log_softmax(log_priors + loglik, axis=-1)


def marginal_loglik(
  log_priors: chex.Array, loglik: chex.Array, user_mask: chex.Array
) -> chex.Array:
  """Σ_u log Σ_k π_k p(data_u | k) over real users: scalar."""
  return jnp.sum(
    jnp.where(user_mask, jax.scipy.special.logsumexp(log_priors + loglik, axis=-1), 0.0)
  )


def _weighted_nll(params, variables, model, table, choices, weights, mesh=None) -> chex.Array:
  """-Σ_u Σ_k γ_u(k) log p(data_u | k) per choice (the M-step objective) of the trainable `params`,
  the rest of the model's `variables` held, from the rows' γ f32[R, K]; on `mesh` it and its
  gradient are summed over devices in device order (`parallel.summed_objective`)."""
  num_choices = jnp.maximum(choices.num_choices(), 1)

  def local(params, rows):
    rows_choices, rows_weights = rows
    loglik = user_loglik(utility.with_trainable(variables, params), model, table, rows_choices)
    return -jnp.sum(rows_weights * loglik) / num_choices

  return parallel.summed_objective(local, mesh)(params, (choices, weights))


def _row_e_step(params, log_priors, model, table, choices) -> chex.Array:
  """γ_u(k) of each row's user from that row alone (the whole history when every user fills one
  row), 0 on padded rows: f32[R, K]."""
  loglik = user_loglik(params, model, table, choices)
  return jnp.exp(log_posteriors(log_priors, loglik)) * choices.user_mask[:, None]


def _e_step(params, log_priors, model, table, choices) -> chex.Array:
  """γ_u(k) of each row's user from all of the user's rows, 0 on padded rows: f32[R, K]."""
  loglik = per_user(user_loglik(params, model, table, choices), choices)
  return _posteriors_on_rows(log_priors, loglik, choices)


def _posteriors_on_rows(log_priors, loglik, choices) -> chex.Array:
  """γ_u(k) of each row's user from the users' log-likelihoods f32[R, K] (`per_user`), 0 on padded
  rows: f32[R, K]."""
  posteriors = jnp.exp(log_posteriors(log_priors, loglik))
  return _rows_of(posteriors, choices.user_segments(), choices.user_mask)


def _floor_priors(priors: chex.Array, floor: float, active: chex.Array | None = None) -> chex.Array:
  """log π f32[K] from priors f32[K]: floored at `floor` and renormalised over the `active` types
  (bool[K]; None: all), −inf for the others."""
  priors = jnp.maximum(priors, floor)
  if active is not None:
    priors = jnp.where(active, priors, 0.0)
  return jnp.log(priors / jnp.sum(priors))


def _mean_posterior(weights: chex.Array, shares: chex.Array, mesh=None) -> chex.Array:
  """f32[K]: the mean of γ over users from the rows' γ f32[R, K], row r weighing shares[r] (f32[R],
  `_row_shares`); 0 when no row weighs anything. On `mesh` the sums add in device order."""

  def sums(rows):
    rows_weights, rows_shares = rows
    return jnp.sum(rows_shares[:, None] * rows_weights, axis=0), jnp.sum(rows_shares)

  weighted, total = parallel.device_sums(sums, (weights, shares), mesh)
  return weighted / jnp.where(total > 0, total, 1.0)


def _loglik_per_choice(log_priors, loglik, choices, mesh=None) -> chex.Array:
  """`loglik_per_choice` from the users' log-likelihoods f32[R, K] (`per_user`): scalar."""
  total = parallel.device_sums(
    lambda rows: marginal_loglik(log_priors, *rows), (loglik, real_users(choices)), mesh
  )
  return total / jnp.maximum(choices.num_choices(), 1)


def loglik_per_choice(params, log_priors, model, table, choices, mesh=None) -> chex.Array:
  """Σ_u log Σ_k π_k p(data_u | k) over real users / their number of choices: scalar. On `mesh` the
  sum adds in device order."""
  loglik = per_user(user_loglik(params, model, table, choices), choices)
  return _loglik_per_choice(log_priors, loglik, choices, mesh)


def loglik_and_gradient_norm(
  params, log_priors, model, table, choices, mesh=None
) -> tuple[chex.Array, chex.Array]:
  """(`loglik_per_choice`, the norm of its gradient with respect to the trainable params): f32[].
  The gradient is that of -`_weighted_nll` at the posteriors γ, held (Fisher's identity); on `mesh`
  both add in device order."""
  loglik = per_user(user_loglik(params, model, table, choices), choices)
  weights = _posteriors_on_rows(log_priors, loglik, choices)
  grad = jax.grad(_weighted_nll)(
    utility.trainable(params), params, model, table, choices, weights, mesh
  )
  return _loglik_per_choice(log_priors, loglik, choices, mesh), optax.tree_utils.tree_norm(grad)


@functools.partial(jax.jit, static_argnames="model")
def gradient_norm(params, log_priors, model, table, choices) -> chex.Array:
  """f32[]: the norm of the gradient of `loglik_per_choice` with respect to the trainable params."""
  return loglik_and_gradient_norm(params, log_priors, model, table, choices)[1]


def _end_epoch(
  state: EMState, model, table, choices, with_gradient: bool, mesh=None, **fields
) -> EMState:
  """`state` with `fields` replaced, one more epoch done and its log-likelihood recorded (and the
  norm of its gradient, `with_gradient`), summed over devices in device order on `mesh`."""
  state = state.replace(**fields)
  if with_gradient:
    loglik, grad_norm = loglik_and_gradient_norm(
      state.params, state.log_priors, model, table, choices, mesh
    )
    state = state.replace(grad_norm=grad_norm)
  else:
    loglik = loglik_per_choice(state.params, state.log_priors, model, table, choices, mesh)
  return state.replace(
    epoch=state.epoch + 1, loglik_history=state.loglik_history.at[state.epoch].set(loglik)
  )


def plateaued(history: chex.Array, epoch: chex.Array, settings: EMSettings) -> chex.Array:
  """bool[]: each of the last `patience` of `epoch` epochs changed the log-likelihood per choice
  (history f32[E]) by at most `tolerance` times its previous magnitude."""
  ends = epoch - 1 - jnp.arange(settings.patience)
  before = history[jnp.maximum(ends - 1, 0)]
  small = jnp.abs(history[jnp.maximum(ends, 0)] - before) <= settings.tolerance * jnp.abs(before)
  return jnp.all((ends >= 1) & small)


def converged(state: EMState, settings: EMSettings) -> chex.Array:
  """bool[]: the stopping rule (module docstring) holds for one restart's state."""
  flat = plateaued(state.loglik_history, state.epoch, settings)
  if settings.mode == "exact":
    return flat & (state.grad_norm <= settings.gradient_tolerance)
  return flat


def _settle(old: EMState, new: EMState, settings: EMSettings) -> EMState:
  """One restart after an epoch: `new`, or `old` held one more epoch (log-likelihood repeated)
  when it had converged; its convergence then updated."""
  held = old.replace(
    epoch=new.epoch,
    loglik_history=old.loglik_history.at[old.epoch].set(old.loglik_history[old.epoch - 1]),
  )
  state = jax.tree.map(lambda h, n: jnp.where(old.converged, h, n), held, new)
  return state.replace(
    converged=old.converged | converged(state, settings),
    epochs_used=old.epochs_used + (~old.converged).astype(jnp.int32),
  )


def minibatch_epoch(
  state: EMState,
  table: types.FeatureTable,
  choices: types.Choices,
  *,
  model: utility.UtilityModel,
  optimizer: optax.GradientTransformation,
  settings: EMSettings,
  mesh: jax.sharding.Mesh | None,
) -> EMState:
  """Algorithm 1 over one pass of the rows in a random order (R a multiple of batch_users), with
  the learning rate and prior step scaled by `step_scale`; with `state.row_loglik`, the E-step of
  users spanning several rows reads their other rows' latest log-likelihoods (module docstring).
  On `mesh` the batches' users are split over "data" and the sums over them add in device order."""
  num_batches = choices.num_users // settings.batch_users
  epoch_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.epoch)
  order = jax.random.permutation(epoch_key, choices.num_users)
  batches = jax.tree.map(
    lambda x: x[order].reshape((num_batches, settings.batch_users) + x.shape[1:]),
    (choices, _row_shares(choices), choices.user_segments(), jnp.arange(choices.num_users)),
  )
  if mesh is not None:
    batches = jax.lax.with_sharding_constraint(batches, parallel.batched_data_sharding(mesh))

  def e_step(variables, log_priors, batch, segments, rows, row_loglik):
    """(γ of the batch rows' users f32[B, K] (their user segments i32[B] and row indices i32[B] in
    `choices`), the rows' log-likelihood table after the batch)."""
    if row_loglik is None:
      return _row_e_step(variables, log_priors, model, table, batch), None
    row_loglik = row_loglik.at[rows].set(user_loglik(variables, model, table, batch))
    posteriors = jnp.exp(log_posteriors(log_priors, per_user(row_loglik, choices)))
    return _rows_of(posteriors, segments, batch.user_mask), row_loglik

  def m_step(carry, _, batch, weights):
    params, opt_state = carry
    grads = jax.grad(_weighted_nll)(params, state.params, model, table, batch, weights, mesh)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  def batch_step(carry, batch_and_index):
    (batch, shares, segments, rows), index = batch_and_index
    params, opt_state, log_priors, row_loglik = carry
    variables = utility.with_trainable(state.params, params)
    weights, row_loglik = e_step(variables, log_priors, batch, segments, rows, row_loglik)
    (params, opt_state), _ = jax.lax.scan(
      functools.partial(m_step, batch=batch, weights=weights),
      (params, opt_state),
      None,
      length=settings.m_steps,
    )
    scale = step_scale(settings, state.epoch + index / num_batches)
    step = settings.prior_step * scale * (jnp.sum(batch.user_mask) > 0)
    priors = (1 - step) * jnp.exp(log_priors) + step * _mean_posterior(weights, shares, mesh)
    log_priors = _floor_priors(priors, settings.prior_floor, state.active)
    return (params, opt_state, log_priors, row_loglik), None

  (params, opt_state, log_priors, row_loglik), _ = jax.lax.scan(
    batch_step,
    (utility.trainable(state.params), state.opt_state, state.log_priors, state.row_loglik),
    (batches, jnp.arange(num_batches)),
  )
  return _end_epoch(
    state,
    model,
    table,
    choices,
    with_gradient=False,
    mesh=mesh,
    params=utility.with_trainable(state.params, params),
    opt_state=opt_state,
    log_priors=log_priors,
    row_loglik=row_loglik,
  )


def exact_epoch(
  state: EMState,
  table: types.FeatureTable,
  choices: types.Choices,
  *,
  model: utility.UtilityModel,
  settings: EMSettings,
  mesh: jax.sharding.Mesh | None,
) -> EMState:
  """One exact EM iteration: E-step over all users, L-BFGS M-step (at most m_steps steps, fewer
  once its gradient norm is at most `gradient_tolerance`), π = mean γ. On `mesh` the sums over
  users add in device order."""
  weights = _e_step(state.params, state.log_priors, model, table, choices)
  objective = functools.partial(
    _weighted_nll,
    variables=state.params,
    model=model,
    table=table,
    choices=choices,
    weights=weights,
    mesh=mesh,
  )
  optimizer = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def m_step(carry):
    params, opt_state, step = carry
    value, grad = value_and_grad(params, state=opt_state)
    updates, opt_state = optimizer.update(
      grad, opt_state, params, value=value, grad=grad, value_fn=objective
    )
    return optax.apply_updates(params, updates), opt_state, step + 1

  def keep_going(carry):
    _, opt_state, step = carry
    grad_norm = optax.tree_utils.tree_norm(optax.tree_utils.tree_get(opt_state, "grad"))
    return (step == 0) | ((step < settings.m_steps) & (grad_norm > settings.gradient_tolerance))

  params = utility.trainable(state.params)
  params, _, _ = jax.lax.while_loop(keep_going, m_step, (params, optimizer.init(params), 0))
  log_priors = _floor_priors(
    _mean_posterior(weights, _row_shares(choices), mesh), settings.prior_floor, state.active
  )
  return _end_epoch(
    state,
    model,
    table,
    choices,
    with_gradient=True,
    mesh=mesh,
    params=utility.with_trainable(state.params, params),
    log_priors=log_priors,
  )


def step_scale(settings: EMSettings, epochs_done: chex.Array) -> chex.Array:
  """f32[]: the factor on the mini-batch learning rate and prior step after `epochs_done` epochs
  (fractional within an epoch): 1 until `decay_from_epoch`, then `decay_rate` per epoch."""
  return settings.decay_rate ** jnp.maximum(epochs_done - settings.decay_from_epoch, 0.0)


def make_optimizer(settings: EMSettings, num_users: int) -> optax.GradientTransformation:
  """Adam whose learning rate is `learning_rate` · `step_scale` at M-step t of the run (each epoch
  has num_users // batch_users batches of m_steps M-steps)."""
  per_epoch = max(1, num_users // settings.batch_users) * settings.m_steps
  return optax.adam(lambda t: settings.learning_rate * step_scale(settings, t / per_epoch))


def example_options(table: types.FeatureTable, choices: types.Choices) -> types.OptionFeatures:
  """The first slate's features (image f32[L, M, D], text f32[L, D]), to initialise a model."""
  return types.OptionFeatures(
    image=table.image[choices.image_rows[0, 0]], text=table.text[choices.text_rows[0, 0]]
  )


def _init_one(
  key: chex.PRNGKey,
  active: chex.Array | None,
  model: utility.UtilityModel,
  settings: EMSettings,
  example: types.OptionFeatures,
  num_users: int,
  init_params: Any,
  feature_stats: utility.FeatureStats | None,
) -> EMState:
  """One fit's initial state from `key` (split into the model's and the run's keys): priors uniform
  over the `active` types (bool[K]; None: all K)."""
  k_params, k_run = jax.random.split(key)
  params = model.init(k_params, example, feature_stats)
  if init_params is not None:
    params = utility.warm_start(params, init_params)
  opt_state = (
    make_optimizer(settings, num_users).init(utility.trainable(params))
    if settings.mode == "minibatch"
    else ()
  )
  if active is None:
    log_priors = jnp.full((model.num_types,), -np.log(model.num_types))
  else:
    log_priors = jnp.where(active, -jnp.log(jnp.sum(active).astype(jnp.float32)), -jnp.inf)
  return EMState(
    params=params,
    opt_state=opt_state,
    log_priors=log_priors,
    epoch=jnp.zeros((), jnp.int32),
    key=jax.random.key_data(k_run),
    loglik_history=jnp.full((settings.epochs,), jnp.nan),
    converged=jnp.zeros((), bool),
    epochs_used=jnp.zeros((), jnp.int32),
    grad_norm=jnp.full((), jnp.nan),
    active=active,
  )


@functools.partial(jax.jit, static_argnames=("model", "settings", "num_users"))
def init_state(
  key: chex.PRNGKey,
  model: utility.UtilityModel,
  settings: EMSettings,
  example: types.OptionFeatures,
  num_users: int,
  init_params: Any = None,
  feature_stats: utility.FeatureStats | None = None,
) -> EMState:
  """Restart-batched initial state: restart r is initialised from fold_in(key, r) with
  `feature_stats` (identity when None; unused unless the model standardises), and started from
  `init_params` (a pretrained model's variables, `utility.warm_start`: its statistics too) when
  given."""
  init = functools.partial(
    _init_one,
    active=None,
    model=model,
    settings=settings,
    example=example,
    num_users=num_users,
    init_params=init_params,
    feature_stats=feature_stats,
  )
  return jax.vmap(lambda restart: init(jax.random.fold_in(key, restart)))(
    jnp.arange(settings.restarts)
  )


def sweep_pairs(ks: Sequence[int], restarts: int, multiple: int = 1) -> np.ndarray:
  """i32[P, 2]: the (K, restart) pairs of a K sweep, K in the order of `ks` and restarts within
  each, the last pair repeated until P is a multiple of `multiple` (the replica axis)."""
  pairs = [(k, r) for k in ks for r in range(restarts)]
  pairs += pairs[-1:] * (-len(pairs) % multiple)
  return np.asarray(pairs, np.int32)


@functools.partial(jax.jit, static_argnames=("model", "settings", "num_users"))
def init_sweep_state(
  key: chex.PRNGKey,
  model: utility.UtilityModel,
  settings: EMSettings,
  example: types.OptionFeatures,
  num_users: int,
  pairs: chex.Array,
  init_params: Any = None,
  feature_stats: utility.FeatureStats | None = None,
) -> EMState:
  """A K sweep's initial state, leading axis [P] over `pairs` (i32[P, 2] of (K, restart),
  `sweep_pairs`): pair (K, r) has the model's first K types active and is initialised from
  fold_in(fold_in(key, K), r), the key of restart r of the K-type fit `fit(key=fold_in(key, K))`
  (its first K heads differ, being drawn in a K_max-column kernel); the rest as `init_state`."""
  init = functools.partial(
    _init_one,
    model=model,
    settings=settings,
    example=example,
    num_users=num_users,
    init_params=init_params,
    feature_stats=feature_stats,
  )

  def one(pair):
    k, restart = pair[0], pair[1]
    active = jnp.arange(model.num_types) < k
    return init(jax.random.fold_in(jax.random.fold_in(key, k), restart), active)

  return jax.vmap(one)(pairs)


def epoch(
  state: EMState,
  table: types.FeatureTable,
  choices: types.Choices,
  model: utility.UtilityModel,
  settings: EMSettings,
  mesh: jax.sharding.Mesh,
) -> tuple[EMState, dict[str, chex.Array]]:
  """One EM epoch of every restart (vmapped; converged restarts held, `_settle`): the
  restart-batched state after it, and its metrics {"loglik_per_choice": f32[1, R]} (the epoch's
  `loglik_history` entry, one unit of `train_loop.run`). On a mesh with a "replica" axis the
  restarts (a sweep's pairs) are split over it."""
  if settings.mode == "minibatch":
    one = functools.partial(
      minibatch_epoch,
      model=model,
      optimizer=make_optimizer(settings, choices.num_users),
      settings=settings,
      mesh=mesh,
    )
  else:
    one = functools.partial(exact_epoch, model=model, settings=settings, mesh=mesh)
  spmd = REPLICA if REPLICA in mesh.axis_names else None
  new = jax.vmap(one, in_axes=(0, None, None), spmd_axis_name=spmd)(state, table, choices)
  new = jax.vmap(functools.partial(_settle, settings=settings), spmd_axis_name=spmd)(state, new)
  return new, {"loglik_per_choice": new.loglik_history[:, state.epoch[0]][None]}


run_epoch = jax.jit(epoch, static_argnames=("model", "settings", "mesh"), donate_argnums=0)


def replica_mesh(mesh: jax.sharding.Mesh, replicas: int) -> jax.sharding.Mesh:
  """`mesh`'s devices as a ("replica", "data") mesh of `replicas` rows, for a K sweep whose pairs
  are split over "replica"; `mesh` itself when `replicas` is 1."""
  if replicas == 1:
    return mesh
  devices = mesh.devices.reshape(-1)
  if devices.size % replicas:
    raise ValueError(
      f"config.select_k.replicas={replicas} does not divide the mesh's {devices.size} devices; "
      "choose a divisor of config.mesh.data (or 1)"
    )
  return jax.sharding.Mesh(
    devices.reshape(replicas, -1),
    (REPLICA, parallel.DATA),
    axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )


def replicas_for(devices: int, pairs: int) -> int:
  """The most replicas (rows of `replica_mesh`) that divide both `devices` and `pairs`: at least 1.
  (A mini-batch that splits over all devices splits over the data axis of any of them.)"""
  return max(r for r in range(1, min(devices, pairs) + 1) if devices % r == 0 and pairs % r == 0)


def users_multiple(settings: EMSettings, mesh: jax.sharding.Mesh) -> int:
  """Users are padded to a multiple of this, so batches split evenly over the data axis."""
  devices = parallel.data_size(mesh)
  if settings.mode == "exact":
    return devices
  return math.lcm(settings.batch_users, devices)


def place(
  table: types.FeatureTable, choices: types.Choices, settings: EMSettings, mesh: jax.sharding.Mesh
) -> tuple[types.FeatureTable, types.Choices]:
  """Pads users and puts them on the mesh: choices sharded over "data", features replicated."""
  choices = schema.pad_users(choices, users_multiple(settings, mesh))
  return (
    parallel.put(table, parallel.replicated(mesh)),
    parallel.put(choices, parallel.data_sharding(mesh)),
  )


def with_row_table(state: EMState, settings: EMSettings, choices: types.Choices) -> EMState:
  """`state` (leading axis over fits) with a zero `row_loglik` f32[fits, R, K] when mini-batch EM
  meets a user spanning several rows (module docstring); unchanged otherwise."""
  if settings.mode != "minibatch" or not parallel.host_array(choices.spans_rows()):
    return state
  fits, num_types = state.log_priors.shape
  return state.replace(row_loglik=jnp.zeros((fits, choices.num_users, num_types), jnp.float32))


def check_settings(settings: EMSettings, num_users: int, mesh: jax.sharding.Mesh) -> None:
  if settings.mode == "minibatch" and settings.batch_users % parallel.data_size(mesh):
    raise ValueError(
      f"config.em.batch_users={settings.batch_users} must be a multiple of the data axis "
      f"size {parallel.data_size(mesh)}"
    )
  if settings.mode == "minibatch" and settings.batch_users > num_users:
    raise ValueError(
      f"config.em.batch_users={settings.batch_users} exceeds the {num_users} rows of training users"
    )


def fit(
  settings: EMSettings,
  model: utility.UtilityModel,
  table: types.FeatureTable,
  choices: types.Choices,
  key: chex.PRNGKey,
  mesh: jax.sharding.Mesh,
  checkpoint_dir: str | None = None,
  show_progress: bool = True,
  stop_after_epoch: int | None = None,
  init_params: Any = None,
  writer=None,
  ks: Sequence[int] | None = None,
) -> EMState:
  """Runs EM over all restarts until every restart has converged or for `settings.epochs` epochs
  (module docstring; a warning names a fit none of whose restarts converged); resumes from
  `checkpoint_dir` if it has a step. A standardising model's feature statistics are those of
  `choices`' real users (`utility.feature_stats`). `init_params`: a pretrained model's variables to
  start every restart from (see `init_state`).

  `stop_after_epoch` ends the run early (as a killed run would), leaving its checkpoints behind.
  `writer` (a clu MetricWriter, `metrics_log.open_writer`) receives "loglik_per_choice/restart_<r>"
  after each epoch, at step = epochs done. Raises TrainingDivergedError on a non-finite
  log-likelihood or parameter, and CollapsedTypesError on an empty type when `settings.on_collapse
  == "raise"`.

  `ks` (distinct Ks, each at most `model.num_types`): the K sweep in one program (module
  docstring). The state then holds one fit per (K, restart) pair of `sweep_pairs(ks, restarts)`,
  initialised by `init_sweep_state`, split over the mesh's "replica" axis if it has one
  (`replica_mesh`; pairs padded to a multiple of it while fitting); the writer receives
  "loglik_per_choice/k<K>/restart_<r>"."""
  check_settings(settings, choices.num_users, mesh)
  table, choices = place(table, choices, settings, mesh)
  stats = utility.feature_stats(table, choices) if model.standardize else None
  example = example_options(table, choices)
  name = f"EM K={model.num_types} ({settings.mode})"

  def advance(state: EMState) -> tuple[EMState, dict[str, chex.Array]]:
    return run_epoch(state, table, choices, model, settings, mesh)

  if ks is None:
    state = with_row_table(
      init_state(key, model, settings, example, choices.num_users, init_params, stats),
      settings,
      choices,
    )
    state = parallel.put(state, parallel.replicated(mesh))
  else:
    check_sweep(ks, model)
    pairs = sweep_pairs(ks, settings.restarts, dict(mesh.shape).get(REPLICA, 1))
    state = with_row_table(
      init_sweep_state(key, model, settings, example, choices.num_users, pairs, init_params, stats),
      settings,
      choices,
    )
    state = parallel.put(state, pair_sharding(mesh))
    name = f"EM K sweep {list(ks)} in {model.num_types} heads ({settings.mode})"
    advance = _with_metrics_per_k(advance, ks, settings.restarts)
  schedule = train_loop.Schedule(
    name=name,
    unit="epoch",
    total=settings.epochs,
    per_chunk=1,
    save_every=settings.checkpoint_every_epochs,
    members="restart",
  )
  state, _ = train_loop.run(
    state,
    advance,
    schedule,
    lambda s: s.epoch[0],
    checkpoint_dir=checkpoint_dir,
    stop_after=stop_after_epoch,
    writer=writer,
    show_progress=show_progress,
    watch=_watched,
    on_chunk=_CollapseCheck(settings),
    stop=lambda s: bool(np.all(parallel.host_array(s.converged))),
  )
  if not np.any(parallel.host_array(state.converged)):
    logging.warning(
      "%s: no restart converged within %d epochs (relative change %g over %d epochs%s)",
      schedule.name,
      settings.epochs,
      settings.tolerance,
      settings.patience,
      f", gradient norm {settings.gradient_tolerance:g}" if settings.mode == "exact" else "",
    )
  if ks is None:
    return state
  return jax.tree.map(lambda x: x[: len(ks) * settings.restarts], state)


def check_sweep(ks: Sequence[int], model: utility.UtilityModel) -> None:
  """ValueError unless `ks` are distinct Ks from 1 to the model's number of heads."""
  if len(set(ks)) != len(ks) or not all(1 <= k <= model.num_types for k in ks):
    raise ValueError(
      f"K sweep {list(ks)}: the Ks must be distinct and from 1 to the model's "
      f"{model.num_types} heads (config.select_k.ks)"
    )


def pair_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """A sweep's state: the leading (K, restart) pair axis split over "replica" when the mesh has
  one, else replicated."""
  if REPLICA in mesh.axis_names:
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(REPLICA))
  return parallel.replicated(mesh)


def _with_metrics_per_k(advance, ks: Sequence[int], restarts: int):
  """`advance` of a sweep with its metric {"loglik_per_choice": f32[1, P]} split per K into
  {"loglik_per_choice/k<K>": f32[1, R]} (NumPy; padding pairs dropped)."""

  def advance_per_k(state: EMState) -> tuple[EMState, dict[str, np.ndarray]]:
    state, metrics = advance(state)
    values = parallel.host_array(metrics["loglik_per_choice"])
    return state, {
      f"loglik_per_choice/k{k}": values[:, i * restarts : (i + 1) * restarts]
      for i, k in enumerate(ks)
    }

  return advance_per_k


def _watched(state: EMState) -> EMState:
  """What `train_loop.run` checks for finite values: the state but its log-likelihood history and
  gradient norm (NaN until set), inactive types' log priors (−inf) read as 0."""
  state = state.replace(loglik_history=None, grad_norm=None)
  if state.active is None:
    return state
  return state.replace(log_priors=jnp.where(state.active, state.log_priors, 0.0))


class _CollapseCheck:
  """`train_loop.run`'s after-epoch hook: `check_collapse`, warning at the first collapsed epoch
  only."""

  def __init__(self, settings: EMSettings):
    self.settings, self.warned = settings, False

  def __call__(self, state: EMState, done: int) -> None:
    priors = np.exp(parallel.host_array(state.log_priors))
    active = None if state.active is None else parallel.host_array(state.active)
    self.warned |= bool(
      check_collapse(priors, self.settings, done - 1, warn=not self.warned, active=active)
    )


def collapsed_types(
  priors: np.ndarray, collapse_mass: float, active: np.ndarray | None = None
) -> list[tuple[int, int]]:
  """(restart, type) pairs whose prior is below collapse_mass / K: priors f32[R, K]; with `active`
  (bool[R, K], a sweep's fits) only active types count, K being each row's number of them."""
  if active is None:
    return [tuple(map(int, rk)) for rk in np.argwhere(priors < collapse_mass / priors.shape[-1])]
  threshold = collapse_mass / np.sum(active, axis=-1, keepdims=True)
  return [tuple(map(int, rk)) for rk in np.argwhere(active & (priors < threshold))]


def check_collapse(
  priors: np.ndarray,
  settings: EMSettings,
  epoch: int,
  warn: bool = True,
  active: np.ndarray | None = None,
) -> list[tuple[int, int]]:
  """Raises CollapsedTypesError (on_collapse="raise") or logs a warning (if `warn`) on collapsed
  types (`collapsed_types`)."""
  collapsed = collapsed_types(priors, settings.collapse_mass, active)
  if collapsed and (warn or settings.on_collapse == "raise"):
    message = (
      f"EM epoch {epoch}: user types with prior below {settings.collapse_mass}/K "
      f"(restart, type): {collapsed}; priors {np.round(priors, 4).tolist()}"
    )
    if settings.on_collapse == "raise":
      raise CollapsedTypesError(message)
    logging.warning("%s (further epochs of this fit are not reported)", message)
  return collapsed


def unbatch(state: EMState, restart: int) -> EMState:
  return jax.tree.map(lambda x: x[restart], state)


@functools.partial(jax.jit, static_argnames="model")
def posteriors_and_loglik(
  params, log_priors, model: utility.UtilityModel, table: types.FeatureTable, choices: types.Choices
) -> tuple[chex.Array, chex.Array]:
  """(γ f32[R, K], marginal log-likelihood f32[R]) of each user of one fitted model, slot u holding
  user u (`per_user`; `schema.user_slots` marks the real users)."""
  loglik = per_user(user_loglik(params, model, table, choices), choices)
  return (
    jnp.exp(log_posteriors(log_priors, loglik)),
    jax.scipy.special.logsumexp(log_priors + loglik, axis=-1),
  )
