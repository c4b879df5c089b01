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


def plot_partition(counts: Any, path: str | pathlib.Path, title: str = "",
                   max_clients: int | None = 100) -> None:
  """Writes a PNG of a federated partition like the paper's Figure 16: one column per client,
  one row per label, a marker whose area is proportional to the client's count of that label.

  Args:
    counts: ``(num_clients, num_classes)`` examples per client and label, e.g.
      ``data.label_counts(partition, labels)``.
    path: the PNG to write.
    title: the figure's title.
    max_clients: draw only the first this many clients (400 columns are unreadable);
      ``None``: all.

  Raises:
    PlotsUnavailable: matplotlib is not installed.
  """
  import numpy as np
  counts = np.asarray(counts)
  if max_clients is not None:
    counts = counts[:max_clients]
  n_clients, n_classes = counts.shape
  fig = figure(figsize=(max(6.0, 0.12 * n_clients), 0.35 * n_classes + 1.2),
               layout="constrained")
  ax = fig.subplots()
  ci, li = np.nonzero(counts)
  # Area, not radius, scales with the count; the largest cell gets a marker of area 120 pt^2.
  ax.scatter(ci, li, s=120.0 * counts[ci, li] / max(counts.max(), 1), color="tab:red",
             alpha=0.8, linewidths=0)
  ax.set(xlabel="client", ylabel="label", xlim=(-1, n_clients), ylim=(-0.7, n_classes - 0.3),
         yticks=range(n_classes))
  ax.grid(True, alpha=0.3)
  if title:
    ax.set_title(title)
  fig.savefig(path, dpi=110)
