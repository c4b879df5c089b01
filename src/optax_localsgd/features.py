"""Ada features of the learned server optimizers (paper section 3.2, appendix A, Table 4).

The exact definition, including the choices the paper leaves open (epsilon, how tensors of rank
0, 1 and >= 3 are factored), is ``docs/features.md``; this module implements it for one
parameter tensor at a time. Everything is a pure function of arrays, so the transforms in
:mod:`optax_localsgd.transforms` can ``jax.tree.map`` it over a params pytree.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NUM_DECAYS = 7
# beta_1..3 momenta, beta_4 second moment, beta_5..7 factored second moments.
INITIAL_DECAYS = (0.9, 0.99, 0.999, 0.999, 0.9, 0.99, 0.999)
TIME_SCALES = (1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5)
NUM_TIME_FEATURES = len(TIME_SCALES)
# Features built from the accumulators, before the delta channel(s): w, m(3), v, m/sqrt(v)(3),
# 1/sqrt(v), delta*fac(3), r(3), c(3), rsqrt(r)(3), rsqrt(c)(3), m*fac(3).
NUM_ACCUMULATOR_FEATURES = 27
EPS = 1e-10
_FLT_MIN = float(np.finfo(np.float32).tiny)


def num_features(num_delta_channels: int) -> int:
  """Input size of the MLP: 39 for LOpt-A (one delta channel), 38 + K for LAgg-A.

  Examples:
    >>> from optax_localsgd.features import num_features
    >>> num_features(1), num_features(8)  # LOpt-A; LAgg-A with K = 8
    (39, 46)
  """
  return NUM_ACCUMULATOR_FEATURES + num_delta_channels + NUM_TIME_FEATURES


def decay_logits(offsets: jax.Array, initial: tuple[float, ...]) -> jax.Array:
  """``logit(initial) + offsets``; the decays are ``sigmoid`` of this (always in (0, 1)).

  Accumulators are updated from the logits, with ``1 - beta = sigmoid(-logit)``, because
  ``1 - beta`` computed from a float32 ``beta`` near 0.999 loses four digits.
  """
  b0 = np.asarray(initial, np.float64)
  return jnp.asarray(np.log(b0 / (1 - b0)), jnp.float32) + offsets


class FactorSpec(NamedTuple):
  """How a tensor is factored: its rank->=2 view and the two factored axes."""
  view_shape: tuple[int, ...]
  row_axis: int
  col_axis: int


def factor_spec(shape: tuple[int, ...]) -> FactorSpec:
  """The factored view of a tensor of ``shape`` (docs/features.md, 'factored view').

  Rank 0 is seen as ``(1, 1)`` and rank 1 ``(n,)`` as ``(n, 1)``, which makes the factored
  second moment equal the full one. For rank >= 2 the two largest axes are factored, ties going
  to the later axis (so conv kernels ``(h, w, in, out)`` factor ``in`` and ``out``).

  Examples:
    >>> from optax_localsgd.features import factor_spec
    >>> factor_spec((3, 3, 64, 64))  # a conv kernel: factors "in" and "out"
    FactorSpec(view_shape=(3, 3, 64, 64), row_axis=2, col_axis=3)
    >>> factor_spec((10,))  # a bias is seen as a (10, 1) matrix
    FactorSpec(view_shape=(10, 1), row_axis=0, col_axis=1)
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) == 0:
    return FactorSpec((1, 1), 0, 1)
  if len(shape) == 1:
    return FactorSpec((shape[0], 1), 0, 1)
  by_size = sorted(range(len(shape)), key=lambda a: (shape[a], a), reverse=True)
  row, col = sorted(by_size[:2])
  return FactorSpec(shape, row, col)


class AdaAccumulators(NamedTuple):
  """Per-tensor statistics of the averaged delta; stored in float32.

  Attributes:
    m: ``(3,) + shape``: momenta with decays beta_1..3.
    v: ``shape``: second moment with decay beta_4.
    row: ``(3,) + view`` with the column axis reduced to 1; decays beta_5..7.
    col: ``(3,) + view`` with the row axis reduced to 1; decays beta_5..7.
  """
  m: jax.Array
  v: jax.Array
  row: jax.Array
  col: jax.Array


def init_accumulators(param: jax.Array) -> AdaAccumulators:
  """Zero accumulators for one parameter tensor."""
  spec = factor_spec(param.shape)
  row_shape = list(spec.view_shape)
  row_shape[spec.col_axis] = 1
  col_shape = list(spec.view_shape)
  col_shape[spec.row_axis] = 1
  z = lambda s: jnp.zeros(s, jnp.float32)
  return AdaAccumulators(
      m=z((3,) + tuple(param.shape)), v=z(param.shape),
      row=z((3,) + tuple(row_shape)), col=z((3,) + tuple(col_shape)))


