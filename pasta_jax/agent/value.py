"""The agent's networks over text features: the history encoding, a prompt value f(h, p) (single or twin),
a state value V(h), the slate value, and the greedy slate policy on a prompt score.

Shapes: H turns, D text feature width, L prompts scored together (a slate, or the L_C candidates), C
categories; `...` are leading batch axes shared by every input. A state h is (history f32[..., H + 1, D],
history_mask bool[..., H + 1], turn i32[...]); rows outside the mask are never read.
"""

import functools
from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from flax import struct

from pasta_jax.agent import slate

INPUTS = ("text", "images", "belief", "utilities")


def parse_inputs(spec: str) -> frozenset[str]:
  """The inputs named by a "+"-joined spec of `INPUTS` ("text+belief"); "text" is always read.

  text: the history's and candidates' text features, categories and the turn (the paper's agent);
  images: the candidates' image features averaged over their M images; belief: the belief model's
  posterior over types given the choices so far (`Observation.log_belief`); utilities: the belief
  model's per-type utility of each candidate. None of them is the user's true type."""
  names = spec.split("+")
  if "text" not in names or len(set(names)) != len(names) or not set(names) <= set(INPUTS):
    raise ValueError(f"inputs {spec!r}: distinct names from {INPUTS} joined by '+', with 'text'")
  return frozenset(names)


def history_features(history: chex.Array, history_mask: chex.Array, turn: chex.Array) -> chex.Array:
  """The encoding of a state h, the input of every network:
  [masked mean of the valid rows, row `turn` (the latest valid row), one-hot turn]: f32[..., 2D + H + 1]."""
  valid = history_mask[..., None]
  mean = jnp.sum(jnp.where(valid, history, 0.0), axis=-2) / jnp.maximum(
    jnp.sum(valid, axis=-2), 1
  ).astype(history.dtype)
  latest = jnp.take_along_axis(history, turn[..., None, None], axis=-2)[..., 0, :]
  return jnp.concatenate(
    [mean, latest, jax.nn.one_hot(turn, history.shape[-2], dtype=history.dtype)], axis=-1
  )


class MLP(nn.Module):
  """A scalar per row of the concatenation of `parts` (broadcast against each other), as a ReLU MLP of widths
  `hidden` and a linear output: f32[..., F_i] each -> f32[...].

  The first layer is a sum of one Dense per part (the same function, and initial distribution, as one Dense
  of the concatenation), so a part shared by many rows (a state scored with L prompts) is multiplied once,
  not once per row.
  """

  hidden: Sequence[int]

  @nn.compact
  def __call__(self, *parts: chex.Array) -> chex.Array:
    widths, fan_in = (*self.hidden, 1), sum(part.shape[-1] for part in parts)
    x = sum(
      nn.Dense(
        widths[0],
        use_bias=i == 0,
        name=f"input_{i}",
        kernel_init=nn.initializers.variance_scaling(
          part.shape[-1] / fan_in, "fan_in", "truncated_normal"
        ),
      )(part)
      for i, part in enumerate(parts)
    )
    for j, width in enumerate(widths[1:]):
      x = nn.Dense(width, name=f"layer_{j}")(nn.relu(x))
    return x[..., 0]


class PromptValue(nn.Module):
  """f(h, p) for L prompts p = (text f32[..., L, D], category i32[..., L]) in state h: f32[..., L], a ReLU MLP
  on [history_features(h), text, one-hot category]."""

  hidden: Sequence[int]
  num_categories: int

  @nn.compact
  def __call__(
    self,
    history: chex.Array,
    history_mask: chex.Array,
    turn: chex.Array,
    text: chex.Array,
    category: chex.Array,
  ) -> chex.Array:
    state = history_features(history, history_mask, turn)[..., None, :]
    return MLP(self.hidden)(
      state, text, jax.nn.one_hot(category, self.num_categories, dtype=text.dtype)
    )

  def score(self, history, history_mask, turn, text, category) -> chex.Array:
    """The policy's score of each prompt: f32[..., L]."""
    return self(history, history_mask, turn, text, category)


class TwinPromptValue(nn.Module):
  """Two independent `PromptValue`s (twin critics): f32[2, ..., L]."""

  hidden: Sequence[int]
  num_categories: int

  @nn.compact
  def __call__(
    self,
    history: chex.Array,
    history_mask: chex.Array,
    turn: chex.Array,
    text: chex.Array,
    category: chex.Array,
  ) -> chex.Array:
    twins = nn.vmap(
      PromptValue,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=None,
      out_axes=0,
      axis_size=2,
    )
    return twins(self.hidden, self.num_categories, name="twins")(
      history, history_mask, turn, text, category
    )

  def score(self, history, history_mask, turn, text, category) -> chex.Array:
    """The pessimistic (min over the twins) value of each prompt: f32[..., L]."""
    return jnp.min(self(history, history_mask, turn, text, category), axis=0)


def slate_value(prompt_values: chex.Array, slate_mask: chex.Array | None = None) -> chex.Array:
  """q(h, P) = mean of f(h, p) over the slate's real options: prompt_values f32[..., L], slate_mask
  bool[..., L] (None: every option is real) -> f32[...]."""
  if slate_mask is None:
    return jnp.mean(prompt_values, axis=-1)
  count = jnp.maximum(jnp.sum(slate_mask, axis=-1), 1).astype(prompt_values.dtype)
  return jnp.sum(jnp.where(slate_mask, prompt_values, 0.0), axis=-1) / count


class StateValue(nn.Module):
  """V(h): f32[...], a ReLU MLP on history_features(h)."""

  hidden: Sequence[int]

  @nn.compact
  def __call__(self, history: chex.Array, history_mask: chex.Array, turn: chex.Array) -> chex.Array:
    return MLP(self.hidden)(history_features(history, history_mask, turn))


@functools.partial(jax.jit, static_argnums=1)
def init_variables(key: chex.PRNGKey, network: nn.Module, *inputs: chex.Array):
  """`network.init(key, *inputs)`, compiled once per network and input shapes."""
  return network.init(key, *inputs)


@struct.dataclass
class ScorePolicy:
  """Shows the top `slate_size` candidates by `network().score`, at most one per category.

  A subclass names its network; called as `policy(key, obs: simulator.Observation, params) -> i32[L]` with
  params the network's variables (hashable and static, so `simulator.run` can take it).
  """

  hidden: tuple[int, ...] = struct.field(pytree_node=False)
  num_categories: int = struct.field(pytree_node=False)
  slate_size: int = struct.field(pytree_node=False)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ScorePolicy":
    """Widths from config.agent.hidden; categories and slate size from config.interaction."""
    return cls(
      hidden=tuple(config.agent.hidden),
      num_categories=len(config.interaction.categories),
      slate_size=config.interaction.slate_size,
    )

  def network(self) -> nn.Module:
    raise NotImplementedError

  def scores(self, params, obs) -> chex.Array:
    """f32[L_C] score of every candidate of `obs`."""
    return self.network().apply(
      params,
      obs.history,
      obs.history_mask,
      obs.turn,
      obs.candidate_text,
      obs.category,
      method="score",
    )

  def __call__(self, key: chex.PRNGKey, obs, params) -> chex.Array:
    del key
    return slate.select_slate(
      self.scores(params, obs), obs.category, self.num_categories, self.slate_size
    )
