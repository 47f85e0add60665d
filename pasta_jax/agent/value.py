"""The agent's networks: the history encoding, a prompt value f(h, p) (single or twin), a state value
V(h), the slate value, and the greedy slate policy on a prompt score.

Shapes: H turns, D feature width, L prompts scored together (a slate, or the L_C candidates), C
categories, K belief types; `...` are leading batch axes shared by every input. A state h is (history
f32[..., H + 1, D], history_mask bool[..., H + 1], turn i32[...]) and, when the policy reads them, the
belief f32[..., K] and the pooled images of the option chosen at each turn f32[..., H, D] (row t read
while history_mask[..., t + 1]); rows outside the mask are never read. A prompt is (text
f32[..., L, D], category i32[..., L]) and, when the policy reads them, its image features pooled over
its images f32[..., L, D].
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
from pasta_jax.user_model import utility

INPUTS = ("text", "images", "belief", "chosen_images", "utilities")
# What IQL and BC can read (config.agent.inputs).
OFFLINE_INPUTS = ("text", "images", "belief", "chosen_images")
TEXT = frozenset({"text"})


def parse_inputs(spec: str, allowed: Sequence[str] = INPUTS) -> frozenset[str]:
  """The inputs named by a "+"-joined spec of `INPUTS` ("text+belief"); "text" is always read.

  text: the history's and candidates' text features, categories and the turn (the paper's agent);
  images: the candidates' image features averaged over their M images; belief: the belief model's
  posterior over types given the choices so far (`Observation.log_belief`); chosen_images: the
  image features of the option chosen at each turn so far, averaged over its real images
  (`Observation.history_images`); utilities: the belief model's per-type utility of each
  candidate. None of them is the user's true type. `allowed`: the names this learner can read."""
  names = spec.split("+")
  if "text" not in names or len(set(names)) != len(names) or not set(names) <= set(allowed):
    raise ValueError(
      f"inputs {spec!r}: distinct names from {tuple(allowed)} joined by '+', with 'text'"
    )
  return frozenset(names)


def pooled_images(images: chex.Array, image_mask: chex.Array | None = None) -> chex.Array:
  """Each prompt's image features averaged over its real images: images f32[..., M, D], image_mask
  bool[..., M] (None: every image is real) -> f32[..., D]."""
  mask = None if image_mask is None else image_mask[..., None]
  return utility.aggregate(images, "mean", axis=-2, mask=mask)


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


def chosen_image_features(
  history_images: chex.Array, history_mask: chex.Array, turn: chex.Array
) -> chex.Array:
  """The encoding of the images chosen so far, history_images f32[..., H, D] (row t: the pooled images
  of the option chosen at turn t) at the turns played (history_mask[..., 1:]): [their mean, row
  turn - 1 (the latest)], zeros at turn 0: f32[..., 2D]."""
  played = history_mask[..., 1:]
  mean = utility.aggregate(history_images, "mean", axis=-2, mask=played[..., None])
  previous = jnp.maximum(turn - 1, 0)[..., None, None]
  latest = jnp.take_along_axis(history_images, previous, axis=-2)[..., 0, :]
  return jnp.concatenate([mean, jnp.where(turn[..., None] > 0, latest, 0.0)], axis=-1)


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


def state_parts(
  history: chex.Array,
  history_mask: chex.Array,
  turn: chex.Array,
  belief: chex.Array | None = None,
  history_images: chex.Array | None = None,
) -> list[chex.Array]:
  """The state's inputs of every network: [history_features(h)], then the belief f32[..., K] and
  chosen_image_features(history_images f32[..., H, D]) of those that are given (read)."""
  parts = [history_features(history, history_mask, turn)] + ([] if belief is None else [belief])
  if history_images is not None:
    parts.append(chosen_image_features(history_images, history_mask, turn))
  return parts


class PromptValue(nn.Module):
  """f(h, p) for L prompts p = (text f32[..., L, D], category i32[..., L]) in state h: f32[..., L], a ReLU MLP
  on [state_parts(h), text, one-hot category, images] (belief f32[..., K], the chosen options' pooled
  images history_images f32[..., H, D] and the prompts' pooled images f32[..., L, D] only when
  given)."""

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
    belief: chex.Array | None = None,
    history_images: chex.Array | None = None,
    images: chex.Array | None = None,
  ) -> chex.Array:
    parts = state_parts(history, history_mask, turn, belief, history_images)
    state = [part[..., None, :] for part in parts]
    prompt = [text, jax.nn.one_hot(category, self.num_categories, dtype=text.dtype)]
    return MLP(self.hidden)(*state, *prompt, *([] if images is None else [images]))

  def score(self, *inputs: chex.Array | None) -> chex.Array:
    """The policy's score of each prompt: f32[..., L]."""
    return self(*inputs)


class TwinPromptValue(nn.Module):
  """Two independent `PromptValue`s (twin critics): f32[2, ..., L]."""

  hidden: Sequence[int]
  num_categories: int

  @nn.compact
  def __call__(self, *inputs: chex.Array | None) -> chex.Array:
    """`inputs`: those of `PromptValue`, in its order."""
    twins = nn.vmap(
      PromptValue,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      in_axes=None,
      out_axes=0,
      axis_size=2,
    )
    return twins(self.hidden, self.num_categories, name="twins")(*inputs)

  def score(self, *inputs: chex.Array | None) -> chex.Array:
    """The pessimistic (min over the twins) value of each prompt: f32[..., L]."""
    return jnp.min(self(*inputs), axis=0)