def _ema(acc, x, logits):
  z = logits.reshape((-1,) + (1,) * (acc.ndim - 1))
  return jax.nn.sigmoid(z) * acc + jax.nn.sigmoid(-z) * x


def update_accumulators(acc: AdaAccumulators, delta: jax.Array,
                        logits: jax.Array) -> AdaAccumulators:
  """Advance the accumulators by one round with the averaged delta (float32).

  Args:
    acc: the accumulators of one tensor.
    delta: this round's averaged delta, shape of the tensor.
    logits: ``(7,)`` decay logits (:func:`decay_logits`).
  """
  delta = delta.astype(jnp.float32)
  spec = factor_spec(delta.shape)
  d2 = jnp.square(delta).reshape(spec.view_shape)
  return AdaAccumulators(
      m=_ema(acc.m, delta[None], logits[0:3]),
      v=_ema(acc.v[None], jnp.square(delta)[None], logits[3:4])[0],
      row=_ema(acc.row, jnp.mean(d2, axis=spec.col_axis, keepdims=True)[None], logits[4:7]),
      col=_ema(acc.col, jnp.mean(d2, axis=spec.row_axis, keepdims=True)[None], logits[4:7]),
  )


def _rsqrt(x, eps):
  return jax.lax.rsqrt(jnp.maximum(x, eps))


def normalize(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """``x / sqrt(mean(x**2))`` over ``axes``; 0 where that is 0; safe where ``x**2`` overflows."""
  scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  y = jnp.where(scale > 0, x / jnp.where(scale > 0, scale, 1.0), 0.0)
  ms = jnp.mean(jnp.square(y), axis=axes, keepdims=True)
  return jnp.where(ms > 0, y * jax.lax.rsqrt(jnp.where(ms > 0, ms, 1.0)), 0.0)


def time_features(count: jax.Array) -> jax.Array:
  """The 11 features ``tanh(t / x)``, shape ``(11,)``; ``t`` is the round counter."""
  t = jnp.asarray(count, jnp.float32)
  return jnp.tanh(t / jnp.asarray(TIME_SCALES, jnp.float32))


def tensor_features(acc: AdaAccumulators, param: jax.Array, delta: jax.Array,
                    delta_channels: jax.Array, eps: float = EPS) -> jax.Array:
  """The normalised, per-parameter features of one tensor, without the time features.

  Args:
    acc: accumulators already advanced with ``delta``.
    param: the current parameter value W_t, any shape.
    delta: the averaged delta (same shape as ``param``).
    delta_channels: ``(C,) + shape``: the delta channel(s) fed to the MLP: ``delta[None]``
      for LOpt-A, the K worker deltas for LAgg-A.
    eps: floor under reciprocal square roots.

  Returns:
    float32 array ``(param.size, 27 + C)`` in the column order of ``docs/features.md``
    (the time features, identical for all parameters, are added by the caller).
  """
  spec = factor_spec(param.shape)
  view = (3,) + spec.view_shape
  ra, ca = spec.row_axis + 1, spec.col_axis + 1  # +1 for the leading decay axis.
  row_mean = jnp.mean(acc.row, axis=ra, keepdims=True)
  row_factor = _rsqrt(acc.row / jnp.maximum(row_mean, _FLT_MIN), eps)
  fac = row_factor * _rsqrt(acc.col, eps)  # broadcasts to the view: ~1/sqrt(E[delta^2]).
  m = acc.m.reshape(view)
  d = delta.astype(jnp.float32).reshape(spec.view_shape)[None]
  rsqrt_v = _rsqrt(acc.v, eps).reshape(spec.view_shape)[None]
  tile = lambda x: jnp.broadcast_to(x, view)
  chans = [
      param.astype(jnp.float32).reshape(spec.view_shape)[None],
      m, acc.v.reshape(spec.view_shape)[None], m * rsqrt_v, rsqrt_v,
      d * fac, tile(acc.row), tile(acc.col),
      tile(_rsqrt(acc.row, eps)), tile(_rsqrt(acc.col, eps)), m * fac,
      delta_channels.astype(jnp.float32).reshape((-1,) + spec.view_shape),
  ]
  stacked = jnp.concatenate(chans, axis=0).reshape(-1, param.size)  # (F, N)
  return normalize(stacked, axes=(1,)).T
