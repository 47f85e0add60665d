"""Per-type utility heads on CLIP (or synthetic) features, aggregated over a prompt's M images.

s_θ(k, p, I) = head_k(trunk([z(x_I), z(x_p)])), R^k(p) = Agg_m s_θ(k, p, I_m). The shared trunk is an
MLP (none when `hidden` is empty: the heads are then linear in the features); the K heads are one Dense
without bias: a per-type constant cancels in the softmax over the slate, so it would be unidentified.

z standardises each feature, z(x) = (x - mean) / scale, when `standardize` is set: real attributes
come in very different scales (a price in cents next to 0/1 flags), which stalls the M-step's
optimisers. The statistics (`FeatureStats`, from the training users' options: `feature_stats`) are
set at `init` and live in the model's variables as the non-trainable collection "feature_stats", so
every `apply` standardises and a saved fitted model carries them; optimisers update the "params"
collection only (`trainable`).
"""

import dataclasses
import functools
import os
from collections.abc import Sequence
from typing import Any

import chex
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jax.scipy.special as jsp
import ml_collections
import numpy as np
from flax import struct, traverse_util

from pasta_jax import types
from pasta_jax.config_checks import (
  check,
  check_positive_int,
  check_real,
  check_widths,
  fitted_model_problem,
  num_training_users,
  training_users_text,
)

ACTIVATIONS = {"gelu": nn.gelu, "relu": nn.relu, "tanh": jnp.tanh, "linear": lambda x: x}
AGGREGATIONS = ("mean", "max", "logsumexp")
STATS = "feature_stats"
TRAINABLE = "params"


