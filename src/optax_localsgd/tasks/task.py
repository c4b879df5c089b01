"""The :class:`Task` a local-SGD engine trains: a Flax model, its data layout and its loss.

Batch convention (arrays may be NumPy or JAX):

* ``kind == "classification"``: ``{"x": uint8 (B, *input_shape), "y": int32 (B,)}`` of raw
  pixels and labels in ``[0, num_classes)``; the model does its own scaling/standardisation.
* ``kind == "language_model"``: ``{"x": uint8 (B, seq_len + 1)}`` of bytes; the model reads
  ``x[:, :-1]`` and is scored on predicting ``x[:, 1:]`` (next-byte prediction at every
  position). ``input_shape == (seq_len,)`` is the model's input, one byte shorter than a row.

``init``, ``apply``, ``loss`` and ``accuracy`` are pure functions of their arguments (no mutable
collections, no randomness), so they can be ``jax.jit``-ed, ``jax.grad``-ed and ``jax.vmap``-ed
over workers and tasks. Losses are in nats per example (per predicted byte for the LM).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
Batch = Mapping[str, Any]

KINDS = ("classification", "language_model")


@dataclasses.dataclass(frozen=True)
class Task:
  """A model plus the data it is trained on. Frozen and hashable (usable as a static jit arg).

  Attributes:
    name: registry name, e.g. ``"fmnist_mlp"``.
    model: the Flax module; ``model.apply({"params": p}, x)`` gives logits.
    input_shape: shape of one model input: ``(H, W, C)`` pixels, or ``(seq_len,)`` bytes.
    num_classes: number of classes (the vocabulary size, 256, for the byte LM).
    dataset: ``"fashion_mnist" | "cifar10" | "imagenet32" | "imagenet64" | "text"``.
    kind: ``"classification" | "language_model"``.
  """
  name: str
  model: nn.Module
  input_shape: tuple[int, ...]
  num_classes: int
  dataset: str
  kind: str

  def __post_init__(self) -> None:
    if self.kind not in KINDS:
      raise ValueError(f"Task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
    object.__setattr__(self, "input_shape", tuple(int(s) for s in self.input_shape))

  def dummy_batch(self, batch_size: int = 1) -> dict[str, np.ndarray]:
    """An all-zero batch of ``batch_size`` examples with the right shapes and dtypes."""
    if self.kind == "language_model":
      return {"x": np.zeros((batch_size, self.input_shape[0] + 1), np.uint8)}
    return {"x": np.zeros((batch_size, *self.input_shape), np.uint8),
            "y": np.zeros((batch_size,), np.int32)}

  def preprocessing(self) -> str:
    """What the model does to the stored bytes before its first layer, as a sentence fragment.

    Results pages print it, since speedups depend on it: the package standardises pixels by
    default, the paper's code (``learned_optimization``'s image datasets) only divides by 255.
    """
    if self.kind == "language_model":
      return "raw bytes, embedded by the model (no preprocessing)"
    mean, std = getattr(self.model, "mean", None), getattr(self.model, "std", None)
    if mean is None or std is None:
      return "pixels / 255, in [0, 1], and nothing else (the authors' preprocessing)"
    fmt = lambda v: "/".join(f"{x:g}" for x in v)
    return (f"pixels / 255, then standardised per channel with the training set's mean "
            f"{fmt(mean)} and std {fmt(std)} (the package's default; the authors' "
            "preprocessing, pixels / 255 only, is the task's `standardize=false`)")

  def init(self, key: jax.Array) -> Params:
    """Fresh float32 parameters (the ``'params'`` collection only) from a PRNG key."""
    x = jnp.zeros((1, *self.input_shape), jnp.uint8)
    variables = self.model.init(key, x)
    extra = set(variables) - {"params"}
    if extra:
      raise ValueError(f"Task {self.name!r}: model has non-params collections {sorted(extra)}")
    return flax.core.unfreeze(variables["params"])

  def apply(self, params: Params, x: jax.Array) -> jax.Array:
    """Float32 logits: ``(B, num_classes)``, or ``(B, L, num_classes)`` for the LM on ``(B, L)``."""
    return self.model.apply({"params": params}, x).astype(jnp.float32)

  def _logits_and_targets(self, params: Params, batch: Batch) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(batch["x"])
    if self.kind == "language_model":
      return self.apply(params, x[:, :-1]), x[:, 1:].astype(jnp.int32)
    return self.apply(params, x), jnp.asarray(batch["y"]).astype(jnp.int32)

  def loss(self, params: Params, batch: Batch) -> jax.Array:
    """Mean softmax cross-entropy in nats (over examples, and over positions for the LM)."""
    logits, targets = self._logits_and_targets(params, batch)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))

  def accuracy(self, params: Params, batch: Batch) -> jax.Array:
    """Fraction in [0, 1] of examples (LM: positions) whose arg-max logit is the target."""
    logits, targets = self._logits_and_targets(params, batch)
    return jnp.mean((jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32))


def num_params(params: Params) -> int:
  """Total number of scalar parameters in a pytree."""
  return int(sum(np.prod(np.shape(p), dtype=np.int64) for p in jax.tree.leaves(params)))
