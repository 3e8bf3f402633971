"""Progress bars for long offline work: feature extraction, evaluation passes, checkpoint conversion.

A thin wrapper over tqdm (a dependency of the library) that decides where a bar helps:
on an interactive terminal and in notebooks, not in redirected logs (where a bar's
carriage returns only add noise; those runs log a summary line instead), and only on
process 0 of a multi-process run. AMD_JAX_PROGRESS=1 forces bars on, AMD_JAX_PROGRESS=0 off.
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

T = TypeVar("T")


def enabled(process_index: int = 0) -> bool:
  """Whether bars are shown here: see the module doc."""
  forced = os.environ.get("AMD_JAX_PROGRESS", "").strip().lower()
  if forced in ("0", "false", "no", "off"):
    return False
  if process_index > 0:
    return False
  if forced in ("1", "true", "yes", "on"):
    return True
  interactive = getattr(sys.stderr, "isatty", lambda: False)()
  return bool(interactive or "ipykernel" in sys.modules)


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
        process_index: int = 0):
  """tqdm over `iterable` (or a manual bar when None: call .update(n), then .close()), disabled where
  `enabled()` says no. Refreshes at most once a second, so it costs nothing next to a jitted step."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled(process_index), mininterval=1.0,
              leave=False, dynamic_ncols=True)


class Stages:
  """A bar over a few named stages of one long job (read, convert, write a checkpoint).

  stages = Stages(("reading", "converting", "writing"), desc="to_flax")
  ...; stages.done()   # after each stage; the bar closes after the last one
  """

  def __init__(self, names: tuple[str, ...], desc: str = "", process_index: int = 0):
    self.names = tuple(names)
    self.index = 0
    self._bar = bar(total=len(self.names), desc=desc, unit="stage", process_index=process_index)
    self._bar.set_postfix_str(self.names[0])

  def done(self) -> None:
    self.index += 1
    self._bar.update(1)
    if self.index < len(self.names):
      self._bar.set_postfix_str(self.names[self.index])
    else:
      self._bar.close()
