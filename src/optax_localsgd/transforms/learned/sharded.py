"""The learned step on one device's slice of each tensor (the sharded server step, ZeRO-1).

Under ``engine.make_round_fn(..., shard_server=True)`` each device holds a
:class:`~optax_localsgd.sharding.ShardSlice` of every tensor: ``L`` consecutive entries of the
flattened, zero-padded tensor. What LOpt-A computes per parameter is elementwise except for
three tensor-wide reductions, which here are partial sums over the slice combined across the
devices:

1. the factored second moments (``row``, ``col``: means of ``delta**2`` over one axis of the
   tensor's view): each device adds its entries into the row and column they belong to
   (``segment_sum`` at each entry's reduced index), then ``psum``;
2. the features' normalisers (ada-v2: each column's mean square; ada-v1: its maximum and the
   mean square scaled by it): partial sums over the valid entries, then ``psum`` / ``pmax``;
3. the mean of the row statistic in ada-v2's factored features, which reads the (now whole)
   ``row`` and ``col`` and needs nothing more.

The momenta and the second moment are elementwise, so they are kept as slices: the state per
device is ``4 L`` floats plus the small factored statistics (replicated), against ``4 n`` for the
replicated step. Everything else (the columns of :func:`~.features.element_columns`, the MLP and
the update rule) runs on the slice exactly as the blocked step runs on a block, so the result
equals the replicated step up to the order of float sums.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from optax_localsgd.sharding import ShardSlice
from optax_localsgd.transforms.learned import blocked, features
from optax_localsgd.transforms.learned.blocked import _reduced_index
from optax_localsgd.transforms.learned.mlp import mlp_apply
from optax_localsgd.transforms.learned.params import MetaParams


def _reduced_shape(view: tuple[int, ...], axis: int) -> tuple[int, ...]:
  shape = list(view)
  shape[axis] = 1
  return tuple(shape)


def init_accumulators(s: ShardSlice) -> features.AdaAccumulators:
  """Zero accumulators of one device's slice: momenta and second moment as ``(3, L)`` and
  ``(L,)`` slices, the factored statistics whole (they are small), as
  :func:`~.features.init_accumulators` shapes them for the whole tensor."""
  spec = features.factor_spec(s.shape)
  z = lambda shape: jnp.zeros(shape, jnp.float32)
  return features.AdaAccumulators(
      m=z((3, s.length)), v=z((s.length,)),
      row=z((3,) + _reduced_shape(spec.view_shape, spec.col_axis)),
      col=z((3,) + _reduced_shape(spec.view_shape, spec.row_axis)))


def _axis_mean(values: jax.Array, idx: jax.Array, view: tuple[int, ...], axis: int,
               axis_name: str) -> jax.Array:
  """``mean(x, axis, keepdims=True)`` of the whole tensor (in its ``view``) from this slice's
  entries ``values`` at flat indices ``idx`` (padding already zeroed), summed over devices."""
  out_shape = _reduced_shape(view, axis)
  seg = _reduced_index(idx, view, (axis,))
  partial = jax.ops.segment_sum(values, seg, num_segments=math.prod(out_shape))
  return (lax.psum(partial, axis_name) / view[axis]).reshape(out_shape)


def update_accumulators(acc: features.AdaAccumulators, delta: ShardSlice,
                        dec: features.Decays, feature_set: str) -> features.AdaAccumulators:
  """:func:`~.features.update_accumulators` for one device's slice of the averaged delta."""
  spec = features.factor_spec(delta.shape)
  view = spec.view_shape
  idx = delta.indices()
  valid = idx < delta.size
  d = delta.data.astype(jnp.float32)
  d2 = jnp.square(d)
  if features.check_feature_set(feature_set) == "ada-v2":
    d2 = d2 + features.V2_GRAD_SQR_EPS
  d2 = jnp.where(valid, d2, 0.0)
  idx = jnp.minimum(idx, delta.size - 1)  # padding adds 0 to the last entry's row and column
  row = _axis_mean(d2, idx, view, spec.col_axis, delta.axis_name)
  col = _axis_mean(d2, idx, view, spec.row_axis, delta.axis_name)
  return features.AdaAccumulators(
      m=features._ema(acc.m, d[None], dec, slice(0, 3)),
      v=features._ema(acc.v[None], jnp.square(d)[None], dec, slice(3, 4))[0],
      row=features._ema(acc.row, row[None], dec, slice(4, 7)),
      col=features._ema(acc.col, col[None], dec, slice(4, 7)))


def leaf_step(meta: MetaParams, acc: features.AdaAccumulators, param: ShardSlice,
              delta: ShardSlice, delta_channels: jax.Array,
              time_feats: jax.Array, mlp_dtype: str = "float32") -> jax.Array:
  """The update of one device's slice of a tensor, ``(L,)`` float32: the built-in leaf step
  with the normalisers reduced over the devices (module docstring). ``acc`` is already
  advanced by :func:`update_accumulators`; ``delta_channels`` is ``(C, L)``; ``mlp_dtype`` as
  in :func:`~optax_localsgd.transforms.learned.mlp.mlp_apply`."""
  cfg = meta.config
  fset = cfg.feature_set
  shape, n, axis = param.shape, param.size, param.axis_name
  view = features.factor_spec(shape).view_shape
  idx = param.indices()
  valid = idx < n
  idx = jnp.minimum(idx, n - 1)
  vals = []
  for stat in features.factored_statistics(acc, shape, fset):
    flat = stat.value.reshape(stat.value.shape[0], -1)
    vals.append(flat if flat.shape[1] == 1 else
                jnp.take(flat, _reduced_index(idx, view, stat.reduced), axis=1))
  f32 = lambda x: x.astype(jnp.float32)
  x = features.element_columns(vals, f32(param.data)[None], acc.m, acc.v[None],
                               f32(delta.data)[None], f32(delta_channels), cfg.eps, fset,
                               factored=len(shape) >= 2)
  # The normalisers' reductions over the whole tensor: partial over this slice, then psum.
  sum_valid = lambda y: lax.psum(jnp.sum(jnp.where(valid, y, 0.0), axis=1), axis)
  if fset == "ada-v2":
    top, sumsq = None, sum_valid(jnp.square(x))
  else:
    top = lax.pmax(jnp.max(jnp.where(valid, jnp.abs(x), 0.0), axis=1), axis)
    sumsq = sum_valid(jnp.square(x / jnp.where(top > 0, top, 1.0)[:, None]))
  x = blocked.normalize_columns(x, top, sumsq, n)
  d, m = mlp_apply(meta.mlp, x.T, time_feats, mlp_dtype)
  return jnp.where(valid, -cfg.step_mult * d * jnp.exp(cfg.exp_mult * m), 0.0)
