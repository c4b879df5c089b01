"""PNG plots of training curves (matplotlib, installed with the ``plot`` extra)."""

from __future__ import annotations

import pathlib


def pyplot():
  """matplotlib.pyplot with the non-interactive Agg backend."""
  try:
    import matplotlib
  except ImportError as e:
    raise ImportError("Plots need matplotlib: pip install 'optax-localsgd[plot]'.") from e
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def plot_histories(histories: list[dict], path: str | pathlib.Path, title: str = "") -> None:
  """Global training loss (log scale) and mean local loss against communication rounds."""
  plt = pyplot()
  fig, (ax_g, ax_l) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
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
  plt.close(fig)
