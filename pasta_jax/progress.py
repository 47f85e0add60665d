"""Progress bars for long host loops (process 0 only)."""

from collections.abc import Iterable

import jax
from tqdm.auto import tqdm


def progress(items: Iterable, description: str, enabled: bool = True) -> Iterable:
  """A tqdm bar on process 0 (plain iteration elsewhere or when disabled)."""
  if not enabled or jax.process_index() != 0:
    return items
  return tqdm(items, desc=description, leave=False, dynamic_ncols=True)
