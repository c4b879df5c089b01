"""The learned step in bounded memory: features and MLP over blocks of a tensor's parameters.

:func:`~optax_localsgd.transforms.learned.mlp.reference_leaf_step` materialises a tensor's whole
feature matrix and the MLP's hidden activations, about 250 bytes of temporaries per parameter
(5.4 GB for ResNet-50). :func:`blocked_leaf_step` computes the same update with temporaries that
do not grow with the tensor: a tensor of more than ``block_size`` parameters is flattened and
walked in blocks of ``block_size`` parameters.

The features normalise each column over the *whole* tensor (ada-v2: ``x * rsqrt(1e-5 +
mean(x**2))``; ada-v1: ``x / sqrt(mean(x**2))`` after scaling by ``max |x|``), so a block cannot
be normalised on its own. The blocked step makes two passes:

1. over the blocks, reducing each column: its sum of squares (ada-v2), or its running maximum
   and its sum of squares scaled by that maximum (ada-v1, overflow-safe like
   :func:`~optax_localsgd.transforms.learned.features.normalize`);
2. over the blocks again, rebuilding each block's columns, normalising them with the
   tensor-wide statistics, and running the MLP and the update rule on the block.

The columns are built by the same elementwise code as the unblocked step
(:func:`~optax_localsgd.transforms.learned.features.element_columns`), reading the factored
row/column statistics at each parameter's index, so only the order of the sums in pass 1
differs: results agree to float32 rounding. The accumulators are not touched here; they are
advanced, elementwise and whole, before the step. The cost is building the columns twice, a few
percent of the MLP's FLOPs.

The last block is not padded: it starts at ``N - block_size`` and overlaps the one before; pass 1
masks the overlap out of its sums and pass 2 writes the same values twice.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from optax_localsgd.transforms.learned import features
from optax_localsgd.transforms.learned.mlp import mlp_apply, reference_leaf_step
from optax_localsgd.transforms.learned.params import MetaParams

# ``block_size=None``: tensors up to AUTO_WHOLE_MAX parameters run whole, exactly as before, and
# larger ones in blocks of at most DEFAULT_BLOCK_SIZE (about 16 MiB of temporaries at ~250 bytes
# per parameter). The threshold keeps the FMNIST MLP's 784x128 layer (100,352) whole: blocking
# it measured 1.5-1.8x slower there (two passes, short loops), and the meta-trainer runs it
# inside vmapped unrolls.
DEFAULT_BLOCK_SIZE = 2**16
AUTO_WHOLE_MAX = 2**17


def check_block_size(block_size: int | None) -> int | None:
  """``block_size`` if it is a positive int or ``None`` (automatic); a ``ValueError`` otherwise."""
  if block_size is None:
    return None
  if isinstance(block_size, bool) or not isinstance(block_size, numbers.Integral):
    raise ValueError(f"block_size must be a positive int (parameters per block) or None for "
                     f"the default ({DEFAULT_BLOCK_SIZE}), got {block_size!r}.")
  if block_size < 1:
    raise ValueError(f"block_size must be at least 1 parameter per block, got {block_size}.")
  return int(block_size)


def block_length(n: int, block_size: int | None) -> int:
  """Parameters per block for a tensor of ``n`` parameters; ``n`` means "whole".

  ``None`` is automatic: whole up to :data:`AUTO_WHOLE_MAX`, else blocks of at most
  :data:`DEFAULT_BLOCK_SIZE`. The blocks are balanced (``ceil(n / num_blocks)`` each), so the
  overlap of the last block, computed twice, stays under one parameter per block.

  Examples:
    >>> from optax_localsgd.transforms.learned.blocked import block_length
    >>> block_length(100_352, None), block_length(2_359_296, None), block_length(10, 4)
    (100352, 65536, 4)
  """
  block_size = check_block_size(block_size)
  if block_size is None:
    if n <= AUTO_WHOLE_MAX:
      return n
    block_size = DEFAULT_BLOCK_SIZE
  if n <= block_size:
    return n
  return -(-n // -(-n // block_size))


def _reduced_index(idx: jax.Array, view: tuple[int, ...], reduced: tuple[int, ...]) -> jax.Array:
  """For flat (C-order) indices ``idx`` into ``view``, the flat index into the statistic of
  shape ``view`` with the ``reduced`` axes set to 1, i.e. the same index with those axes at 0."""
  out = jnp.zeros_like(idx)
  stride = rstride = 1  # strides in the view and in the reduced shape
  run = 1  # size of the current run of kept axes: one div/mod per run, not per axis
  for a in reversed(range(len(view))):
    if a in reduced:
      if run > 1:
        out = out + ((idx // (stride // run)) % run) * rstride
        rstride *= run
      run = 1
    else:
      run *= view[a]
    stride *= view[a]
  if run > 1:
    out = out + (idx // (stride // run)) * rstride  # the outermost run needs no modulo
  return out


def _block_values(stat: features.Statistic, view: tuple[int, ...], n: int, idx: jax.Array,
                  start: jax.Array, block: int) -> jax.Array:
  """The values of a factored statistic at the parameters ``idx`` (a block from ``start``)."""
  flat = stat.value.reshape(stat.value.shape[0], -1)
  if flat.shape[1] == 1:  # one value for the whole tensor: broadcasts over the block
    return flat
  if flat.shape[1] == n:  # per parameter (rank 0 and 1): a slice, no gather
    return lax.dynamic_slice_in_dim(flat, start, block, axis=1)
  return jnp.take(flat, _reduced_index(idx, view, stat.reduced), axis=1, mode="clip")


def _columns_fn(meta: MetaParams, acc: features.AdaAccumulators, param: jax.Array,
                delta: jax.Array, delta_channels: jax.Array, block: int):
  """``(columns, num_blocks)``: ``columns(i)`` gives block ``i``'s un-normalised columns
  ``(F, block)``, a mask of its entries not in an earlier block, and its start."""
  n = int(param.size)
  cfg = meta.config
  fset = cfg.feature_set
  view = features.factor_spec(param.shape).view_shape
  stats = features.factored_statistics(acc, param.shape, fset)
  sources = (param.reshape(1, n), acc.m.reshape(3, n), acc.v.reshape(1, n), delta.reshape(1, n),
             delta_channels.reshape(-1, n))

  def columns(i):
    start = jnp.minimum(i * block, n - block)  # the last block ends at n, overlapping
    idx = start + jnp.arange(block, dtype=start.dtype)
    vals = [_block_values(s, view, n, idx, start, block) for s in stats]
    p, m, v, d, chans = (lax.dynamic_slice_in_dim(x, start, block, axis=1).astype(jnp.float32)
                         for x in sources)
    x = features.element_columns(vals, p, m, v, d, chans, cfg.eps, fset,
                                 factored=param.ndim >= 2)
    return x, idx >= i * block, start

  return columns, -(-n // block)


def feature_scales(meta: MetaParams, acc: features.AdaAccumulators, param: jax.Array,
                   delta: jax.Array, delta_channels: jax.Array,
                   block_size: int | None = None) -> jax.Array:
  """``(F,)`` factors that normalise the feature columns over the whole tensor: column ``f``
  normalised is ``scale[f] * column f`` (ada-v2: ``rsqrt(1e-5 + mean(x**2))``; ada-v1:
  ``rsqrt(mean((x / max|x|)**2)) / max|x|``, 0 where either is 0). Computed in blocks of at
  most ``block_size`` parameters (pass 1 of :func:`blocked_leaf_step`), so no ``(F, N)``
  matrix is formed; a fused kernel (:mod:`.pallas`) folds them into the MLP's first layer."""
  n = int(param.size)
  block = block_length(n, block_size if block_size is not None else DEFAULT_BLOCK_SIZE)
  columns, num_blocks = _columns_fn(meta, acc, param, delta, delta_channels, block)
  top, sumsq = _reduce_columns(columns, num_blocks, delta_channels.shape[0],
                               meta.config.feature_set)
  if top is None:
    return lax.rsqrt(features.V2_NORMALIZER_EPS + sumsq / n)
  ms = sumsq / n
  ok = (top > 0) & (ms > 0)
  return jnp.where(ok, lax.rsqrt(jnp.where(ok, ms, 1.0)) / jnp.where(ok, top, 1.0), 0.0)


