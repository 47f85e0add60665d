"""Device-side containers shared by every stage (flax.struct dataclasses).

Shapes use: U users, T turns per user (all of a user's sessions, padded), L options per slate,
M images per option, D feature width, K user types, N_img / N_txt rows of the feature tables.
"""

import chex
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class FeatureTable:
  """Embedding rows referenced by the records.

  image: f32[N_img, D] image features (CLIP image tower or the synthetic renderer).
  text: f32[N_txt, D] prompt text features.
  """

  image: chex.Array
  text: chex.Array

  @property
  def dim(self) -> int:
    return self.image.shape[-1]


@struct.dataclass
class Choices:
  """Padded choice observations, one row per user.

  image_rows: i32[U, T, L, M] rows of `FeatureTable.image` shown for each option.
  text_rows: i32[U, T, L] rows of `FeatureTable.text` for each option's prompt.
  category: i32[U, T, L] candidate category index of each option.
  choice: i32[U, T] index of the chosen option.
  option_mask: bool[U, T, L] real (not padded) options.
  turn_mask: bool[U, T] real (not padded) turns.
  user_index: i32[U] global user index (for per-user random keys); -1 on padded users.
  image_mask: bool[U, T, L, M] real (not padded) images of each option; None: every image is real.
  """

  image_rows: chex.Array
  text_rows: chex.Array
  category: chex.Array
  choice: chex.Array
  option_mask: chex.Array
  turn_mask: chex.Array
  user_index: chex.Array
  image_mask: chex.Array | None = None

  @property
  def num_users(self) -> int:
    return self.choice.shape[0]

  @property
  def user_mask(self) -> chex.Array:
    """bool[U]: rows that are real users."""
    return self.user_index >= 0

  def num_choices(self) -> chex.Array:
    """Scalar count of real choices."""
    return jnp.sum(self.turn_mask)


@struct.dataclass
class OptionFeatures:
  """Features of each option, gathered from a `FeatureTable`.

  image: f32[..., L, M, D]; text: f32[..., L, D]; image_mask: bool[..., L, M] real (not padded)
  images, None: every image is real.
  """

  image: chex.Array
  text: chex.Array
  image_mask: chex.Array | None = None


def gather_options(table: FeatureTable, choices: Choices) -> OptionFeatures:
  """Looks up the features of every option: image f32[U, T, L, M, D], text f32[U, T, L, D], and the
  image mask bool[U, T, L, M] of `choices`."""
  return OptionFeatures(
    image=table.image[choices.image_rows],
    text=table.text[choices.text_rows],
    image_mask=choices.image_mask,
  )
