"""Errors a user can act on, and the field checkers that raise them (the bottom layer).

Every module that checks a config field (config validation, data, sharding, the
methods) raises through these, so a bad value always reads the same way:

  config.<field>=<value> is not valid: <what is allowed>

and the command line turns any ConfigError into one line and exit status 2.
Nothing here imports another amd_jax module.
"""
from __future__ import annotations

from typing import Any, Iterable, NoReturn


class ConfigError(ValueError):
  """A config field holds a value the run cannot use (or names a source that cannot be read)."""


def fail(field: str, value: Any, allowed: str) -> NoReturn:
  """Raise ConfigError for `config.<field>`; `field` is written without the 'config.' prefix."""
  field = field[len("config."):] if field.startswith("config.") else field
  raise ConfigError(f"config.{field}={value!r} is not valid: {allowed}")


def check_choice(field: str, value: Any, choices: Iterable[Any]) -> None:
  choices = list(choices)
  if value not in choices:
    fail(field, value, f"allowed: {', '.join(map(str, choices))}")


def check_positive(field: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    fail(field, value, "must be > 0")


def check_int(field: str, value: Any, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    fail(field, value, f"expected an integer >= {minimum}")


def check_range(field: str, value: Any, low: float, high: float, *, closed_low: bool = True,
                closed_high: bool = False, meaning: str = "") -> None:
  """low <= value < high by default; the bounds' openness is configurable."""
  ok = not isinstance(value, bool) and isinstance(value, (int, float))
  ok = ok and (value >= low if closed_low else value > low) and (value <= high if closed_high else value < high)
  if not ok:
    interval = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
    fail(field, value, f"must be in {interval}" + (f" ({meaning})" if meaning else ""))