def _validate_values(config: ml_collections.ConfigDict) -> None:
  """The `user_model` block's values and sizes (user_model/utility.py): a finite temperature, a bool
  text switch, no more types than training users, and `init_from` a fitted model."""
  um = config.user_model
  check_real(config, "user_model.init_inverse_temperature", above=0)
  for field in ("use_text_features", "standardize"):
    check(isinstance(um[field], bool), f"user_model.{field}", um[field], "must be True or False")
  users = num_training_users(config)
  check(
    users is None or um.num_types <= users,
    "user_model.num_types",
    um.num_types,
    f"must not exceed {training_users_text(config)}",
  )
  problem = fitted_model_problem(um.init_from) if um.init_from else None
  check(
    problem is None,
    "user_model.init_from",
    um.init_from,
    f"{problem}; must be '' or a fitted model's directory (pretraining's WORKDIR/fitted/k<K> or a "
    "user_model stage's user_model/fitted)",
  )


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first invalid `user_model` field."""
  _validate_values(config)
  um = config.user_model
  check_positive_int(config, "user_model.num_types")
  check_widths(um.hidden, "user_model.hidden")
  check(
    um.activation in ACTIVATIONS,
    "user_model.activation",
    um.activation,
    f"one of {tuple(ACTIVATIONS)}",
  )
  check(
    um.aggregation in AGGREGATIONS,
    "user_model.aggregation",
    um.aggregation,
    f"one of {AGGREGATIONS}",
  )
  check(
    um.init_inverse_temperature > 0,
    "user_model.init_inverse_temperature",
    um.init_inverse_temperature,
    "must be > 0",
  )
  check(
    isinstance(um.init_from, str) and (not um.init_from or os.path.isdir(um.init_from)),
    "user_model.init_from",
    um.init_from,
    "must be '' or the directory of a saved fitted model (pretraining's WORKDIR/fitted/k<K>)",
  )
  check(
    isinstance(_standardize(config), bool),
    "user_model.standardize",
    _standardize(config),
    "must be True or False",
  )


def _standardize(config: ml_collections.ConfigDict) -> Any:
  """`user_model.standardize`; True in a config written before the field existed."""
  return config.user_model.get("standardize", True)


def aggregate(
  scores: chex.Array, how: str, axis: int, mask: chex.Array | None = None
) -> chex.Array:
  """Aggregates per-image scores over `axis` (the M images): mean, max, or logsumexp - log M.

  `mask` (bool, broadcastable to `scores`) marks the real images: the aggregate is over them alone
  (M their count), and 0 where there is none (a padded option, masked by the choice model).
  """
  if mask is None:
    if how == "mean":
      return jnp.mean(scores, axis=axis)
    if how == "max":
      return jnp.max(scores, axis=axis)
    if how == "logsumexp":
      return jsp.logsumexp(scores, axis=axis) - np.log(scores.shape[axis])
  elif how in AGGREGATIONS:
    mask = jnp.broadcast_to(mask, scores.shape)
    count = jnp.sum(mask, axis=axis)
    some = jnp.expand_dims(count > 0, axis)
    # A row without real images is filled with zeros (finite, so its gradient is too), then dropped.
    empty = 0.0 if how == "mean" else jnp.where(some, -jnp.inf, 0.0)
    filled = jnp.where(mask, scores, empty)
    if how == "mean":
      out = jnp.sum(filled, axis=axis) / jnp.maximum(count, 1)
    elif how == "max":
      out = jnp.max(filled, axis=axis)
    else:
      out = jsp.logsumexp(filled, axis=axis) - jnp.log(jnp.maximum(count, 1))
    return jnp.where(count > 0, out, 0.0)
  raise ValueError(f"unknown aggregation {how!r}; expected one of {AGGREGATIONS}")


@struct.dataclass
class FeatureStats:
  """Per-feature location and scale a model standardises its inputs with: z(x) = (x - mean) / scale.

  image_mean, image_scale: f32[D_i]; text_mean, text_scale: f32[D_t]. Scales are > 0.
  """

  image_mean: chex.Array
  image_scale: chex.Array
  text_mean: chex.Array
  text_scale: chex.Array

  @classmethod
  def identity(cls, image_dim: int, text_dim: int) -> "FeatureStats":
    """Mean 0, scale 1: z(x) = x."""
    zeros, ones = jnp.zeros, jnp.ones
    return cls(zeros(image_dim), ones(image_dim), zeros(text_dim), ones(text_dim))


def _weighted_moments(rows: chex.Array, weights: chex.Array) -> tuple[chex.Array, chex.Array]:
  """(mean, scale) f32[D] of rows f32[N, D] under weights f32[N] (sum > 0); a feature whose standard
  deviation is below 1e-6 (1 + |mean|), a constant, gets scale 1."""
  weights = weights / jnp.sum(weights)
  mean = weights @ rows
  std = jnp.sqrt(jnp.sum(weights[:, None] * jnp.square(rows - mean), axis=0))
  return mean, jnp.where(std > 1e-6 * (1 + jnp.abs(mean)), std, 1.0)


@jax.jit
def feature_stats(table: types.FeatureTable, choices: types.Choices) -> FeatureStats:
  """The statistics of the features real users were shown: every image and prompt row weighted by
  how often it appears among the real images of real options of real turns of real users (padding
  excluded)."""
  shown = choices.option_mask & choices.turn_mask[..., None] & choices.user_mask[:, None, None]
  shown_images = jnp.broadcast_to(shown[..., None], choices.image_rows.shape)
  if choices.image_mask is not None:
    shown_images = shown_images & choices.image_mask
  image_counts = (
    jnp.zeros(table.image.shape[0]).at[choices.image_rows].add(shown_images.astype(jnp.float32))
  )
  text_counts = jnp.zeros(table.text.shape[0]).at[choices.text_rows].add(shown.astype(jnp.float32))
  image_mean, image_scale = _weighted_moments(table.image, image_counts)
  text_mean, text_scale = _weighted_moments(table.text, text_counts)
  return FeatureStats(image_mean, image_scale, text_mean, text_scale)


def trainable(variables) -> Any:
  """The "params" collection of a model's variables: what optimisers update."""
  return variables[TRAINABLE]


def with_trainable(variables, params) -> Any:
  """`variables` with its "params" collection replaced by `params`."""
  return {**variables, TRAINABLE: params}


class PartsDense(nn.Module):
  """nn.Dense (same parameters, same initialisation) on the concatenation [image, text] of per-image and
  per-prompt features, without forming it: the text part is multiplied once per prompt, not once per image.

  image f32[R, M, D_i], text f32[R, D_t] (D_t may be 0) -> f32[R, M, features].
  """

  features: int
  use_bias: bool = True

  @nn.compact
  def __call__(self, image: chex.Array, text: chex.Array) -> chex.Array:
    rows, images, image_dim = image.shape
    kernel = self.param(
      "kernel",
      nn.initializers.lecun_normal(),
      (image_dim + text.shape[-1], self.features),
      jnp.float32,
    )
    y = (image.reshape(rows * images, image_dim) @ kernel[:image_dim]).reshape(rows, images, -1)
    if text.shape[-1]:
      y = y + (text @ kernel[image_dim:])[:, None, :]
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    return y


