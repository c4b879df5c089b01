"""Compression as static configuration: what a worker does to its delta, and what it costs.

A :class:`Compression` is a frozen (hashable) dataclass, so it can sit in
``engine.RoundConfig`` and in the meta-trainer's cached configurations. It builds its Optax
transform (:mod:`optax_localsgd.compression.transforms`), the stacked per-worker states the
engine carries across rounds, and counts the bits one worker sends per round.

The encoding, per leaf of ``n`` entries (bits of one worker's message; the round sends K of
them; the server's broadcast of the new weights is not counted):

=====================  =========================================================
no compression         ``32 n``: float32 values
``top_k(f)``           ``k (32 + ceil(log2 n))``, ``k = max(1, ceil(f n))``: k float32
                       values and k indices of ``ceil(log2 n)`` bits each (0 when n = 1)
``quantize(b)``        ``b n + 32``: a b-bit code per entry and one float32 scale
=====================  =========================================================

Text specs (the ``--compress`` flag), parsed by :func:`from_spec`: ``none``, ``top_k:F``,
``top_k:F:ef`` (with error feedback), ``quantize:B`` and ``quantize:B:nearest``
(round-to-nearest instead of stochastic rounding).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_localsgd.compression import transforms
from optax_localsgd.errors import UsageError

SPEC_HELP = ("none, top_k:F (keep the fraction F of each tensor's entries), top_k:F:ef (with "
             "error feedback), quantize:B (B = 8, 4 or 2 bits, stochastic rounding) or "
             "quantize:B:nearest")


def _sizes(tree: Any) -> list[int]:
  return [int(np.prod(np.shape(x), dtype=np.int64)) for x in jax.tree.leaves(tree)]


def dense_bits(tree: Any) -> int:
  """Bits of ``tree`` sent uncompressed: 32 per entry (float32 values)."""
  return 32 * sum(_sizes(tree))


class Compression(abc.ABC):
  """What a worker does to its delta before sending it. Subclass as a frozen dataclass.

  A subclass defines :meth:`transform` and :meth:`bits`; :meth:`init_workers` stacks
  ``transform().init`` once per worker and may be overridden (e.g. to give each worker its own
  random stream).
  """

  @abc.abstractmethod
  def transform(self) -> optax.GradientTransformation:
    """The Optax transform of one worker's delta."""

  @abc.abstractmethod
  def bits(self, tree: Any) -> int:
    """Bits one worker sends for a delta shaped like ``tree`` (see the module's encoding)."""

  @abc.abstractmethod
  def spec(self) -> str:
    """The text spec :func:`from_spec` parses back to this object."""

  def weights_tag(self) -> str:
    """The suffix of weights meta-trained for this compressor (``pretrained.default_name``):
    the spec with ``:`` as ``_``; :class:`TopK` shortens it to ``top0.01`` / ``top0.01ef``."""
    return self.spec().replace(":", "_")

  def init_workers(self, params: Any, num_workers: int) -> Any:
    """``num_workers`` states of :meth:`transform`, stacked on a leading axis."""
    state = self.transform().init(params)
    return jax.tree.map(
        lambda x: jnp.broadcast_to(jnp.asarray(x), (num_workers,) + jnp.shape(x)), state)


@dataclasses.dataclass(frozen=True)
class TopK(Compression):
  """:func:`~optax_localsgd.compression.transforms.top_k` as configuration.

  Attributes:
    fraction: fraction of each leaf's entries sent, in ``(0, 1]``.
    error_feedback: keep what was dropped and add it to the next round's delta.
  """
  fraction: float
  error_feedback: bool = False

  def __post_init__(self):
    object.__setattr__(self, "fraction", transforms.check_fraction(self.fraction))

  def transform(self) -> optax.GradientTransformation:
    return transforms.top_k(self.fraction, self.error_feedback)

  def bits(self, tree: Any) -> int:
    total = 0
    for n in _sizes(tree):
      k = transforms.num_kept(self.fraction, n)
      total += k * (32 + math.ceil(math.log2(n)))  # log2(1) = 0: a scalar needs no index
    return total

  def spec(self) -> str:
    return f"top_k:{self.fraction:g}" + (":ef" if self.error_feedback else "")

  def weights_tag(self) -> str:
    return f"top{self.fraction:g}" + ("ef" if self.error_feedback else "")


@dataclasses.dataclass(frozen=True)
class Quantize(Compression):
  """:func:`~optax_localsgd.compression.transforms.quantize` as configuration.

  Attributes:
    bits_per_entry: 8, 4 or 2.
    stochastic: stochastic (unbiased) rounding; ``False``: round to nearest.
    seed: seed of the rounding noise; worker ``i`` uses ``fold_in(PRNGKey(seed), i)``.
  """
  bits_per_entry: int
  stochastic: bool = True
  seed: int = 0

  def __post_init__(self):
    transforms.check_bits(self.bits_per_entry)

  def transform(self) -> optax.GradientTransformation:
    return transforms.quantize(self.bits_per_entry, self.stochastic, self.seed)

  def bits(self, tree: Any) -> int:
    return sum(self.bits_per_entry * n + 32 for n in _sizes(tree))

  def spec(self) -> str:
    return f"quantize:{self.bits_per_entry}" + ("" if self.stochastic else ":nearest")

  def init_workers(self, params: Any, num_workers: int) -> Any:
    state = super().init_workers(params, num_workers)
    if not self.stochastic:
      return state
    # The same key on every worker would round all K deltas with the same noise, and their
    # mean would not average it out.
    return transforms.QuantizeState(key=jax.vmap(jax.random.fold_in)(
        state.key, jnp.arange(num_workers, dtype=jnp.uint32)))


def from_spec(text: str | None) -> Compression | None:
  """Parse a ``--compress`` spec (see the module docstring); ``None`` or ``"none"``: ``None``.

  Raises:
    ValueError: an unknown kind or a bad number, with a message that lists the forms.
  """
  if text is None or text.strip().lower() in ("", "none"):
    return None
  parts = text.strip().split(":")
  kind, args = parts[0], parts[1:]
  bad = ValueError(f"Bad compression spec {text!r}; expected {SPEC_HELP}.")
  try:
    if kind in ("top_k", "topk") and len(args) in (1, 2):
      if len(args) == 2 and args[1] != "ef":
        raise bad
      return TopK(float(args[0]), error_feedback=len(args) == 2)
    if kind == "quantize" and len(args) in (1, 2):
      if len(args) == 2 and args[1] != "nearest":
        raise bad
      return Quantize(int(args[0]), stochastic=len(args) == 1)
  except ValueError as e:
    if e is bad:
      raise
    raise ValueError(f"Bad compression spec {text!r} ({e}); expected {SPEC_HELP}.") from None
  raise bad


def round_bits(compression: Compression | None, params: Any, num_workers: int) -> int:
  """Bits the ``num_workers`` workers send in one round for a model shaped like ``params``
  (exact, a Python int; ``None``: uncompressed, 32 bits per entry)."""
  per_worker = dense_bits(params) if compression is None else compression.bits(params)
  return num_workers * per_worker


def from_flag(text: str | None) -> Compression | None:
  """:func:`from_spec` for a ``--compress`` value: a bad one is a :class:`UsageError` (one
  line in the CLI) that names the flag."""
  try:
    return from_spec(text)
  except ValueError as e:
    raise UsageError(f"--compress: {e}") from None
