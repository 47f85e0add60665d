"""The online type posterior: the Bayesian update of a user's type distribution after each choice.

b_0 = π; b_{t+1}(k) ∝ b_t(k) · P(c_t | slate_t, k). The agent reads it as its belief, the simulator
carries it in the observation, evaluation scores it against the true type, and the predictive choice
distribution Σ_k b_t(k) P(i | slate_t, k) is what the sim-vs-real checks compare with real choices.
"""

import functools

import chex
import jax
import jax.numpy as jnp

from pasta_jax import types
from pasta_jax.user_model import choice


def initial(log_priors: chex.Array) -> chex.Array:
  """log b_0 = normalised log priors: f32[K]."""
  return jax.nn.log_softmax(log_priors)


def update(
  log_belief: chex.Array,
  utilities: chex.Array,
  inverse_temperature: chex.Array,
  option_mask: chex.Array,
  chosen: chex.Array,
) -> chex.Array:
  """log b_{t+1}: log_belief f32[..., K], utilities f32[..., L, K], option_mask bool[..., L], chosen i32[...]."""
  return jax.nn.log_softmax(
    log_belief + choice.chosen_log_prob(utilities, inverse_temperature, option_mask, chosen),
    axis=-1,
  )


def predictive_log_prob(
  log_belief: chex.Array,
  utilities: chex.Array,
  inverse_temperature: chex.Array,
  option_mask: chex.Array,
) -> chex.Array:
  """log Σ_k b(k) P(i | slate, k): f32[..., L] (-inf on padded options)."""
  per_type = choice.log_prob(utilities, inverse_temperature, option_mask)  # [..., L, K]
  return jax.scipy.special.logsumexp(per_type + log_belief[..., None, :], axis=-1)


def filter_beliefs(
  log_priors: chex.Array,
  utilities: chex.Array,
  inverse_temperature: chex.Array,
  option_mask: chex.Array,
  chosen: chex.Array,
  turn_mask: chex.Array,
) -> chex.Array:
  """The belief before each of a user's T turns and after the last (padded turns leave it unchanged).

  utilities f32[T, L, K], option_mask bool[T, L], chosen i32[T], turn_mask bool[T] -> f32[T + 1, K].
  """

  def one_turn(log_belief, turn):
    utilities_t, mask_t, chosen_t, real_t = turn
    after = update(log_belief, utilities_t, inverse_temperature, mask_t, chosen_t)
    after = jnp.where(real_t, after, log_belief)
    return after, log_belief

  last, before = jax.lax.scan(
    one_turn, initial(log_priors), (utilities, option_mask, chosen, turn_mask)
  )
  return jnp.concatenate([before, last[None]], axis=0)


def _user_utilities(fitted, table: types.FeatureTable, user: types.Choices) -> tuple:
  """One row's utilities f32[T, L, K] over each option's real images and τ, the features gathered
  from `table` by the row's image and text rows."""
  return fitted.utilities(table.image[user.image_rows], table.text[user.text_rows], user.image_mask)


def earlier_rows(values: chex.Array, starts: chex.Array) -> chex.Array:
  """f32[R, ...]: the sum of `values` f32[R, ...] over the earlier rows of each row's user, given
  the rows that start a user (bool[R], `types.Choices.first_rows`; a user's rows are consecutive in
  time order); 0 on a user's first row."""

  def combine(earlier, later):
    (earlier_starts, earlier_sum), (later_starts, later_sum) = earlier, later
    restart = later_starts.reshape(later_starts.shape + (1,) * (later_sum.ndim - 1))
    return earlier_starts | later_starts, jnp.where(restart, later_sum, earlier_sum + later_sum)

  _, inclusive = jax.lax.associative_scan(combine, (starts, values))
  first = starts.reshape(starts.shape + (1,) * (values.ndim - 1))
  return jnp.where(first, 0.0, jnp.roll(inclusive, 1, axis=0))


def _row_log_priors(
  fitted, table: types.FeatureTable, choices: types.Choices, batch_users: int
) -> chex.Array:
  """f32[R, K]: log π plus the log-likelihood of each row's user's choices in earlier rows, the
  unnormalised log belief a row starts from (log π alone when every user fills one row)."""

  def evidence(user: types.Choices) -> chex.Array:
    utilities, tau = _user_utilities(fitted, table, user)
    per_turn = choice.chosen_log_prob(utilities, tau, user.option_mask, user.choice)
    return jnp.sum(jnp.where(user.turn_mask[:, None], per_turn, 0.0), axis=0)

  earlier = jax.lax.cond(
    choices.spans_rows(),
    lambda: earlier_rows(
      jax.lax.map(evidence, choices, batch_size=batch_users), choices.first_rows()
    ),
    lambda: jnp.zeros((choices.num_users,) + fitted.log_priors.shape),
  )
  return fitted.log_priors + earlier


def _user_beliefs(
  log_priors: chex.Array, user: types.Choices, utilities: chex.Array, tau: chex.Array
) -> chex.Array:
  """`filter_beliefs` of one row's choices from `log_priors` f32[K]: f32[T + 1, K]."""
  return filter_beliefs(log_priors, utilities, tau, user.option_mask, user.choice, user.turn_mask)


@functools.partial(jax.jit, static_argnames="batch_users")
def user_beliefs(
  fitted, table: types.FeatureTable, choices: types.Choices, batch_users: int = 64
) -> chex.Array:
  """The fitted model's log belief over types before each of a row's turns and after its last, from
  the priors and the user's own choices in order, earlier rows included (padded turns leave it
  unchanged): f32[R, T + 1, K]. `fitted` is a `utility.FittedUsers`. Rows are mapped `batch_users`
  at a time (each batch vmapped), so features are gathered per batch."""

  def one_user(row: tuple[types.Choices, chex.Array]) -> chex.Array:
    user, log_priors = row
    return _user_beliefs(log_priors, user, *_user_utilities(fitted, table, user))

  priors = _row_log_priors(fitted, table, choices, batch_users)
  return jax.lax.map(one_user, (choices, priors), batch_size=batch_users)


@functools.partial(jax.jit, static_argnames=("batch_users", "update"))
def prequential_log_probs(
  fitted,
  table: types.FeatureTable,
  choices: types.Choices,
  batch_users: int = 64,
  update: bool = True,
) -> chex.Array:
  """log Σ_k b(k) P(i | slate_t, k) of every option: f32[R, T, L] (-inf on padded options and turns;
  utilities over each option's real images, `choices.image_mask`).

  b is the belief before turn t, from the user's earlier choices in this and earlier rows
  (`update`), or the prior at every turn (`update=False`: the prior-mixture predictive). `fitted` is
  a `utility.FittedUsers`. Rows are mapped `batch_users` at a time (each batch vmapped), so features
  are gathered per batch.
  """

  def one_user(row: tuple[types.Choices, chex.Array]) -> chex.Array:
    user, log_priors = row
    utilities, inverse_temperature = _user_utilities(fitted, table, user)
    if update:
      beliefs = _user_beliefs(log_priors, user, utilities, inverse_temperature)[:-1]
    else:
      beliefs = initial(fitted.log_priors)
    log_probs = predictive_log_prob(beliefs, utilities, inverse_temperature, user.option_mask)
    return jnp.where(user.option_mask & user.turn_mask[:, None], log_probs, -jnp.inf)

  if update:
    priors = _row_log_priors(fitted, table, choices, batch_users)
  else:
    priors = jnp.broadcast_to(fitted.log_priors, (choices.num_users,) + fitted.log_priors.shape)
  return jax.lax.map(one_user, (choices, priors), batch_size=batch_users)
