"""A fused Pallas kernel for the learned step: features and MLP in one pass over blocks.

:func:`pallas_leaf_step` is a :class:`~optax_localsgd.transforms.learned.mlp.LeafStep` that
never forms the ``(N, 27 + C)`` feature matrix nor the MLP's hidden activations of the whole
tensor. Per tensor it

1. computes the per-column normalisers in blocks (:func:`.blocked.feature_scales`, pass 1 of
   the blocked step) and folds them into the first layer's weights: ``w0[f] * scale[f]``;
   the 11 time features, the same for every parameter, are folded into its bias;
2. runs one Pallas kernel over blocks of ``block_size`` parameters. Each program reads its
   block of the per-parameter inputs (W_t, the momenta, the second moment, the delta, the
   delta channels and the factored statistics at its parameters), builds the feature groups of
   :func:`~.features.element_channels` in registers, accumulates the first layer as one
   rank-1 update per feature (no feature matrix, no concatenation), runs the two other layers
   and writes ``-lambda_1 * d * exp(lambda_2 * m)``.

The same code runs compiled on a GPU and, with ``interpret=True``, on any backend (the CPU
tests check it against :func:`~.mlp.reference_leaf_step` that way). Pallas compiles only for
GPUs and TPUs, so ``interpret=None`` means: compiled there, interpreted elsewhere.

Select it with ``lopt_a(meta, leaf_step=pallas.pallas_leaf_step)`` (or ``functools.partial``
with another ``block_size``). Its inputs per parameter are gathered once per tensor (W_t, 3
momenta, v, Δ, C channels and 3-9 statistics values: 4 (9 + C) to 4 (15 + C) bytes), about a
tenth of the reference step's temporaries.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from optax_localsgd.transforms.learned import blocked, features
from optax_localsgd.transforms.learned.params import MetaParams

DEFAULT_BLOCK = 512


def _kernel(x_ref, w0_ref, b0_ref, w1_ref, b1_ref, w2_ref, b2_ref, o_ref, *, rows, eps,
            feature_set, factored, step_mult, exp_mult):
  x = x_ref[...]  # (R, B): the per-parameter inputs of this block, one per row
  parts, at = [], 0
  for r in rows:
    parts.append(x[at:at + r])
    at += r
  param, m, v, delta, chans, *stats = parts
  groups = features.element_channels(stats, param, m, v, delta, chans, eps, feature_set,
                                     factored)
  w0 = w0_ref[...]
  h = jnp.broadcast_to(b0_ref[...], (x.shape[1], w0.shape[1]))
  f = 0
  for g in groups:  # the first layer, one feature at a time: h += x_f w0_f
    for i in range(g.shape[0]):
      h = h + g[i][:, None] * w0[f][None, :]
      f += 1
  h = jax.nn.relu(h)
  h = jax.nn.relu(jnp.dot(h, w1_ref[...]) + b1_ref[...])
  w2, b2 = w2_ref[...], b2_ref[...]
  d = jnp.sum(h * w2[:, 0][None, :], axis=1) + b2[0, 0]
  mag = jnp.sum(h * w2[:, 1][None, :], axis=1) + b2[0, 1]
  o_ref[...] = (-step_mult * d * jnp.exp(exp_mult * mag))[None, :]


def pallas_leaf_step(meta: MetaParams, acc: features.AdaAccumulators, param: jax.Array,
                     delta: jax.Array, delta_channels: jax.Array, time_feats: jax.Array,
                     block_size: int = DEFAULT_BLOCK, interpret: bool | None = None) -> jax.Array:
  """The learned update of one tensor with the fused kernel (module docstring).

  Args:
    meta, acc, param, delta, delta_channels, time_feats: as in
      :class:`~optax_localsgd.transforms.learned.mlp.LeafStep`.
    block_size: parameters per kernel program (a multiple of 128 suits GPUs).
    interpret: run the kernel in Pallas interpret mode; ``None``: only where Pallas cannot
      compile (not a GPU or TPU).

  Returns:
    the update to add to ``param`` (float32, shape of ``param``).
  """
  if interpret is None:
    interpret = jax.default_backend() not in ("gpu", "tpu")
  cfg = meta.config
  fset = cfg.feature_set
  n = int(param.size)
  block = max(1, min(int(block_size), n))
  n_pad = -(-n // block) * block
  view = features.factor_spec(param.shape).view_shape
  idx = jnp.arange(n, dtype=jnp.int32)
  stats = [blocked._block_values(s, view, n, idx, jnp.int32(0), n)
           for s in features.factored_statistics(acc, param.shape, fset)]
  rows_in = [param.reshape(1, n), acc.m.reshape(3, n), acc.v.reshape(1, n), delta.reshape(1, n),
             delta_channels.reshape(-1, n)]
  rows_in += [jnp.broadcast_to(s, (s.shape[0], n)) for s in stats]
  x = jnp.concatenate([r.astype(jnp.float32) for r in rows_in])
  x = jnp.pad(x, ((0, 0), (0, n_pad - n)), mode="edge")  # padding: finite, discarded

  num_cols = features.NUM_ACCUMULATOR_FEATURES + delta_channels.shape[0]
  scale = blocked.feature_scales(meta, acc, param, delta, delta_channels)
  mlp = meta.mlp
  w0 = mlp["w0"][:num_cols] * scale[:, None]
  b0 = (mlp["b0"] + time_feats @ mlp["w0"][num_cols:])[None, :]
  weights = (w0, b0, mlp["w1"], mlp["b1"][None, :], mlp["w2"], mlp["b2"][None, :])
  kernel = functools.partial(
      _kernel, rows=tuple(r.shape[0] for r in rows_in), eps=cfg.eps, feature_set=fset,
      factored=param.ndim >= 2, step_mult=cfg.step_mult, exp_mult=cfg.exp_mult)
  whole = lambda a: pl.BlockSpec(a.shape, lambda i: (0, 0))
  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((1, n_pad), jnp.float32), grid=(n_pad // block,),
      in_specs=[pl.BlockSpec((x.shape[0], block), lambda i: (0, i))] +
               [whole(w) for w in weights],
      out_specs=pl.BlockSpec((1, block), lambda i: (0, i)), interpret=interpret)(x, *weights)
  return out[0, :n].reshape(param.shape)
