"""Ada features of the learned server optimizers (paper section 3.2, appendix A, Table 4).

Two versions exist, named in every weight file's metadata (``LearnedOptimizerConfig.feature_set``):

* ``"ada-v2"`` (the default for new meta-parameters): the authors' semantics
  (``lefameuxbeding/learned_aggregation``, built on ``google/learned_optimization``): the
  second-moment normaliser ``x * rsqrt(1e-5 + mean(x**2))``, which keeps the scale of small
  features, time features ``tanh(t/x - 1)``, decays ``1 - exp(10 p)``, the small epsilons inside
  the reciprocal square roots, and an unfactored second moment for rank-0 and rank-1 tensors.
* ``"ada-v1"``: what the package shipped first (scale-free normaliser, ``tanh(t/x)``, logit
  decays); kept so that weights meta-trained with it give the same numbers.

The exact definitions are ``docs/features.md``; this module implements them for one parameter
tensor at a time. Everything is a pure function of arrays, so the transforms in
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
FEATURE_SETS = ("ada-v1", "ada-v2")
DEFAULT_FEATURE_SET = "ada-v2"
# ada-v2: the authors' constants (learned_optimization's adafac_mlp_lopt.py and common.py).
V2_NORMALIZER_EPS = 1e-5  # second_moment_normalizer
V2_RMS_EPS = 1e-6  # rsqrt(v + 1e-6)
V2_FACTOR_EPS = 1e-8  # rsqrt(row + 1e-8), rsqrt(col + 1e-8)
V2_SAFE_FLOOR = 1e-9  # safe_rsqrt(x) = rsqrt(max(x, 1e-9)); also "+ 1e-9" under the row mean
V2_GRAD_SQR_EPS = 1e-30  # added to delta**2 in the factored accumulators
V2_DECAY_SCALE = 10.0  # beta = 1 - exp(10 p)


def check_feature_set(feature_set: str) -> str:
  """``feature_set`` if it is a known version, else a ``ValueError`` naming the known ones."""
  if feature_set not in FEATURE_SETS:
    raise ValueError(f"Unknown feature set {feature_set!r}; this version of optax-localsgd "
                     f"computes {', '.join(FEATURE_SETS)}.")
  return feature_set


def num_features(num_delta_channels: int) -> int:
  """Input size of the MLP: 39 for LOpt-A (one delta channel), 38 + K for LAgg-A.

  Examples:
    >>> from optax_localsgd.transforms.learned.features import num_features
    >>> num_features(1), num_features(8)  # LOpt-A; LAgg-A with K = 8
    (39, 46)
  """
  return NUM_ACCUMULATOR_FEATURES + num_delta_channels + NUM_TIME_FEATURES


def decay_logits(offsets: jax.Array, initial: tuple[float, ...]) -> jax.Array:
  """ada-v1: ``logit(initial) + offsets``; the decays are ``sigmoid`` of this (in (0, 1))."""
  b0 = np.asarray(initial, np.float64)
  return jnp.asarray(np.log(b0 / (1 - b0)), jnp.float32) + offsets


class Decays(NamedTuple):
  """The seven decays as ``keep = beta`` and ``mix = 1 - beta``, each ``(7,)`` float32.

  Both are kept because ``1 - beta`` computed from a float32 ``beta`` near 0.999 loses four
  digits; each version computes ``mix`` directly from its parametrisation.
  """
  keep: jax.Array
  mix: jax.Array


def decays(offsets: jax.Array, initial: tuple[float, ...],
           feature_set: str = DEFAULT_FEATURE_SET) -> Decays:
  """The decays beta_1..7 from the meta-learned ``offsets`` (Table 4).

  * ada-v1: ``beta = sigmoid(logit(beta0) + offset)``, always in (0, 1).
  * ada-v2 (the authors'): ``beta = 1 - exp(10 (p0 + offset))`` with
    ``p0 = log(1 - beta0) / 10``. As in the authors' accumulators, the second-moment decays
    (beta_4..7) are clipped to [0, 1] and the momentum decays (beta_1..3) are not.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_localsgd.transforms.learned.features import decays, INITIAL_DECAYS
    >>> d = decays(jnp.zeros(7).at[0].set(0.1), INITIAL_DECAYS, "ada-v2")
    >>> round(float(d.mix[0]), 6)  # 1 - beta_1 = 0.1 * e: an offset of 0.1 scales it by e
    0.271828
  """
  check_feature_set(feature_set)
  offsets = jnp.asarray(offsets, jnp.float32)
  if feature_set == "ada-v1":
    z = decay_logits(offsets, initial)
    return Decays(jax.nn.sigmoid(z), jax.nn.sigmoid(-z))
  b0 = np.asarray(initial, np.float64)
  p = jnp.asarray(np.log1p(-b0) / V2_DECAY_SCALE, jnp.float32) + offsets
  mix = jnp.exp(V2_DECAY_SCALE * p)
  clipped = jnp.arange(NUM_DECAYS) >= 3  # rms and factored decays: clip(beta, 0, 1)
  mix = jnp.where(clipped, jnp.minimum(mix, 1.0), mix)
  return Decays(1.0 - mix, mix)


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
    >>> from optax_localsgd.transforms.learned.features import factor_spec
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


def _ema(acc, x, dec: Decays, sl: slice):
  shape = (-1,) + (1,) * (acc.ndim - 1)
  return dec.keep[sl].reshape(shape) * acc + dec.mix[sl].reshape(shape) * x


def update_accumulators(acc: AdaAccumulators, delta: jax.Array, dec: Decays,
                        feature_set: str = DEFAULT_FEATURE_SET) -> AdaAccumulators:
  """Advance the accumulators by one round with the averaged delta (float32).

  For a rank-0 or rank-1 tensor the view is ``(n, 1)``, so ``row`` is the full second moment
  at decays beta_5..7: ada-v2's unfactored branch reads it as such.

  Args:
    acc: the accumulators of one tensor.
    delta: this round's averaged delta, shape of the tensor.
    dec: the decays (:func:`decays`).
    feature_set: ``"ada-v2"`` adds the authors' 1e-30 to ``delta**2`` in the factored
      accumulators; ``"ada-v1"`` does not.
  """
  delta = delta.astype(jnp.float32)
  spec = factor_spec(delta.shape)
  d2 = jnp.square(delta).reshape(spec.view_shape)
  if check_feature_set(feature_set) == "ada-v2":
    d2 = d2 + V2_GRAD_SQR_EPS
  return AdaAccumulators(
      m=_ema(acc.m, delta[None], dec, slice(0, 3)),
      v=_ema(acc.v[None], jnp.square(delta)[None], dec, slice(3, 4))[0],
      row=_ema(acc.row, jnp.mean(d2, axis=spec.col_axis, keepdims=True)[None], dec,
               slice(4, 7)),
      col=_ema(acc.col, jnp.mean(d2, axis=spec.row_axis, keepdims=True)[None], dec,
               slice(4, 7)),
  )


def _rsqrt(x, eps):
  return jax.lax.rsqrt(jnp.maximum(x, eps))


def normalize(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
  """ada-v1: ``x / sqrt(mean(x**2))`` over ``axes``; 0 where that is 0; safe where ``x**2``
  overflows. Scale-free: the result does not depend on how large ``x`` is."""
  scale = jnp.max(jnp.abs(x), axis=axes, keepdims=True)
  y = jnp.where(scale > 0, x / jnp.where(scale > 0, scale, 1.0), 0.0)
  ms = jnp.mean(jnp.square(y), axis=axes, keepdims=True)
  return jnp.where(ms > 0, y * jax.lax.rsqrt(jnp.where(ms > 0, ms, 1.0)), 0.0)


def second_moment_normalize(x: jax.Array, axes: tuple[int, ...],
                            eps: float = V2_NORMALIZER_EPS) -> jax.Array:
  """ada-v2: ``x * rsqrt(eps + mean(x**2))`` over ``axes`` (the authors' normaliser).

  The ``eps`` keeps the scale of small features: a column whose mean square is well below
  ``eps`` comes out about ``x / sqrt(eps)``, so the update can depend on how large Δ is.

  Examples:
    >>> import jax.numpy as jnp
    >>> from optax_localsgd.transforms.learned.features import second_moment_normalize
    >>> y = second_moment_normalize(jnp.asarray([3.0, 4.0]), axes=(0,))  # mean x^2 = 12.5
    >>> [round(float(v), 4) for v in y]
    [0.8485, 1.1314]
  """
  return x * jax.lax.rsqrt(eps + jnp.mean(jnp.square(x), axis=axes, keepdims=True))


def time_features(count: jax.Array, feature_set: str = DEFAULT_FEATURE_SET) -> jax.Array:
  """The 11 time features, shape ``(11,)``; ``t`` is the round counter (0 in the first round).

  ada-v2: ``tanh(t / x - 1)`` (the authors'); ada-v1: ``tanh(t / x)``; ``x`` in
  :data:`TIME_SCALES`. They are not normalised.
  """
  t = jnp.asarray(count, jnp.float32) / jnp.asarray(TIME_SCALES, jnp.float32)
  return jnp.tanh(t - 1.0 if check_feature_set(feature_set) == "ada-v2" else t)


class Statistic(NamedTuple):
  """A tensor-level statistic the features read, broadcast over the view of the tensor.

  Attributes:
    value: ``(L,) + shape`` where ``shape`` is the view with the axes in ``reduced`` set to 1
      (``L`` is 3 for the three factored decays).
    reduced: the view axes ``value`` is reduced over; each parameter reads the entry at its own
      index with those axes set to 0.
  """
  value: jax.Array
  reduced: tuple[int, ...]


def factored_statistics(acc: AdaAccumulators, shape: tuple[int, ...],
                        feature_set: str = DEFAULT_FEATURE_SET) -> tuple[Statistic, ...]:
  """The factored statistics of one tensor that :func:`element_columns` reads.

  They are small (reduced over at least one axis of the view), except for rank 0 and 1 where
  ``row`` is per parameter. Computing their reductions here, once per tensor, is what lets the
  columns be evaluated on any subset of the parameters (:mod:`.blocked`).

  Returns:
    ada-v1: ``(row, col, mean of row over the row axis)``. ada-v2, rank >= 2: the authors'
    ``(v_row, v_col, mean of v_row over d1)``; ada-v2, rank 0 and 1: ``(row,)``, the full
    second moment at decays beta_5..7.
  """
  spec = factor_spec(shape)
  ra, ca = spec.row_axis, spec.col_axis
  if check_feature_set(feature_set) == "ada-v1":
    row_mean = jnp.mean(acc.row, axis=ra + 1, keepdims=True)  # +1 for the leading decay axis
    return (Statistic(acc.row, (ca,)), Statistic(acc.col, (ra,)),
            Statistic(row_mean, (ra, ca)))
  if len(shape) < 2:
    return (Statistic(acc.row, (ca,)),)
  # The authors' factored dims: d0 the largest axis, d1 the second (ties to the later axis);
  # v_row averages over d0, v_col over d1. Our ``row`` averages over col_axis.
  vshape = spec.view_shape
  if (vshape[ca], ca) > (vshape[ra], ra):  # d0 is the column axis
    v_row, v_col, d1 = Statistic(acc.row, (ca,)), Statistic(acc.col, (ra,)), ra
  else:
    v_row, v_col, d1 = Statistic(acc.col, (ra,)), Statistic(acc.row, (ca,)), ca
  row_mean = jnp.mean(v_row.value, axis=d1 + 1, keepdims=True)
  return v_row, v_col, Statistic(row_mean, (ra, ca))


def element_columns(stats: tuple[jax.Array, ...], param: jax.Array, m: jax.Array, v: jax.Array,
                    delta: jax.Array, delta_channels: jax.Array, eps: float = EPS,
                    feature_set: str = DEFAULT_FEATURE_SET, factored: bool = True) -> jax.Array:
  """The un-normalised feature columns of a set of parameters, float32 ``(27 + C,) + E``: the
  groups of :func:`element_channels`, concatenated."""
  return jnp.concatenate(element_channels(stats, param, m, v, delta, delta_channels, eps,
                                          feature_set, factored))


def element_channels(stats: tuple[jax.Array, ...], param: jax.Array, m: jax.Array, v: jax.Array,
                     delta: jax.Array, delta_channels: jax.Array, eps: float = EPS,
                     feature_set: str = DEFAULT_FEATURE_SET,
                     factored: bool = True) -> list[jax.Array]:
  """The un-normalised feature columns of a set of parameters, as the list of their groups in
  column order (each ``(k,) + E``, k = 1 or 3, then the C delta channels); concatenated, the
  ``(27 + C,) + E`` columns. A fused kernel reads them group by group (:mod:`.pallas`).

  ``E`` is the shape of the parameters evaluated: the whole view of a tensor
  (:func:`tensor_features`) or a block of its flattened parameters (:mod:`.blocked`). Every
  argument broadcasts against ``(1,) + E``; the same elementwise operations run either way, so
  a block's columns are the whole tensor's, sliced.

  Args:
    stats: the values of :func:`factored_statistics`, each broadcastable to ``(3,) + E``.
    param: ``(1,) + E``: W_t. m: ``(3,) + E``; v: ``(1,) + E``; delta: ``(1,) + E`` (float32).
    delta_channels: ``(C,) + E``: the delta channel(s) fed to the MLP.
    eps: ada-v1 only: floor under reciprocal square roots.
    feature_set: ``"ada-v2"`` or ``"ada-v1"``.
    factored: whether the tensor has rank >= 2 (ada-v2 treats rank 0 and 1 unfactored).
  """
  shape3 = (3,) + jnp.broadcast_shapes(param.shape, delta_channels.shape)[1:]
  tile = lambda x: jnp.broadcast_to(x, shape3)
  if check_feature_set(feature_set) == "ada-v1":
    row, col, row_mean = stats
    # ~1/sqrt(E[delta^2]), from the row and column statistics alone.
    fac = _rsqrt(row / jnp.maximum(row_mean, _FLT_MIN), eps) * _rsqrt(col, eps)
    rsqrt_v = _rsqrt(v, eps)
    chans = [param, tile(m), v, m * rsqrt_v, rsqrt_v, delta * fac, tile(row), tile(col),
             tile(_rsqrt(row, eps)), tile(_rsqrt(col, eps)), m * fac, delta_channels]
    return [jnp.broadcast_to(c, c.shape[:1] + shape3[1:]) for c in chans]
  safe_rsqrt = lambda x: jax.lax.rsqrt(jnp.maximum(x, V2_SAFE_FLOOR))
  rsqrt_v = jax.lax.rsqrt(v + V2_RMS_EPS)
  if factored:
    v_row, v_col, row_mean = stats
    fac = safe_rsqrt(v_row / (row_mean + V2_SAFE_FLOOR)) * safe_rsqrt(v_col)
    row_feat, col_feat = tile(v_row), tile(v_col)
    fac_g, fac_m = delta * fac, m * fac
  else:
    # Unfactored (rank 0 and 1), the authors' "match what RMSProp does" branch: the statistic
    # is the full second moment at decays beta_5..7 in the (n, 1) view.
    (v_full,) = stats
    row_feat = col_feat = v_full = tile(v_full)
    fac_g = delta * safe_rsqrt(v_full + V2_SAFE_FLOOR)
    fac_m = m * jax.lax.rsqrt(v_full + V2_RMS_EPS)
  chans = [param, tile(m), v, m * rsqrt_v, rsqrt_v, fac_g, row_feat, col_feat,
           jax.lax.rsqrt(row_feat + V2_FACTOR_EPS), jax.lax.rsqrt(col_feat + V2_FACTOR_EPS),
           fac_m, delta_channels]
  return [jnp.broadcast_to(c, c.shape[:1] + shape3[1:]) for c in chans]


def tensor_features(acc: AdaAccumulators, param: jax.Array, delta: jax.Array,
                    delta_channels: jax.Array, eps: float = EPS,
                    feature_set: str = DEFAULT_FEATURE_SET) -> jax.Array:
  """The normalised, per-parameter features of one tensor, without the time features.

  Materialises the whole ``(N, 27 + C)`` matrix (about 120 + 4 C bytes per parameter); the
  blocked step of :mod:`.blocked` computes the same numbers in bounded memory.

  Args:
    acc: accumulators already advanced with ``delta``.
    param: the current parameter value W_t, any shape.
    delta: the averaged delta (same shape as ``param``).
    delta_channels: ``(C,) + shape``: the delta channel(s) fed to the MLP: ``delta[None]``
      for LOpt-A, the K worker deltas for LAgg-A.
    eps: ada-v1 only: floor under reciprocal square roots (ada-v2 has the authors' own).
    feature_set: ``"ada-v2"`` or ``"ada-v1"``.

  Returns:
    float32 array ``(param.size, 27 + C)`` in the column order of ``docs/features.md``
    (the time features, identical for all parameters, are added by the caller).
  """
  vshape = factor_spec(param.shape).view_shape
  stats = [s.value for s in factored_statistics(acc, param.shape, feature_set)]
  as_view = lambda x, lead: x.astype(jnp.float32).reshape((lead,) + vshape)
  cols = element_columns(stats, as_view(param, 1), as_view(acc.m, 3), as_view(acc.v, 1),
                         as_view(delta, 1), as_view(delta_channels, -1), eps, feature_set,
                         factored=param.ndim >= 2)
  stacked = cols.reshape(-1, param.size)  # (F, N)
  if feature_set == "ada-v1":
    return normalize(stacked, axes=(1,)).T
  return second_moment_normalize(stacked, axes=(1,)).T
