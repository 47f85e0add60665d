"""Device-side containers shared by every stage (flax.struct dataclasses).

Shapes use: U users, R rows of turns (a user's history, all of their sessions in order, fills one
or more consecutive rows), T turns per row (padded), L options per slate, M images per option,
D feature width, K user types, N_img / N_txt rows of the feature tables.
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
  """Padded choice observations in rows of T turns: a user's history fills one row, or several
  consecutive rows in time order when it is longer than T (`schema.to_choices`).

  image_rows: i32[R, T, L, M] rows of `FeatureTable.image` shown for each option.
  text_rows: i32[R, T, L] rows of `FeatureTable.text` for each option's prompt.
  category: i32[R, T, L] candidate category index of each option.
  choice: i32[R, T] index of the chosen option.
  option_mask: bool[R, T, L] real (not padded) options.
  turn_mask: bool[R, T] real (not padded) turns.
  user_index: i32[R] the row's user, the same on all of a user's consecutive rows (0..U-1 from
    `schema.to_choices`; also keys per-user randomness); -1 on padded rows, which come last.
  image_mask: bool[R, T, L, M] real (not padded) images of each option; None: every image is real.
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
    """R: the number of rows (the number of users when each history fills one row)."""
    return self.choice.shape[0]

  @property
  def user_mask(self) -> chex.Array:
    """bool[R]: rows of real users."""
    return self.user_index >= 0

  def first_rows(self) -> chex.Array:
    """bool[R]: the rows that start a user's rows (a user's rows are consecutive)."""
    index = jnp.asarray(self.user_index)
    return jnp.concatenate([jnp.ones((1,), bool), index[1:] != index[:-1]])

  def spans_rows(self) -> chex.Array:
    """bool[]: some real user's history fills more than one row."""
    return jnp.any(~self.first_rows() & self.user_mask)

  def user_segments(self) -> chex.Array:
    """i32[R]: each row's user numbered in row order, 0..U-1 (a user's rows are consecutive; padded
    rows come after them), whatever the `user_index` values: the segment ids of per-user sums."""
    return jnp.cumsum(self.first_rows().astype(jnp.int32)) - 1

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
