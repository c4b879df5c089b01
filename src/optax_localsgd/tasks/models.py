"""Input standardisation, the per-dataset constants, and the small image models (MLP, CNN).

Every image model takes the raw ``uint8`` pixels of a batch, shape ``(B, H, W, C)``, and does its
own preprocessing with :func:`standardize`: cast to float32, divide by 255 (so pixels are in
[0, 1]), then subtract the per-channel mean and divide by the per-channel standard deviation of
the training set, both in those [0, 1] units. The constants are fixed numbers (below), not
statistics of the batch, so a model is a pure function of (params, pixels) and identical for every
worker and every batch size. The larger models are in :mod:`.resnet` and :mod:`.transformer`.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Shape, class count and standardisation constants of one dataset.

  ``mean`` and ``std`` are per channel, in units of pixel / 255 (i.e. for pixels in [0, 1]).
  """
  input_shape: tuple[int, ...]
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]


# Fashion-MNIST: computed here from the 60,000 training images of the Debian package
# (mean 0.28604, std 0.35302 over all pixels). CIFAR-10: the per-channel statistics of the
# 50,000 training images (the widely used 0.4914/0.4822/0.4465 and 0.2470/0.2435/0.2616).
# Downsampled ImageNet: the standard full-resolution ImageNet constants; downsampling by box
# averaging barely changes a per-channel mean, and it slightly lowers the std, which is harmless.
DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo((28, 28, 1), 10, (0.2860,), (0.3530,)),
    "cifar10": DatasetInfo((32, 32, 3), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "imagenet32": DatasetInfo((32, 32, 3), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "imagenet64": DatasetInfo((64, 64, 3), 1000, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def standardize(x: jax.Array, mean: Sequence[float] | None,
                std: Sequence[float] | None) -> jax.Array:
  """``(x / 255 - mean) / std`` in float32, per channel (last axis); just ``x / 255`` if None.

  ``x`` is raw pixels (any integer or float dtype, values 0..255); ``mean``/``std`` are in
  pixel / 255 units and have one entry per channel (or one entry for all channels).
  """
  x = jnp.asarray(x).astype(jnp.float32) / 255.0
  if mean is None or std is None:
    return x
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


class MLP(nn.Module):
  """Fully connected ReLU network on flattened, standardised pixels.

  ``hidden=(128, 128)`` is the paper's "2-Layer MLP", ``(128, 128, 128)`` its "3-Layer MLP".
  Output: float32 logits ``(B, num_classes)``. Flax default initialisers (LeCun normal kernels,
  zero biases). ``compute_dtype="bfloat16"`` runs the matmuls in bfloat16 (parameters stay
  float32; XLA's CPU matmuls accumulate bf16 products in float32 and round the result), which
  this project's AMX CPUs run about 3x faster; ``None`` computes in float32.
  """
  hidden: tuple[int, ...] = (128, 128)
  num_classes: int = 10
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  compute_dtype: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = standardize(x, self.mean, self.std)
    x = x.reshape((x.shape[0], -1))
    dtype = None if self.compute_dtype is None else jnp.dtype(self.compute_dtype)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dtype=dtype)(x))
    return nn.Dense(self.num_classes, dtype=dtype)(x).astype(jnp.float32)


class CNN(nn.Module):
  """The paper's 3-layer CNN: 3x3 "SAME" convs (with bias) and ReLU, then a linear classifier.

  Defaults: 32 channels with stride 2, then 64 and 64 with stride 1 (paper 5.1.2). The paper does
  not say how the feature map reaches the classifier; this follows the learned_optimization task
  the paper builds on (``Conv_Cifar10_32x64x64``): a global average over the spatial axes, then
  ``Dense(num_classes)``. No normalisation layers. Output: float32 logits ``(B, num_classes)``.
  """
  features: tuple[int, ...] = (32, 64, 64)
  strides: tuple[int, ...] = (2, 1, 1)
  num_classes: int = 10
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if len(self.features) != len(self.strides):
      raise ValueError(f"CNN: {len(self.features)} features but {len(self.strides)} strides")
    x = standardize(x, self.mean, self.std)
    for width, stride in zip(self.features, self.strides):
      x = nn.relu(nn.Conv(width, (3, 3), strides=(stride, stride), padding="SAME")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)
