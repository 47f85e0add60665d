"""The config error and the checks every block's validation uses; imports nothing but the standard library."""

import json
import math
import numbers
import operator
import os
from typing import Any


class ConfigError(ValueError):
  """An invalid config value; the message names the field."""


def check(ok: bool, field: str, value: Any, requirement: str) -> None:
  """Raises ConfigError "config.<field>=<value>: <requirement>" unless `ok`."""
  if not ok:
    raise ConfigError(f"config.{field}={value!r}: {requirement}")


def is_int(value: Any) -> bool:
  """An int that is not a bool."""
  return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
  """A finite real number (int or float, NumPy scalars included) that is not a bool."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def field_value(config, field: str) -> Any:
  """The value of `field` (dotted, e.g. "em.epochs") of `config`."""
  value = config
  for part in field.split("."):
    value = value[part]
  return value


def check_positive_int(config, field: str) -> None:
  """`field` (dotted, e.g. "em.epochs") of `config` is an int >= 1."""
  value = field_value(config, field)
  check(is_int(value) and value >= 1, field, value, "must be a positive integer")


_COMPARISONS = {
  "above": (">", operator.gt),
  "at_least": (">=", operator.ge),
  "below": ("<", operator.lt),
  "at_most": ("<=", operator.le),
}


def _bounds_text(bounds: dict[str, float]) -> str:
  """The bounds as text, e.g. ' > 0 and <= 1' for {"above": 0, "at_most": 1}; '' for none."""
  return " and".join(f" {_COMPARISONS[name][0]} {limit}" for name, limit in bounds.items())


def _within(value: float, bounds: dict[str, float]) -> bool:
  return all(_COMPARISONS[name][1](value, limit) for name, limit in bounds.items())


def check_real(
  config,
  field: str,
  *,
  above: float | None = None,
  at_least: float | None = None,
  below: float | None = None,
  at_most: float | None = None,
) -> None:
  """`field` (dotted) of `config` is a finite number (not a bool, NaN or inf) within the given bounds,
  e.g. `check_real(config, "em.prior_step", above=0, at_most=1)` for (0, 1]."""
  value = field_value(config, field)
  given = {"above": above, "at_least": at_least, "below": below, "at_most": at_most}
  bounds = {name: limit for name, limit in given.items() if limit is not None}
  check(
    is_real(value) and _within(value, bounds),
    field,
    value,
    f"must be a finite number{_bounds_text(bounds)}",
  )


def check_widths(widths, field: str) -> None:
  """`widths` (the value of `field`) are positive layer widths."""
  check(all(is_int(h) and h >= 1 for h in widths), field, widths, "must be positive layer widths")


def num_training_users(config) -> int | None:
  """Training users of the synthetic world's user-disjoint split (`pipeline.split_users` holds out
  round(world.heldout_fraction × world.num_users)); None when they are unknown before the data stage
  (the PASTA release) or not the data fitted (a `pretrain` config fits preference records)."""
  if config.data.source != "synthetic" or "pretrain" in config:
    return None
  w = config.world
  return w.num_users - int(round(w.heldout_fraction * w.num_users))


def row_layout(users: int, choices: int, turns_per_row: int) -> tuple[int, int]:
  """(T, R): the rows of T turns that hold `users` histories of `choices` choices each as the data
  stage lays them out: T = `turns_per_row`, or `choices` when it is 0 (the 95th percentile of equal
  lengths, `schema.row_length`); R = users × ceil(choices / T)."""
  turns = turns_per_row or choices
  return turns, users * -(-choices // turns)


def training_rows(config) -> tuple[int, int, int] | None:
  """(n, T, R) of the synthetic world's training users (`num_training_users`, None when that is):
  n = world.sessions_per_user × interaction.turns choices per user in R rows of T turns
  (`row_layout` of `data.turns_per_row`)."""
  users = num_training_users(config)
  if users is None:
    return None
  n = config.world.sessions_per_user * config.interaction.turns
  return (n, *row_layout(users, n, config.data.get("turns_per_row", 0)))


def training_users_text(config) -> str:
  """How `num_training_users` came about, for messages."""
  w = config.world
  return (
    f"the {num_training_users(config)} training users (world.num_users={w.num_users} less "
    f"world.heldout_fraction={w.heldout_fraction} held out)"
  )


# The ends of a percentile 95% CI are the 2.5th and 97.5th percentiles of the bootstrap samples: 100
# samples leave 2.5 beyond each end; below 40 none do, and the interval is merely the samples' range.
MIN_BOOTSTRAP_SAMPLES = 100


def largest_k(config) -> int:
  """The largest K the user_model stage fits: of `select_k.ks` and `user_model.num_types`."""
  return max(*config.select_k.ks, config.user_model.num_types)


def fitted_model_problem(path: str) -> str | None:
  """Why `path` is not a fitted model saved by `checkpoint.save_tree` (an Orbax checkpoint of a tree
  with "params"), read from the checkpoint's `_METADATA` file alone; None when it is one."""
  if not os.path.isdir(path):
    return "not a directory"
  metadata_path = os.path.join(path, "_METADATA")
  if not os.path.isfile(metadata_path):
    return "no Orbax checkpoint there (no _METADATA file)"
  try:
    with open(metadata_path) as f:
      entries = json.load(f)["tree_metadata"].values()
    top = {entry["key_metadata"][0]["key"] for entry in entries}
  except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
    return f"unreadable Orbax metadata {metadata_path} ({type(e).__name__}: {e})"
  if "params" not in top:
    return f"an Orbax checkpoint of {sorted(top)}, not a fitted model's {{'params', 'log_priors'}}"
  return None
