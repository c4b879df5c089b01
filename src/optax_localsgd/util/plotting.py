"""PNG plots of training curves (matplotlib, installed with the ``plot`` extra).

Everything here draws on :class:`matplotlib.figure.Figure` objects and saves them directly:
no ``pyplot`` state and no ``matplotlib.use``, so calling the package from a notebook leaves
its backend and open figures alone.
"""

from __future__ import annotations

import pathlib
from typing import Any

INSTALL_HINT = 'pip install "optax-localsgd[plot]"'


class PlotsUnavailable(ImportError):
  """matplotlib is not installed; the message says how to get it."""


def figure(**kwargs: Any):
  """A new ``matplotlib.figure.Figure(**kwargs)``, detached from pyplot.

  ``fig.savefig(path)`` picks the renderer from the file suffix (Agg for ``.png``), so no
  backend needs to be selected.

  Raises:
    PlotsUnavailable: matplotlib is not installed.
  """
  try:
    from matplotlib.figure import Figure
  except ImportError as e:
    raise PlotsUnavailable(f"Plots need matplotlib: {INSTALL_HINT}.") from e
  return Figure(**kwargs)


def plot_histories(histories: list[dict], path: str | pathlib.Path, title: str = "") -> None:
  """Writes a PNG: global training loss (log scale) and mean local loss against rounds.

  Args:
    histories: ``trainer.train`` results, each with ``label``, ``eval_rounds``,
      ``global_train_loss``, ``rounds`` and ``train_loss`` (losses in nats).
    path: the PNG to write.
    title: the figure's title.

  Raises:
    PlotsUnavailable: matplotlib is not installed.
  """
  fig = figure(figsize=(11, 4), layout="constrained")
  ax_g, ax_l = fig.subplots(1, 2)
  for h in histories:
    ax_g.plot(h["eval_rounds"], h["global_train_loss"], label=h["label"])
    ax_l.plot(h["rounds"], h["train_loss"], label=h["label"], linewidth=0.8)
  ax_g.set(xlabel="communication round", ylabel="training loss (global model, fixed subset)",
           yscale="log")
  ax_l.set(xlabel="communication round", ylabel="mean local training loss", yscale="log")
  for ax in (ax_g, ax_l):
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.savefig(path, dpi=110)