def normalize_columns(x: jax.Array, top: jax.Array | None, sumsq: jax.Array,
                      n: int) -> jax.Array:
  """Columns ``x`` ``(F, B)`` normalised with reductions over the whole tensor of ``n``
  parameters: ada-v2 (``top`` None), ``x * rsqrt(1e-5 + sumsq / n)`` with ``sumsq`` the sum of
  ``x**2``; ada-v1, :func:`features.normalize` with ``top`` the maximum ``|x|`` and ``sumsq``
  the sum of ``(x / top)**2``. Shared by the blocked and the sharded step."""
  if top is None:
    return x * lax.rsqrt(features.V2_NORMALIZER_EPS + sumsq / n)[:, None]
  top, ms = top[:, None], (sumsq / n)[:, None]
  y = jnp.where(top > 0, x / jnp.where(top > 0, top, 1.0), 0.0)
  return jnp.where(ms > 0, y * lax.rsqrt(jnp.where(ms > 0, ms, 1.0)), 0.0)


def _reduce_columns(columns, num_blocks: int, num_channels: int, feature_set: str):
  """Pass 1 over the blocks: ``(None, sum of x**2)`` per column for ada-v2; for ada-v1
  ``(max |x|, sum of (x / max|x|)**2)``, overflow-safe like :func:`features.normalize`."""
  zeros = jnp.zeros(features.NUM_ACCUMULATOR_FEATURES + num_channels, jnp.float32)
  if feature_set == "ada-v2":
    def reduce_v2(i, sumsq):
      x, new, _ = columns(i)
      return sumsq + jnp.sum(jnp.where(new, jnp.square(x), 0.0), axis=1)

    return None, lax.fori_loop(0, num_blocks, reduce_v2, zeros)

  def reduce_v1(i, carry):
    # Running max |x| and sum((x / max)**2), rescaled when the max grows: x**2 never forms.
    top, sumsq = carry
    x, new, _ = columns(i)
    new_top = jnp.maximum(top, jnp.max(jnp.where(new, jnp.abs(x), 0.0), axis=1))
    safe = jnp.where(new_top > 0, new_top, 1.0)
    y = jnp.where(new, x / safe[:, None], 0.0)
    return new_top, sumsq * jnp.square(top / safe) + jnp.sum(jnp.square(y), axis=1)

  return lax.fori_loop(0, num_blocks, reduce_v1, (zeros, zeros))