class UtilityModel(nn.Module):
  """Maps option features to per-type utilities and the choice model's inverse temperature τ.

  Every Dense runs on 2-D rows (options × images flattened), and the first layer is split by input part
  (`PartsDense`); parameters are those of Dense layers on the concatenated features. With
  `standardize`, the features are standardised first by the "feature_stats" variables (see the
  module docstring).
  """

  num_types: int
  hidden: Sequence[int] = (256,)
  activation: str = "gelu"
  aggregation: str = "mean"
  use_text_features: bool = True
  init_inverse_temperature: float = 1.0
  standardize: bool = False

  @nn.compact
  def __call__(
    self, options: types.OptionFeatures, feature_stats: FeatureStats | None = None
  ) -> tuple[chex.Array, chex.Array]:
    """options.image f32[..., L, M, D], options.text f32[..., L, D] -> (utilities f32[..., L, K], τ f32[]);
    an option's utility aggregates the scores of its real images (`options.image_mask`).

    `feature_stats` are stored at `init` (identity when None) and ignored by `apply`, which reads
    the stored ones.
    """
    image, text = options.image, options.text
    if self.standardize:
      stats = self._stats(feature_stats, image.shape[-1], text.shape[-1])
      image = (image - stats.image_mean) / stats.image_scale
      if self.use_text_features:
        text = (text - stats.text_mean) / stats.text_scale
    batch, images = image.shape[:-2], image.shape[-2]
    image = image.reshape((-1, images, image.shape[-1]))
    text = text if self.use_text_features else text[..., :0]
    text = jnp.broadcast_to(text, batch + text.shape[-1:]).reshape((image.shape[0], -1))
    names = [f"trunk_{i}" for i in range(len(self.hidden))] + ["heads"]
    widths = list(self.hidden) + [self.num_types]
    x = PartsDense(widths[0], use_bias=bool(self.hidden), name=names[0])(image, text)
    x = x.reshape((-1, widths[0]))
    for name, width in zip(names[1:], widths[1:]):
      x = nn.Dense(width, use_bias=name != "heads", name=name)(ACTIVATIONS[self.activation](x))
    scores = x.reshape(batch + (images, self.num_types))
    log_tau = self.param(
      "log_inverse_temperature", nn.initializers.constant(np.log(self.init_inverse_temperature)), ()
    )
    mask = None if options.image_mask is None else options.image_mask[..., None]
    return aggregate(scores, self.aggregation, axis=-2, mask=mask), jnp.exp(log_tau)

  def _stats(self, given: FeatureStats | None, image_dim: int, text_dim: int) -> FeatureStats:
    """The "feature_stats" variables, initialised from `given` (identity when None)."""
    given = FeatureStats.identity(image_dim, text_dim) if given is None else given
    as_f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    return FeatureStats(
      **{
        field.name: self.variable(STATS, field.name, as_f32, getattr(given, field.name)).value
        for field in dataclasses.fields(given)
      }
    )


def example_options(feature_dim: int) -> types.OptionFeatures:
  """One option of one image (image f32[1, 1, D], text f32[1, D]) of width `feature_dim`: enough to
  build a model's variables, whose shapes do not depend on the slate's sizes."""
  return types.OptionFeatures(
    image=jnp.zeros((1, 1, feature_dim), jnp.float32),
    text=jnp.zeros((1, feature_dim), jnp.float32),
  )


@struct.dataclass
class FittedUsers:
  """A fitted user model: the simulator's responders and the agent's belief (`simulator.UserModel`)."""

  model: UtilityModel = struct.field(pytree_node=False)
  params: Any
  log_priors: chex.Array  # f32[K]

  def utilities(
    self, images: chex.Array, text: chex.Array, image_mask: chex.Array | None = None
  ) -> tuple[chex.Array, chex.Array]:
    """images f32[..., L, M, D], text f32[..., L, D], image_mask bool[..., L, M] (None: every image
    is real) -> (utilities f32[..., L, K], τ)."""
    return self.model.apply(
      self.params, types.OptionFeatures(image=images, text=text, image_mask=image_mask)
    )


@struct.dataclass
class UtilityTable:
  """A fitted model's scores precomputed for a pool of images: the simulator's fast path
  (`simulator.TabulatedUserModel`) when scores depend on the image only (`use_text_features=False`), so
  R^k(p) = Agg_m scores[row_m, k].

  scores: f32[N_img, K]; log_priors: f32[K]; inverse_temperature: f32[].
  """

  scores: chex.Array
  log_priors: chex.Array
  inverse_temperature: chex.Array
  aggregation: str = struct.field(pytree_node=False)

  def utilities_at(self, rows: chex.Array) -> tuple[chex.Array, chex.Array]:
    """rows i32[..., L, M] of the pool -> (utilities f32[..., L, K], τ)."""
    return aggregate(self.scores[rows], self.aggregation, axis=-2), self.inverse_temperature


