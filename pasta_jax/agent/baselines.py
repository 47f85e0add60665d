"""Baseline slate policies. A policy is a hashable (static) object called as
`policy(key, obs: simulator.Observation, params) -> i32[L]` candidate indices."""

import chex
import jax
import jax.numpy as jnp
from flax import struct

from pasta_jax.agent import slate


@struct.dataclass
class RandomSlate:
  """L distinct categories at random, a random candidate of each (the synthetic world's logging policy)."""

  num_categories: int = struct.field(pytree_node=False)
  slate_size: int = struct.field(pytree_node=False)

  def __call__(self, key: chex.PRNGKey, obs, params=None) -> chex.Array:
    del params
    scores = jax.random.uniform(key, obs.category.shape)
    return slate.select_slate(scores, obs.category, self.num_categories, self.slate_size)


@struct.dataclass
class GeneratorOrder:
  """The generator's own order: the first candidate of each category, earliest categories first."""

  num_categories: int = struct.field(pytree_node=False)
  slate_size: int = struct.field(pytree_node=False)

  def __call__(self, key: chex.PRNGKey, obs, params=None) -> chex.Array:
    del key, params
    scores = -jnp.arange(obs.category.shape[0], dtype=jnp.float32)
    return slate.select_slate(scores, obs.category, self.num_categories, self.slate_size)
