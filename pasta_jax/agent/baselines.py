"""Baseline slate policies: `simulator.Policy`s called as `policy(key, obs, params) -> i32[L]` candidate
indices, and the oracle, a `simulator.PrivilegedPolicy` that reads the user's true type from the state."""

import chex
import jax
import jax.numpy as jnp
from flax import struct

from pasta_jax import simulator
from pasta_jax.agent import slate


@struct.dataclass
class RandomSlate:
  """L distinct categories at random, a random candidate of each (the synthetic world's logging policy)."""

  num_categories: int = struct.field(pytree_node=False)
  slate_size: int = struct.field(pytree_node=False)

  def __call__(self, key: chex.PRNGKey, obs: simulator.Observation, params=None) -> chex.Array:
    del params
    scores = jax.random.uniform(key, obs.category.shape)
    return slate.select_slate(scores, obs.category, self.num_categories, self.slate_size)


@struct.dataclass
class GeneratorOrder:
  """The generator's own order: the first candidate of each category, earliest categories first."""

  num_categories: int = struct.field(pytree_node=False)
  slate_size: int = struct.field(pytree_node=False)

  def __call__(self, key: chex.PRNGKey, obs: simulator.Observation, params=None) -> chex.Array:
    del key, params
    scores = -jnp.arange(obs.category.shape[0], dtype=jnp.float32)
    return slate.select_slate(scores, obs.category, self.num_categories, self.slate_size)


def _expected_utility(
  users: simulator.UserModel | simulator.TabulatedUserModel,
  obs: simulator.Observation,
  weights: chex.Array,
) -> chex.Array:
  """Σ_k weights_k · R^k(candidate) for every candidate: f32[L_C]."""
  utilities, _ = simulator.candidate_utilities(users, obs)  # [L_C, K]
  return utilities @ weights


@struct.dataclass
class Greedy:
  """Top-L (one per category) by expected utility under the current type posterior; params: the fitted
  users (`utility.FittedUsers`, or their `utility.UtilityTable` over a pooled generator), i.e. the belief
  model."""

  num_categories: int = struct.field(pytree_node=False)
  slate_size: int = struct.field(pytree_node=False)

  def __call__(
    self,
    key: chex.PRNGKey,
    obs: simulator.Observation,
    users: simulator.UserModel | simulator.TabulatedUserModel,
  ) -> chex.Array:
    del key
    scores = _expected_utility(users, obs, jnp.exp(obs.log_belief))
    return slate.select_slate(scores, obs.category, self.num_categories, self.slate_size)


@struct.dataclass
class Oracle:
  """Top-L (one per category) by the true user's own utility: an upper bound. A privileged policy: it reads
  the user's type from the environment's state; params: the responding users' model (the simulator's
  `users`), which the oracle knows."""

  num_categories: int = struct.field(pytree_node=False)
  slate_size: int = struct.field(pytree_node=False)

  def act_with_state(
    self,
    key: chex.PRNGKey,
    state: simulator.EnvState,
    users: simulator.UserModel | simulator.TabulatedUserModel,
  ) -> chex.Array:
    del key
    obs = state.obs
    num_types = users.log_priors.shape[-1]
    scores = _expected_utility(users, obs, jax.nn.one_hot(state.user_type, num_types))
    return slate.select_slate(scores, obs.category, self.num_categories, self.slate_size)
