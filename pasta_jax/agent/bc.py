"""Behaviour cloning of the logged choices: a prompt score g(h, p) (a `value.PromptValue`) trained
with the cross-entropy of softmax_j g(h, p_j) over each logged slate against the prompt the user
chose; the policy shows the top L candidates by g, at most one per category. Trained by `iql.fit`.
"""

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct
from flax.training import train_state

from pasta_jax import train_loop
from pasta_jax.agent import data, iql, value


@dataclasses.dataclass(frozen=True)
class BCSettings(train_loop.FromConfig):
  """config.agent.bc."""

  config_name = "agent.bc"
  learning_rate: float
  batch_size: int
  steps: int
  steps_per_dispatch: int
  checkpoint_every_steps: int


@struct.dataclass
class BCPolicy(value.ScorePolicy):
  """Top-L by g(h, p); params: `BCState.params`."""

  def network(self) -> nn.Module:
    return value.PromptValue(self.hidden, self.num_categories)


class BCState(train_state.TrainState):
  """The `PromptValue`'s TrainState (step: i32[] updates done) and key: raw PRNG key data of the
  batches."""

  key: chex.Array


def masked_logits(logits: chex.Array, slate_mask: chex.Array | None) -> chex.Array:
  """logits f32[B, L] with -inf on the padded options (slate_mask bool[B, L]; None: none padded)."""
  return logits if slate_mask is None else jnp.where(slate_mask, logits, -jnp.inf)


def choice_loss(
  logits: chex.Array, choice: chex.Array, slate_mask: chex.Array | None = None
) -> chex.Array:
  """mean_B -log softmax(logits)[choice] over each slate's real options: logits f32[B, L], choice
  i32[B], slate_mask bool[B, L] (None: every option is real) -> scalar."""
  log_p = jax.nn.log_softmax(masked_logits(logits, slate_mask), axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_p, choice[:, None], axis=-1))


@dataclasses.dataclass(frozen=True)
class BC:
  """The behaviour-cloning learner for `iql.fit`."""

  policy: BCPolicy
  settings: BCSettings
  name = "BC"

  def init(self, key: chex.PRNGKey, example: data.Transitions) -> BCState:
    k_params, k_run = jax.random.split(key)
    state = iql.new_train_state(
      k_params,
      self.policy.network(),
      iql.adam(self.settings.learning_rate),
      *iql.prompt_inputs(self.policy, example),
    )
    return BCState(**vars(state), key=jax.random.key_data(k_run))

  def update(
    self, state: BCState, batch: data.Transitions
  ) -> tuple[BCState, dict[str, chex.Array]]:
    """One Adam step on `choice_loss` (padded options have logit -inf); metrics: the loss and the
    share of batch choices g ranks first among the real options."""

    def loss(params):
      logits = state.apply_fn(params, *iql.prompt_inputs(self.policy, batch))
      logits = masked_logits(logits, batch.slate_mask)
      return choice_loss(logits, batch.choice), logits

    (loss_value, logits), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == batch.choice).astype(jnp.float32))
    return state.apply_gradients(grads=grads), {"loss": loss_value, "accuracy": accuracy}
