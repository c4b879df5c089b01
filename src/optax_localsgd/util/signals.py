"""Graceful stops for long loops: SIGINT/SIGTERM become a flag checked between steps."""

from __future__ import annotations

import signal


class StopFlag:
  """Context manager that turns SIGINT/SIGTERM into ``self.signum``, checked by the caller.

  The loop finishes its current step, writes a checkpoint and stops, instead of dying in the
  middle of a write. With ``second_sigint_raises``, a second Ctrl-C raises
  ``KeyboardInterrupt`` as usual, for a user who does not want to wait. The previous handlers
  are restored on exit.
  """

  def __init__(self, second_sigint_raises: bool = True):
    self.signum: int | None = None
    self._second_sigint_raises = second_sigint_raises
    self._old = {}

  def __enter__(self) -> "StopFlag":
    for s in (signal.SIGINT, signal.SIGTERM):
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    if self._second_sigint_raises and self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)
