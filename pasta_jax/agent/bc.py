"""Behaviour cloning of the logged choices: a prompt score g(h, p) (a `value.PromptValue`) trained with the
cross-entropy of softmax_j g(h, p_j) over each logged slate against the prompt the user chose; the policy
shows the top L candidates by g, at most one per category. Trained by `iql.fit`."""

import dataclasses
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct

from pasta_jax.agent import data, iql, value


@dataclasses.dataclass(frozen=True)
class BCSettings:
  learning_rate: float
  batch_size: int
  steps: int
  steps_per_dispatch: int
  checkpoint_every_steps: int

  @classmethod
  def from_config(cls, bc: ml_collections.ConfigDict) -> "BCSettings":
    return cls(**{f.name: bc[f.name] for f in dataclasses.fields(cls)})


@struct.dataclass
class BCPolicy(value.ScorePolicy):
  """Top-L by g(h, p); params: `BCState.params`."""

  def network(self) -> nn.Module:
    return value.PromptValue(self.hidden, self.num_categories)


@struct.dataclass
class BCState:
  """params: `PromptValue` variables; opt_state: Adam's; step: i32[] updates done; key: raw PRNG key data."""

  params: Any
  opt_state: Any
  step: chex.Array
  key: chex.Array


def choice_loss(logits: chex.Array, choice: chex.Array) -> chex.Array:
  """mean_B -log softmax(logits)[choice]: logits f32[B, L], choice i32[B] -> scalar."""
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(log_p, choice[:, None], axis=-1))


@dataclasses.dataclass(frozen=True)
class BC:
  """The behaviour-cloning learner for `iql.fit`."""

  policy: BCPolicy
  settings: BCSettings
  config_name = "agent.bc"
  name = "BC"

  def _optimizer(self) -> optax.GradientTransformation:
    return optax.adam(self.settings.learning_rate)

  def init(self, key: chex.PRNGKey, example: data.Transitions) -> BCState:
    k_params, k_run = jax.random.split(key)
    params = value.init_variables(k_params, self.policy.network(), example.history, example.history_mask,
                                  example.turn, example.slate_text, example.slate_category)
    return BCState(params=params, opt_state=self._optimizer().init(params),
                   step=jnp.zeros((), jnp.int32), key=jax.random.key_data(k_run))

  def update(self, state: BCState, batch: data.Transitions) -> tuple[BCState, dict[str, chex.Array]]:
    """One Adam step on `choice_loss`; metrics: the loss and the share of batch choices g ranks first."""

    def loss(params):
      logits = self.policy.network().apply(params, batch.history, batch.history_mask, batch.turn,
                                           batch.slate_text, batch.slate_category)
      return choice_loss(logits, batch.choice), logits

    (loss_value, logits), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    params, opt_state = iql.optimizer_step(self._optimizer(), grads, state.opt_state, state.params)
    state = state.replace(params=params, opt_state=opt_state, step=state.step + 1)
    accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == batch.choice).astype(jnp.float32))
    return state, {"loss": loss_value, "accuracy": accuracy}


def train(settings: BCSettings, policy: BCPolicy, real: data.Transitions | None, sim: data.Transitions | None,
          data_mix: str, sim_fraction: float, key: chex.PRNGKey, mesh: jax.sharding.Mesh,
          checkpoint_dir: str | None = None, show_progress: bool = True,
          stop_after_step: int | None = None) -> tuple[BCState, dict[str, np.ndarray]]:
  """Behaviour cloning on batches of `data_mix` (see `data.mix_sources`); see `iql.fit`.

  The trained policy is `policy` with params `state.params`.
  """
  datasets, counts = data.mix_sources(data_mix, sim_fraction, settings.batch_size, real, sim)
  return iql.fit(BC(policy, settings), datasets, counts, key, mesh, checkpoint_dir, show_progress, stop_after_step)