def can_tabulate(users: Any) -> bool:
  """Whether `users` are fitted users whose utilities depend on the image alone (`tabulate` applies)."""
  return isinstance(users, FittedUsers) and not users.model.use_text_features


@functools.partial(jax.jit, static_argnames="batch_size")
def _score_pool(
  fitted: FittedUsers, image: chex.Array, batch_size: int
) -> tuple[chex.Array, chex.Array]:
  """(scores f32[N_img, K], τ) of every image f32[N_img, D], `batch_size` images per step."""
  num_images, dim = image.shape
  padded = jnp.pad(image, ((0, -num_images % batch_size), (0, 0))).reshape(-1, batch_size, dim)
  no_text = jnp.zeros((batch_size, 1, 0), image.dtype)

  def score(x: chex.Array) -> tuple[chex.Array, chex.Array]:
    utilities, inverse_temperature = fitted.utilities(x[:, None, None, :], no_text)
    return utilities[:, 0], inverse_temperature

  scores, inverse_temperature = jax.lax.map(score, padded)
  return scores.reshape(-1, scores.shape[-1])[:num_images], inverse_temperature[0]


def tabulate(fitted: FittedUsers, image: chex.Array, batch_size: int = 4096) -> UtilityTable:
  """Scores every image of a pool (image f32[N_img, D]) under every type, in batches of `batch_size`."""
  if fitted.model.use_text_features:
    raise ValueError(
      "tabulate: the model reads prompt text features (user_model.use_text_features=True), so "
      "its utilities depend on (type, prompt, image), not on (type, image) alone"
    )
  image = jnp.asarray(image)
  scores, inverse_temperature = _score_pool(fitted, image, min(batch_size, image.shape[0]))
  return UtilityTable(
    scores=scores,
    log_priors=jnp.asarray(fitted.log_priors),
    inverse_temperature=inverse_temperature,
    aggregation=fitted.model.aggregation,
  )


HEADS = ("params", "heads", "kernel")


def warm_start(params, pretrained) -> Any:
  """`params` (a fresh initialisation of a K-type model's variables) started from `pretrained` (the
  variables of a model of the same trunk with K0 types, e.g. pretrained on preference data).

  Every pretrained variable is copied (trunk, inverse temperature, the heads when K0 = K, and the
  feature statistics: the warm-started model computes the pretrained function, whose trunk was
  trained on features standardised by those statistics, not the new data's). With K0 != K type k's
  head is pretrained head k mod K0 plus its fresh random initial head, so types (and restarts)
  start apart. ValueError naming the variable when the two models' variables differ in name or
  shape (e.g. one was fitted with `user_model.standardize` and the other without).
  """
  fresh = traverse_util.flatten_dict(flax.core.unfreeze(params))
  old = traverse_util.flatten_dict(flax.core.unfreeze(pretrained))
  if set(fresh) != set(old):
    raise ValueError(
      f"the pretrained model has parameters {sorted('/'.join(k) for k in set(old) - set(fresh))} "
      f"that this model lacks, and lacks {sorted('/'.join(k) for k in set(fresh) - set(old))}"
    )
  started = {}
  for name, value in fresh.items():
    source = jnp.asarray(old[name], value.dtype)
    if name == HEADS and source.shape[:-1] == value.shape[:-1] and source.shape != value.shape:
      started[name] = source[:, np.arange(value.shape[-1]) % source.shape[-1]] + value
    elif source.shape != value.shape:
      raise ValueError(
        f"parameter {'/'.join(name)} has shape {tuple(source.shape)} in the pretrained model; "
        f"this model's is {tuple(value.shape)}"
      )
    else:
      started[name] = source
  return traverse_util.unflatten_dict(started)


def from_config(config: ml_collections.ConfigDict, num_types: int | None = None) -> UtilityModel:
  um = config.user_model
  return UtilityModel(
    num_types=um.num_types if num_types is None else num_types,
    hidden=tuple(um.hidden),
    activation=um.activation,
    aggregation=um.aggregation,
    use_text_features=um.use_text_features,
    init_inverse_temperature=um.init_inverse_temperature,
    standardize=_standardize(config),
  )


def num_parameters(variables) -> int:
  """The number of trainable parameters (the "params" collection) of a model's variables."""
  return int(sum(np.size(x) for x in jax.tree.leaves(trainable(variables))))
