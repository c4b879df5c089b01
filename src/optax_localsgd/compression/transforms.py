"""Compressors of a worker's delta, as Optax transforms: top-k sparsification and quantisation.

A compressor is applied by each worker to its delta ``Delta = W_old - W_new`` before it is sent
(paper appendix E.5). Its output is what the server *reconstructs*: a pytree like the input, of
the same dtypes, holding the sparse or dequantised delta. What that costs on the wire is counted
separately, in a documented encoding (:mod:`optax_localsgd.compression.spec`).

Both transforms work leaf by leaf, on any pytree of float arrays (rank 0 included), need no
``params``, and are pure functions of their inputs and state: they ``jit`` and ``vmap``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

SUPPORTED_BITS = (2, 4, 8)


class TopKState(NamedTuple):
  """State of :func:`top_k` with error feedback.

  Attributes:
    residual: what was dropped so far and not yet sent, a pytree like the updates (same units
      as a delta: weights).
  """
  residual: Any


class QuantizeState(NamedTuple):
  """State of :func:`quantize` with stochastic rounding.

  Attributes:
    key: the ``jax.random.PRNGKey`` (``uint32[2]``) of the next step's rounding; split on every
      step. The engine folds each worker's index into it, so workers round independently.
  """
  key: jax.Array


def check_fraction(fraction: Any) -> float:
  """``fraction`` as a float, or a ``ValueError`` unless it is a real number in ``(0, 1]``."""
  if (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real)
      or not 0 < float(fraction) <= 1):
    raise ValueError(f"top_k: fraction must be a number in (0, 1], got {fraction!r}.")
  return float(fraction)


def check_bits(bits: Any) -> int:
  """``bits`` as an int, or a ``ValueError`` unless it is one of :data:`SUPPORTED_BITS`."""
  if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or bits not in SUPPORTED_BITS:
    raise ValueError(f"quantize: bits must be one of {SUPPORTED_BITS}, got {bits!r}.")
  return int(bits)


def num_kept(fraction: float, size: int) -> int:
  """Entries :func:`top_k` keeps of a leaf of ``size`` entries: ``ceil(fraction * size)``,
  at least 1 (and at most ``size``).

  The product is rounded to 6 decimals before the ceiling, so that float representation error
  (``0.07 * 100 == 7.000000000000001``) does not keep one entry more than the fraction says.
  """
  return min(size, max(1, math.ceil(round(fraction * size, 6))))


def _check_like(updates, reference, what: str) -> None:
  # A delta of another model than the one the state was made for would otherwise fail deep
  # inside jnp with a shape error naming no leaf.
  s, r = jax.tree.structure(updates), jax.tree.structure(reference)
  if s != r:
    raise ValueError(f"{what}: the updates do not have the structure of the state made by "
                     f"init:\n  updates: {s}\n  state: {r}")
  for path_u, ref in zip(jax.tree_util.tree_leaves_with_path(updates), jax.tree.leaves(reference)):
    path, u = path_u
    if jnp.shape(u) != jnp.shape(ref):
      raise ValueError(f"{what}: leaf {jax.tree_util.keystr(path) or '<root>'} has shape "
                       f"{jnp.shape(u)}, but init saw {jnp.shape(ref)}.")


def _keep_top_k(x: jax.Array, fraction: float) -> jax.Array:
  """``x`` with all but its ``num_kept`` largest-magnitude entries set to zero."""
  k = num_kept(fraction, x.size)
  if k == x.size:
    return x
  flat = x.reshape(-1)
  # lax.top_k returns, among equal magnitudes, the lower index first: ties keep the entries
  # that come first in row-major order, deterministically.
  _, idx = jax.lax.top_k(jnp.abs(flat), k)
  return jnp.zeros_like(flat).at[idx].set(flat[idx]).reshape(x.shape)


def top_k(fraction: float, error_feedback: bool = False) -> optax.GradientTransformation:
  r"""Top-k sparsification: keep the largest-magnitude entries of each leaf, zero the rest.

  For a leaf :math:`x` of :math:`n` entries, with :math:`k = \max(1, \lceil f n \rceil)`
  (:func:`num_kept`),

  .. math::

    C(x)_i = x_i \ \text{if } |x_i| \text{ is among the } k \text{ largest of } |x|,
    \text{ else } 0.

  Ties among equal magnitudes keep the entries with the lower row-major index (the order of
  ``jax.lax.top_k``), so exactly :math:`k` entries are kept. A leaf with :math:`f n < 1`, a
  rank-0 leaf included, keeps one entry: a worker always sends something of every tensor.

  With ``error_feedback=True`` (Stich et al., 2018), the dropped part is kept in the state and
  added to the next step's input before selecting:

  .. math::

    a_t = x_t + e_{t-1}, \qquad s_t = C(a_t), \qquad e_t = a_t - s_t, \qquad e_0 = 0,

  so that :math:`\sum_{t \le T} s_t + e_T = \sum_{t \le T} x_t`: nothing is lost, only
  delayed. (Elementwise, :math:`s_t + e_t = a_t` holds exactly in floating point: each entry
  is either sent or kept, never split.)

  Args:
    fraction: :math:`f`, the fraction of each leaf's entries to keep, in ``(0, 1]``.
    error_feedback: accumulate what was dropped and send it later.

  Returns:
    An ``optax.GradientTransformation``. ``update(updates, state, params=None)`` returns the
    sparse pytree :math:`s_t` (same shapes and dtypes as ``updates``); ``params`` is ignored.
    The state is ``optax.EmptyState()`` or, with error feedback, a :class:`TopKState`.

  Raises:
    ValueError: ``fraction`` is not in ``(0, 1]``.

  Examples:
    Keep the top half of a leaf of 4 entries; with error feedback, what was dropped is sent
    on the next step:

    >>> import jax.numpy as jnp
    >>> from optax_localsgd import compression
    >>> tx = compression.top_k(0.5, error_feedback=True)
    >>> delta = {"w": jnp.array([0.1, -3.0, 2.0, 0.5])}
    >>> state = tx.init(delta)
    >>> sent, state = tx.update(delta, state)
    >>> sent["w"].tolist(), state.residual["w"].tolist()
    ([0.0, -3.0, 2.0, 0.0], [0.10000000149011612, 0.0, 0.0, 0.5])
    >>> sent, state = tx.update({"w": jnp.zeros(4)}, state)
    >>> sent["w"].tolist()
    [0.10000000149011612, 0.0, 0.0, 0.5]

  References:
    Stich, Cordonnier and Jaggi, "Sparsified SGD with Memory", NeurIPS 2018.
    Joseph et al., "Meta-learning Optimizers for Communication-Efficient Learning", TMLR 2025,
    appendix E.5.
  """
  fraction = check_fraction(fraction)

  def init_fn(params):
    if not error_feedback:
      return optax.EmptyState()
    return TopKState(residual=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None):
    del params
    if not error_feedback:
      return jax.tree.map(lambda x: _keep_top_k(jnp.asarray(x), fraction), updates), state
    _check_like(updates, state.residual, "top_k")
    acc = jax.tree.map(lambda x, e: (x + e).astype(e.dtype), updates, state.residual)
    sent = jax.tree.map(lambda a: _keep_top_k(a, fraction), acc)
    # Where an entry was sent, a - a is exactly 0; elsewhere a - 0 is exactly a.
    return sent, TopKState(residual=jax.tree.map(jnp.subtract, acc, sent))

  return optax.GradientTransformation(init_fn, update_fn)


def _quantize_leaf(x: jax.Array, bits: int, key: jax.Array | None) -> jax.Array:
  """``x`` on the grid ``scale * m / M``, ``m`` an integer in ``[-M, M]``, ``M = 2^(b-1) - 1``."""
  levels = 2 ** (bits - 1) - 1
  xf = x.astype(jnp.float32)
  scale = jnp.max(jnp.abs(xf))
  # An all-zero leaf has scale 0: send zeros, never 0 / 0.
  y = jnp.where(scale > 0, xf / jnp.where(scale > 0, scale, 1.0), 0.0) * levels
  if key is None:
    m = jnp.round(y)
  else:
    # floor(y + u), u ~ U[0, 1): rounds up with probability frac(y), so E[m] = y.
    m = jnp.floor(y + jax.random.uniform(key, y.shape, jnp.float32))
  m = jnp.clip(m, -levels, levels)  # |y| <= M already; guards against float rounding at M.
  return (m * (scale / levels)).astype(x.dtype)


def quantize(bits: int, stochastic: bool = True, seed: int = 0) -> optax.GradientTransformation:
  r"""Per-leaf scaled uniform quantisation to 8, 4 or 2 bits.

  Each leaf :math:`x` is sent as one float32 scale :math:`s = \max_i |x_i|` and one signed
  integer code :math:`m_i \in [-M, M]` per entry, with :math:`M = 2^{b-1} - 1` (127, 7 or 1:
  a symmetric grid that represents zero exactly; at 2 bits it is TernGrad's ternary code).
  The server reconstructs

  .. math::

    Q(x)_i = \frac{s}{M} m_i, \qquad m_i = \lfloor M x_i / s + u_i \rfloor,
    \quad u_i \sim U[0, 1)

  with stochastic rounding, so that :math:`\mathbb{E}[Q(x)] = x` (unbiased), with variance
  :math:`(s/M)^2 p_i (1 - p_i) \le (s / 2M)^2` per entry, :math:`p_i` the fractional part of
  :math:`M x_i / s`. With ``stochastic=False`` it rounds to the nearest level (biased, no
  randomness). An all-zero leaf is sent as zeros.

  Args:
    bits: :math:`b`, bits per entry: 8, 4 or 2.
    stochastic: round stochastically (unbiased) instead of to the nearest level.
    seed: seed of the rounding noise (stochastic only); the key lives in the state and is
      split on every step, so successive steps draw fresh noise.

  Returns:
    An ``optax.GradientTransformation``. ``update(updates, state, params=None)`` returns the
    dequantised pytree :math:`Q(x)` (same shapes and dtypes as ``updates``); ``params`` is
    ignored. The state is a :class:`QuantizeState` (stochastic) or ``optax.EmptyState()``.

  Raises:
    ValueError: ``bits`` is not 8, 4 or 2.

  Examples:
    Ternary (2-bit) rounding to nearest: entries become ``-s``, ``0`` or ``s``:

    >>> import jax.numpy as jnp
    >>> from optax_localsgd import compression
    >>> tx = compression.quantize(2, stochastic=False)
    >>> sent, _ = tx.update({"w": jnp.array([0.2, -1.0, 0.7, 0.0])}, tx.init(None))
    >>> sent["w"].tolist()
    [0.0, -1.0, 1.0, 0.0]

  References:
    Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient Quantization and
    Encoding", NeurIPS 2017.
    Wen et al., "TernGrad: Ternary Gradients to Reduce Communication in Distributed Deep
    Learning", NeurIPS 2017.
  """
  bits = check_bits(bits)

  def init_fn(params):
    del params
    if not stochastic:
      return optax.EmptyState()
    return QuantizeState(key=jax.random.PRNGKey(seed))

  def update_fn(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    if not stochastic:
      return treedef.unflatten([_quantize_leaf(jnp.asarray(x), bits, None) for x in leaves]), state
    key, step_key = jax.random.split(state.key)
    keys = jax.random.split(step_key, max(len(leaves), 1))
    out = [_quantize_leaf(jnp.asarray(x), bits, k) for x, k in zip(leaves, keys)]
    return treedef.unflatten(out), QuantizeState(key=key)

  return optax.GradientTransformation(init_fn, update_fn)
