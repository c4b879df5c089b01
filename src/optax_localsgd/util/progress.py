"""A dependency-free progress bar for long jobs (rounds, outer steps) on stderr."""

from __future__ import annotations

import sys
import time


class Progress:
  """``[####......] 40/100 rounds 12.3 it/s eta 5s local_loss=0.41``, redrawn in place.

  Args:
    total: number of steps.
    desc: label printed before the bar.
    enabled: draw at all (False for library use and tests).
    stream: where to draw (default stderr). When it is not a terminal, a line is printed
      at most every ``min_interval_s`` seconds instead of redrawing.
  """

  def __init__(self, total: int, desc: str = "", enabled: bool = True, stream=None,
               unit: str = "rounds", min_interval_s: float = 10.0):
    self.total, self.desc, self.enabled, self.unit = total, desc, enabled, unit
    self.stream = stream or sys.stderr
    self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
    self.n, self.t0, self.last_print = 0, time.perf_counter(), -float("inf")
    self.min_interval_s = 0.0 if self.tty else min_interval_s
    self.postfix = ""

  def update(self, n: int = 1, **metrics: float) -> None:
    self.n += n
    self.postfix = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    now = time.perf_counter()
    if self.enabled and (now - self.last_print >= self.min_interval_s or self.n >= self.total):
      self.last_print = now
      self._draw(now)

  def _draw(self, now: float) -> None:
    elapsed = max(now - self.t0, 1e-9)
    rate = self.n / elapsed
    eta = (self.total - self.n) / rate if rate > 0 else float("inf")
    filled = int(20 * self.n / max(self.total, 1))
    line = (f"{self.desc} [{'#' * filled}{'.' * (20 - filled)}] {self.n}/{self.total} "
            f"{self.unit} {rate:.3g}/s eta {eta:.0f}s {self.postfix}")
    self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
    self.stream.flush()

  def write(self, msg: str) -> None:
    if self.enabled:
      self.stream.write(("\n" if self.tty else "") + msg + "\n")

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write("\n")
      self.stream.flush()
