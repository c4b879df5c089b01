"""ResNets with GroupNorm instead of BatchNorm (so a model is pure: no batch statistics).

BatchNorm keeps mutable running statistics and couples the examples of a batch, which does not
fit an engine that ``vmap``s a pure ``loss(params, batch)`` over workers and tasks. GroupNorm has
the same parameters as BatchNorm's affine part (one scale and one bias per channel), so parameter
counts equal the usual BatchNorm ones: ResNet-50 with the ImageNet stem and 1000 classes has
25,557,032. As in the Flax ImageNet example and Goyal et al. (2017), the scale of the last norm of
every residual block starts at zero, so each block starts as the identity (useful without BN).

Layout NHWC; convolutions have no bias (a norm follows each); the stride of a downsampling
bottleneck is on its 3x3 conv ("ResNet v1.5"), which does not change the parameter count.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from optax_localsgd.tasks.models import standardize


def _norm(channels: int, groups: int, zero_scale: bool = False) -> nn.GroupNorm:
  """GroupNorm with ``min(groups, channels)`` groups (``channels`` must be divisible by it)."""
  g = min(groups, channels)
  if channels % g:
    raise ValueError(f"GroupNorm: {channels} channels not divisible into {g} groups")
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.GroupNorm(num_groups=g, epsilon=1e-5, scale_init=scale_init)


# He (fan-out, normal) init for the convs, as in torchvision.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34 block); output channels ``width``."""
  width: int
  stride: int = 1
  groups: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    s = (self.stride, self.stride)
    y = nn.Conv(self.width, (3, 3), s, padding="SAME", use_bias=False, kernel_init=_conv_init)(x)
    y = nn.relu(_norm(self.width, self.groups)(y))
    y = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, kernel_init=_conv_init)(y)
    y = _norm(self.width, self.groups, zero_scale=True)(y)
    if x.shape[-1] != self.width or self.stride != 1:
      x = nn.Conv(self.width, (1, 1), s, use_bias=False, kernel_init=_conv_init)(x)
      x = _norm(self.width, self.groups)(x)
    return nn.relu(x + y)


class Bottleneck(nn.Module):
  """1x1 (width) -> 3x3 (width, stride) -> 1x1 (4 * width) block of ResNet-50/101/152."""
  width: int
  stride: int = 1
  groups: int = 32
  expansion: int = 4

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.width * self.expansion
    s = (self.stride, self.stride)
    y = nn.Conv(self.width, (1, 1), use_bias=False, kernel_init=_conv_init)(x)
    y = nn.relu(_norm(self.width, self.groups)(y))
    y = nn.Conv(self.width, (3, 3), s, padding="SAME", use_bias=False, kernel_init=_conv_init)(y)
    y = nn.relu(_norm(self.width, self.groups)(y))
    y = nn.Conv(out, (1, 1), use_bias=False, kernel_init=_conv_init)(y)
    y = _norm(out, self.groups, zero_scale=True)(y)
    if x.shape[-1] != out or self.stride != 1:
      x = nn.Conv(out, (1, 1), s, use_bias=False, kernel_init=_conv_init)(x)
      x = _norm(out, self.groups)(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet on standardised pixels; output float32 logits ``(B, num_classes)``.

  ``stage_sizes`` blocks per stage, stage ``i`` of width ``widths[i]`` (the bottleneck's output is
  ``4 * widths[i]``), stride 2 at the first block of every stage but the first.
  ``stem``: ``"imagenet"`` = 7x7 conv stride 2 + 3x3 max-pool stride 2 (the original, for 224x224
  inputs); ``"small"`` = one 3x3 conv with stride ``stem_stride`` and no max-pool (the usual
  CIFAR / downsampled-ImageNet stem, for 32x32 and 64x64 inputs). The stem has ``widths[0]``
  channels. After the last stage: global average pool, then ``Dense(num_classes)``.
  ``norm_groups``: GroupNorm groups (32 as in Wu & He 2018; fewer for narrow layers).
  """
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  widths: tuple[int, ...] = (64, 128, 256, 512)
  block: str = "bottleneck"  # or "basic"
  stem: str = "imagenet"  # or "small"
  stem_stride: int = 1
  norm_groups: int = 32
  num_classes: int = 1000
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(f"ResNet: {len(self.stage_sizes)} stages but {len(self.widths)} widths")
    blocks = {"bottleneck": Bottleneck, "basic": BasicBlock}
    if self.block not in blocks:
      raise ValueError(f"ResNet: block must be one of {sorted(blocks)}, got {self.block!r}")
    x = standardize(x, self.mean, self.std)
    w0 = self.widths[0]
    if self.stem == "imagenet":
      x = nn.Conv(w0, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                  kernel_init=_conv_init)(x)
      x = nn.relu(_norm(w0, self.norm_groups)(x))
      x = nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])
    elif self.stem == "small":
      st = (self.stem_stride, self.stem_stride)
      x = nn.Conv(w0, (3, 3), st, padding="SAME", use_bias=False, kernel_init=_conv_init)(x)
      x = nn.relu(_norm(w0, self.norm_groups)(x))
    else:
      raise ValueError(f"ResNet: stem must be 'imagenet' or 'small', got {self.stem!r}")
    block = blocks[self.block]
    for i, (n, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        x = block(width=width, stride=stride, groups=self.norm_groups)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)
