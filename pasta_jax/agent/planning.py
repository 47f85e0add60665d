"""A planning baseline: the slate that maximises expected utility plus the value of the information
its choice brings, by one-step lookahead under the type belief of the fitted user model.

For a slate S of candidates with fitted utilities u[c, k] (the belief model's), inverse temperature
τ and belief b, the user picks column i with P_b(i | S) = Σ_k b_k softmax_i(τ u[S, k]). Its value is

  Q(S) = Σ_k b_k Σ_i P(i | S, k) u[S_i, k] + γ · Σ_i P_b(i | S) · V(b'_i),

where b'_i is the posterior after the user picks column i (exact over the L columns) and V(b) is
the expected chosen utility of the greedy slate under b on this turn's candidates (the proxy for the
next turn's, which the belief model cannot foresee). Σ_i P_b(i | S) V(b'_i) - V(b) >= 0 is the value
of information of showing S. Under `final_turn` rewards the immediate term counts on the last turn
only; the lookahead term never counts on the last turn. The slate is built column by column: each
column adds the candidate of an unused category that maximises Q of the partial slate.
"""

import chex
import jax
import jax.numpy as jnp
from flax import struct

from pasta_jax import simulator
from pasta_jax.agent import slate
from pasta_jax.user_model import choice, posterior


def expected_choice_utility(
  utilities: chex.Array, tau: chex.Array, belief: chex.Array, mask: chex.Array
) -> chex.Array:
  """Σ_k b_k Σ_i P(i | S, k) u[i, k]: utilities f32[L, K], belief f32[K], mask bool[L] -> f32[]."""
  probs = jnp.exp(choice.log_prob(utilities, tau, mask))  # [L, K]
  return jnp.sum(jnp.where(mask[:, None], probs * utilities, 0.0) @ belief)


def belief_value(
  log_belief: chex.Array,
  utilities: chex.Array,
  tau: chex.Array,
  category: chex.Array,
  num_categories: int,
  slate_size: int,
) -> chex.Array:
  """V(b): the expected chosen utility of the greedy slate under b (log_belief f32[K]) among the
  candidates (utilities f32[L_C, K], category i32[L_C]): f32[]."""
  belief = jnp.exp(log_belief)
  greedy = slate.select_slate(utilities @ belief, category, num_categories, slate_size)
  return expected_choice_utility(utilities[greedy], tau, belief, jnp.ones((slate_size,), bool))


def slate_q(
  columns: chex.Array,
  mask: chex.Array,
  log_belief: chex.Array,
  utilities: chex.Array,
  tau: chex.Array,
  category: chex.Array,
  num_categories: int,
  immediate_weight: chex.Array,
  lookahead_weight: chex.Array,
) -> chex.Array:
  """Q of the slate of candidates `columns` i32[L] where `mask` bool[L] (a partial slate): f32[]."""
  shown = utilities[columns]  # [L, K]
  belief = jnp.exp(log_belief)
  now = expected_choice_utility(shown, tau, belief, mask)
  chosen = jnp.arange(columns.shape[0])
  after = jax.vmap(posterior.update, in_axes=(None, None, None, None, 0))(
    log_belief, shown, tau, mask, chosen
  )  # [L, K]
  later = jax.vmap(belief_value, in_axes=(0, None, None, None, None, None))(
    after, utilities, tau, category, num_categories, columns.shape[0]
  )
  predictive = jnp.exp(posterior.predictive_log_prob(log_belief, shown, tau, mask))
  lookahead = jnp.sum(jnp.where(mask, predictive * later, 0.0))
  return immediate_weight * now + lookahead_weight * lookahead


def plan_slate(
  log_belief: chex.Array,
  utilities: chex.Array,
  tau: chex.Array,
  category: chex.Array,
  num_categories: int,
  slate_size: int,
  immediate_weight: chex.Array,
  lookahead_weight: chex.Array,
) -> chex.Array:
  """The slate i32[L] built column by column, each the candidate of an unused category that
  maximises `slate_q` of the partial slate."""
  num_candidates = category.shape[0]
  candidates = jnp.arange(num_candidates)

  def add_column(j, columns):
    filled = (jnp.arange(slate_size) < j)[:, None]
    used = jnp.any(filled & (category[columns][:, None] == jnp.arange(num_categories)), axis=0)
    mask = jnp.arange(slate_size) <= j

    def q_with(c):
      return slate_q(
        columns.at[j].set(c),
        mask,
        log_belief,
        utilities,
        tau,
        category,
        num_categories,
        immediate_weight,
        lookahead_weight,
      )

    q = jnp.where(used[category], -jnp.inf, jax.vmap(q_with)(candidates))
    return columns.at[j].set(jnp.argmax(q))

  return jax.lax.fori_loop(0, slate_size, add_column, jnp.zeros((slate_size,), jnp.int32))


@struct.dataclass
class Planner:
  """The lookahead planning baseline; params: the belief model (fitted users or their table), as
  for `baselines.Greedy`. discount: γ of the lookahead term; final_turn_reward: only the last
  turn's utility is rewarded."""

  num_categories: int = struct.field(pytree_node=False)
  slate_size: int = struct.field(pytree_node=False)
  discount: float = struct.field(pytree_node=False)
  final_turn_reward: bool = struct.field(pytree_node=False, default=False)

  def __call__(self, key: chex.PRNGKey, obs: simulator.Observation, users) -> chex.Array:
    del key
    utilities, tau = simulator.candidate_utilities(users, obs)
    last = obs.turn >= obs.history_mask.shape[0] - 2
    immediate = jnp.where(last | (not self.final_turn_reward), 1.0, 0.0)
    lookahead = jnp.where(last, 0.0, self.discount)
    return plan_slate(
      obs.log_belief,
      utilities,
      tau,
      obs.category,
      self.num_categories,
      self.slate_size,
      immediate,
      lookahead,
    )
