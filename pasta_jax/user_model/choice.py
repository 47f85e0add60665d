"""The softmax choice model. `log_prob` and `sample` both read `choice_logits`, so EM fits exactly
the distribution the simulator draws from: P(i | slate, k) = softmax_i(τ · R^k(p_i))."""

import chex
import jax
import jax.numpy as jnp

from pasta_jax import types


def choice_logits(
  utilities: chex.Array, inverse_temperature: chex.Array, option_mask: chex.Array
) -> chex.Array:
  """utilities f32[..., L, K], option_mask bool[..., L] -> logits f32[..., L, K] (-inf on padding)."""
  return jnp.where(option_mask[..., None], inverse_temperature * utilities, -jnp.inf)


def log_prob(
  utilities: chex.Array, inverse_temperature: chex.Array, option_mask: chex.Array
) -> chex.Array:
  """log P(i | slate, k): f32[..., L, K], normalised over L."""
  return jax.nn.log_softmax(choice_logits(utilities, inverse_temperature, option_mask), axis=-2)


def chosen_log_prob(
  utilities: chex.Array,
  inverse_temperature: chex.Array,
  option_mask: chex.Array,
  choice: chex.Array,
) -> chex.Array:
  """log P(choice | slate, k) for every type: choice i32[...] -> f32[..., K]."""
  table = log_prob(utilities, inverse_temperature, option_mask)
  return jnp.take_along_axis(table, choice[..., None, None], axis=-2)[..., 0, :]


def sample(
  key: chex.PRNGKey, utilities: chex.Array, inverse_temperature: chex.Array, option_mask: chex.Array
) -> chex.Array:
  """Draws a choice per type: utilities f32[..., L, K] -> i32[..., K]."""
  return jax.random.categorical(
    key, choice_logits(utilities, inverse_temperature, option_mask), axis=-2
  )


def trajectory_loglik(
  utilities: chex.Array, inverse_temperature: chex.Array, choices: types.Choices
) -> chex.Array:
  """log p(data_u | k) = Σ_t log P(c_t | slate_t, k): utilities f32[U, T, L, K] -> f32[U, K]."""
  per_turn = chosen_log_prob(utilities, inverse_temperature, choices.option_mask, choices.choice)
  return jnp.sum(jnp.where(choices.turn_mask[..., None], per_turn, 0.0), axis=1)
