"""The config error and the checks every block's validation uses; imports nothing but the standard library."""

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


def check_positive_int(config, field: str) -> None:
  """`field` (dotted, e.g. "em.epochs") of `config` is an int >= 1."""
  value = config
  for part in field.split("."):
    value = value[part]
  check(is_int(value) and value >= 1, field, value, "must be a positive integer")


def check_widths(widths, field: str) -> None:
  """`widths` (the value of `field`) are positive layer widths."""
  check(all(is_int(h) and h >= 1 for h in widths), field, widths, "must be positive layer widths")