def slate_value(prompt_values: chex.Array, slate_mask: chex.Array | None = None) -> chex.Array:
  """q(h, P) = mean of f(h, p) over the slate's real options: prompt_values f32[..., L], slate_mask
  bool[..., L] (None: every option is real) -> f32[...]."""
  if slate_mask is None:
    return jnp.mean(prompt_values, axis=-1)
  count = jnp.maximum(jnp.sum(slate_mask, axis=-1), 1).astype(prompt_values.dtype)
  return jnp.sum(jnp.where(slate_mask, prompt_values, 0.0), axis=-1) / count


class StateValue(nn.Module):
  """V(h): f32[...], a ReLU MLP on state_parts(h) (belief f32[..., K] and history_images
  f32[..., H, D] only when given)."""

  hidden: Sequence[int]

  @nn.compact
  def __call__(
    self,
    history: chex.Array,
    history_mask: chex.Array,
    turn: chex.Array,
    belief: chex.Array | None = None,
    history_images: chex.Array | None = None,
  ) -> chex.Array:
    return MLP(self.hidden)(*state_parts(history, history_mask, turn, belief, history_images))


@functools.partial(jax.jit, static_argnums=1)
def init_variables(key: chex.PRNGKey, network: nn.Module, *inputs: chex.Array):
  """`network.init(key, *inputs)`, compiled once per network and input shapes."""
  return network.init(key, *inputs)


def _read(
  inputs: frozenset[str], name: str, value: chex.Array | None, field: str
) -> chex.Array | None:
  """`value` (the data's `field`) when `inputs` names `name`, else None; a ValueError when it is read
  but missing."""
  if name not in inputs:
    return None
  if value is None:
    raise ValueError(
      f"the policy reads {name!r} (config.agent.inputs) but its data has no '{field}': build the "
      "transitions with agent/data.py's inputs (transitions_from_sessions / _trajectories) and the "
      "observations with simulator.observe"
    )
  return value


@struct.dataclass
class ScorePolicy:
  """Shows the top `slate_size` candidates by `network().score`, at most one per category.

  A subclass names its network; called as `policy(key, obs: simulator.Observation, params) -> i32[L]` with
  params the network's variables (hashable and static, so `simulator.run` can take it). `inputs` (a
  subset of `OFFLINE_INPUTS`) names what the networks read besides the text: the belief
  exp(log_belief), the pooled image features of the option chosen at each turn so far and those of
  each prompt, from the observation when acting and from the transitions' `log_belief`,
  `next_log_belief`, `history_images` and `slate_images` when training.
  """

  hidden: tuple[int, ...] = struct.field(pytree_node=False)
  num_categories: int = struct.field(pytree_node=False)
  slate_size: int = struct.field(pytree_node=False)
  inputs: frozenset[str] = struct.field(pytree_node=False, default=TEXT)

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, inputs: str = "text") -> "ScorePolicy":
    """Widths from config.agent.hidden; categories and slate size from config.interaction; `inputs`
    a "+"-joined spec of `OFFLINE_INPUTS`."""
    return cls(
      hidden=tuple(config.agent.hidden),
      num_categories=len(config.interaction.categories),
      slate_size=config.interaction.slate_size,
      inputs=parse_inputs(inputs, OFFLINE_INPUTS),
    )

  def network(self) -> nn.Module:
    raise NotImplementedError

  def state_inputs(
    self, log_belief: chex.Array | None, history_images: chex.Array | None
  ) -> tuple[chex.Array | None, chex.Array | None]:
    """(belief f32[..., K], the chosen options' pooled images f32[..., H, D]) as the networks read
    them (None when not read), from log_belief and history_images."""
    log_belief = _read(self.inputs, "belief", log_belief, "log_belief")
    return (
      None if log_belief is None else jnp.exp(log_belief),
      _read(self.inputs, "chosen_images", history_images, "history_images"),
    )

  def prompt_inputs(
    self,
    log_belief: chex.Array | None,
    history_images: chex.Array | None,
    images: chex.Array | None,
  ) -> tuple[chex.Array | None, chex.Array | None, chex.Array | None]:
    """(belief, chosen options' pooled images, prompts' pooled images f32[..., L, D]) as the prompt
    networks read them (None when not read)."""
    pooled = _read(self.inputs, "images", images, "slate_images")
    return self.state_inputs(log_belief, history_images) + (pooled,)

  def scores(self, params, obs) -> chex.Array:
    """f32[L_C] score of every candidate of `obs`, its images pooled as `pooled_images` pools them."""
    images, chosen = (
      None if x is None else pooled_images(x)
      for x in (
        _read(self.inputs, "images", obs.candidate_images, "candidate_images"),
        _read(self.inputs, "chosen_images", obs.history_images, "history_images"),
      )
    )
    return self.network().apply(
      params,
      obs.history,
      obs.history_mask,
      obs.turn,
      obs.candidate_text,
      obs.category,
      *self.prompt_inputs(obs.log_belief, chosen, images),
      method="score",
    )

  def __call__(self, key: chex.PRNGKey, obs, params) -> chex.Array:
    del key
    return slate.select_slate(
      self.scores(params, obs), obs.category, self.num_categories, self.slate_size
    )