def blocked_leaf_step(meta: MetaParams, acc: features.AdaAccumulators, param: jax.Array,
                      delta: jax.Array, delta_channels: jax.Array, time_feats: jax.Array,
                      block_size: int | None = None, mlp_dtype: str = "float32") -> jax.Array:
  """:func:`~optax_localsgd.transforms.learned.mlp.reference_leaf_step` in bounded memory.

  A :class:`~optax_localsgd.transforms.learned.mlp.LeafStep` once ``block_size`` is bound
  (``functools.partial``); :func:`~optax_localsgd.lopt_a` and :func:`~optax_localsgd.lagg_a`
  use it by default.

  Args:
    meta, acc, param, delta, delta_channels, time_feats: as in
      :class:`~optax_localsgd.transforms.learned.mlp.LeafStep`.
    block_size: at most this many parameters per block (see :func:`block_length`); ``None``
      for automatic. A tensor that fits in one block runs unblocked (the same computation as
      the reference). Temporaries are about ``250 * block_size`` bytes (plus ``4 K`` per
      parameter for LAgg-A's K channels); smaller blocks add per-block loop overhead.
    mlp_dtype: ``"float32"`` or ``"bfloat16"`` matmuls in the MLP
      (:func:`~optax_localsgd.transforms.learned.mlp.mlp_apply`).

  Returns:
    the update to add to ``param`` (float32, shape of ``param``).
  """
  n = int(param.size)
  block = block_length(n, block_size)
  if block == n:
    return reference_leaf_step(meta, acc, param, delta, delta_channels, time_feats, mlp_dtype)
  cfg = meta.config
  fset = cfg.feature_set
  columns, num_blocks = _columns_fn(meta, acc, param, delta, delta_channels, block)

  top, sumsq = _reduce_columns(columns, num_blocks, delta_channels.shape[0], fset)
  normalize = lambda x: normalize_columns(x, top, sumsq, n)

  def step(i, out):
    x, _, start = columns(i)
    d, m = mlp_apply(meta.mlp, normalize(x).T, time_feats, mlp_dtype)
    update = -cfg.step_mult * d * jnp.exp(cfg.exp_mult * m)
    return lax.dynamic_update_slice_in_dim(out, update, start, axis=0)

  out = lax.fori_loop(0, num_blocks, step, jnp.zeros(n, jnp.float32))
  return out.reshape(param.shape)
