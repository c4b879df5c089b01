"""Progress bars for long jobs (rounds, outer steps): :mod:`tqdm` with the package's settings.

A thin layer, kept because three commands (the trainer, meta-training, the ViT example) want
the same three things that plain ``tqdm`` does not do by itself:

* off for library use, tests and ``--quiet`` (``enabled=False`` draws nothing at all);
* a widget in Jupyter (``tqdm.auto`` picks it; it falls back to text without ipywidgets);
* on a stream that is not a terminal (a batch job's log, a pipe) one whole line per redraw,
  at most every ``min_interval_s`` seconds, instead of ``\\r`` redraws that pile up in one
  endless line, so ``tail -f`` and line readers see each update.

``TQDM_*`` environment variables (e.g. ``TQDM_MININTERVAL=30``) override
the settings, as tqdm documents.
"""

from __future__ import annotations

import sys
from typing import TextIO

from tqdm import autonotebook, std
from tqdm.auto import tqdm

# tqdm.auto draws a Jupyter widget when it runs in a notebook with ipywidgets, text otherwise.
_IN_NOTEBOOK = autonotebook.tqdm is not std.tqdm


class _Lines:
  """A file for tqdm that writes each in-place redraw (``"\\r" + bar``) as its own line.

  tqdm clears a bar by drawing spaces over it and pads a shorter line with spaces; both are
  dropped here, so only non-blank text reaches ``stream``.
  """

  def __init__(self, stream: TextIO):
    self._stream = stream

  def write(self, s: str) -> None:
    lines = [line.rstrip() for line in s.replace("\r", "\n").split("\n")]
    text = "".join(line + "\n" for line in lines if line)
    if text:
      self._stream.write(text)

  def flush(self) -> None:
    self._stream.flush()


class Progress:
  """A tqdm bar over ``total`` steps of ``unit``, with metrics in its postfix.

  ``Progress(100, desc="slowmo").update(4, local_loss=0.41)`` shows
  ``slowmo:   4%|...| 4/100 [00:01<00:24, 3.9rounds/s, local_loss=0.41]``.

  Args:
    total: number of steps the job will have done at the end (counting ``initial``).
    desc: label in front of the bar.
    enabled: draw at all (False for library use, tests and ``--quiet``: then neither the bar
      nor :meth:`write` prints anything).
    stream: where to draw; default ``sys.stderr`` (looked up at call time, so pytest's and
      a caller's redirections apply).
    unit: what a step is.
    min_interval_s: seconds between two lines when ``stream`` is not a terminal (a
      terminal or notebook redraws in place, about ten times a second at most).
    initial: steps already done before this process started (a resumed job).
  """

  def __init__(self, total: int, desc: str = "", enabled: bool = True,
               stream: TextIO | None = None, unit: str = "rounds",
               min_interval_s: float = 10.0, initial: int = 0):
    stream = stream if stream is not None else sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    self._lines = enabled and not _IN_NOTEBOOK and not tty
    self._stream = stream
    if self._lines:
      kwargs = {"file": _Lines(stream), "mininterval": min_interval_s, "ascii": True}
    else:
      kwargs = {"file": stream, "dynamic_ncols": tty}
    self.enabled = enabled
    #: The tqdm instance, for anything this class does not forward.
    self.bar = tqdm(total=total, initial=initial, desc=desc or None, unit=unit,
                    disable=not enabled, **kwargs)

  def update(self, n: int = 1, **metrics: float) -> None:
    """Advances by ``n`` steps and shows ``metrics`` (name=value, 4 significant digits)."""
    if metrics:
      self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
    self.bar.update(n)

  def write(self, msg: str) -> None:
    """Prints ``msg`` on its own line above the bar (nothing when disabled)."""
    if self._lines:
      # Nothing is drawn in place, so there is no bar to clear and redraw around it.
      self._stream.write(msg + "\n")
      self._stream.flush()
    elif self.enabled:
      self.bar.write(msg, file=self.bar.fp)

  def close(self) -> None:
    """Ends the bar; on a non-terminal, prints the final count unless the last line did."""
    if self._lines and self.bar.last_print_n == self.bar.n:
      self.bar.leave = False
    self.bar.close()
