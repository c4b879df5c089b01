"""A task's dataset as host arrays: which loader of :mod:`optax_localsgd.data` it reads, and
how many items (examples, or language-model windows) the engine samples from."""

from __future__ import annotations

import numpy as np

from optax_localsgd import data
from optax_localsgd.errors import UsageError
from optax_localsgd.tasks.task import Task


def load_split(task: Task, split: str, data_dir: str | None) -> dict[str, np.ndarray]:
  """Host arrays of ``task``'s dataset: ``{"x", "y"}``, or ``{"x": bytes}`` for text."""
  if task.dataset == "fashion_mnist":
    ds = data.load_fashion_mnist(split, data_dir)
  elif task.dataset == "cifar10":
    ds = data.load_cifar10(split, data_dir)
  elif task.dataset in ("imagenet32", "imagenet64"):
    ds = data.load_imagenet_downsampled(
        "val" if split == "test" else split, data_dir, resolution=int(task.dataset[-2:]),
        num_classes=task.num_classes)
  elif task.dataset == "text":
    if data_dir is None:
      raise UsageError("The text task needs --data-dir: a UTF-8 text file or a directory "
                       "of *.txt files.")
    return {"x": data.load_text_bytes(data_dir, "val" if split == "test" else split)}
  else:
    raise ValueError(f"No loader for dataset {task.dataset!r}.")
  return {"x": ds.x, "y": ds.y}


def num_items(task: Task, arrays: dict) -> int:
  """Examples, or for a language model the number of valid window offsets."""
  if task.kind == "language_model":
    return len(arrays["x"]) - task.input_shape[0] - 1
  return len(arrays["x"])
