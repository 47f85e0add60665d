"""Slate selection with at most one prompt per category (the paper's O(L_C log L_C) rule)."""

import chex
import jax.numpy as jnp


def select_slate(
  scores: chex.Array, category: chex.Array, num_categories: int, slate_size: int
) -> chex.Array:
  """The top `slate_size` candidates by score, at most one per category.

  Args:
    scores: f32[L_C] candidate scores (a value model's f(h, p), or random draws for a random policy).
    category: i32[L_C] category of each candidate, in [0, num_categories).
    num_categories: C (static).
    slate_size: L <= C (static).

  Returns:
    i32[L] candidate indices, best first.
  """
  member = category[None, :] == jnp.arange(num_categories)[:, None]  # [C, L_C]
  masked = jnp.where(member, scores[None, :], -jnp.inf)
  best_of_category = jnp.argmax(masked, axis=1)  # [C]
  best_score = jnp.max(masked, axis=1)
  order = jnp.argsort(-best_score)[:slate_size]
  return best_of_category[order]
