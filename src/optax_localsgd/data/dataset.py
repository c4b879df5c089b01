"""The in-memory form every loader returns: examples, 0-based labels and their count."""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
  """A labelled dataset held in host memory as NumPy arrays.

  Attributes:
    x: the examples, one per row of axis 0. Images are ``uint8`` of shape ``(N, H, W, C)``,
      pixel values 0..255, channels last.
    y: ``int32`` labels of shape ``(N,)``, 0-based, each in ``[0, num_classes)``.
    num_classes: how many classes the labels index (may exceed the number present in ``y``).
    name: where it came from, e.g. ``"fashion_mnist/train"``.
  """
  x: np.ndarray
  y: np.ndarray
  num_classes: int
  name: str

  def __post_init__(self) -> None:
    if self.x.ndim < 1:
      raise ValueError(f"ArrayDataset {self.name!r}: x must have a leading example axis, "
                       f"got a scalar.")
    if self.y.ndim != 1:
      raise ValueError(f"ArrayDataset {self.name!r}: y must be 1-D (one label per example), "
                       f"got shape {self.y.shape}.")
    if len(self.x) != len(self.y):
      raise ValueError(f"ArrayDataset {self.name!r}: {len(self.x)} examples but "
                       f"{len(self.y)} labels.")
    if self.num_classes < 1:
      raise ValueError(f"ArrayDataset {self.name!r}: num_classes must be >= 1, "
                       f"got {self.num_classes}.")
    if self.y.size and (self.y.min() < 0 or self.y.max() >= self.num_classes):
      raise ValueError(f"ArrayDataset {self.name!r}: labels span [{self.y.min()}, "
                       f"{self.y.max()}], outside [0, {self.num_classes}).")

  def __len__(self) -> int:
    """Number of examples."""
    return len(self.y)
