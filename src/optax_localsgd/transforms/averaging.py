"""Hand-designed server transforms: model averaging (local SGD) and SlowMo.

Inputs follow the package convention: ``updates`` is the averaged worker delta
``Delta = W_old - W_new`` (a pytree like params, same sign as a gradient) and the returned
update is added with ``optax.apply_updates``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_localsgd.transforms import _validation
from optax_localsgd.errors import UsageError


class LocalSGDState(NamedTuple):
  """State of :func:`local_sgd`: only the round counter (int32)."""
  count: jax.Array


class SlowMoState(NamedTuple):
  """State of :func:`slowmo`.

  Attributes:
    count: rounds done (int32).
    momentum: the slow momentum buffer ``u``, in units of a gradient (Delta / gamma).
  """
  count: jax.Array
  momentum: Any


def _count_up(count):
  return optax.safe_int32_increment(count)


def _check(updates, params):
  if params is not None:
    _validation.check_deltas_match(updates, params)


def local_sgd(learning_rate: float = 1.0) -> optax.GradientTransformationExtraArgs:
  """Local SGD / FedAvg server step: ``update = -learning_rate * Delta``.

  With ``learning_rate=1`` the new global weights are exactly the mean of the workers'
  weights (Stich, 2019, "Local SGD converges fast and communicates little").

  Args:
    learning_rate: server learning rate applied to the averaged delta (1.0 = averaging).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra keyword arguments are ignored.

  Examples:
    Two workers ended a round at ``new``; averaging moves the global weights to their mean:

    >>> import jax, jax.numpy as jnp, optax
    >>> from optax_localsgd import local_sgd
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> new = {"w": jnp.array([[0.0, 2.0], [1.0, 4.0]])}  # K = 2 workers' weights
    >>> delta = jax.tree.map(lambda old, w: old - w.mean(0), params, new)  # old - new
    >>> server = local_sgd()  # learning_rate=1: plain averaging
    >>> updates, state = server.update(delta, server.init(params), params)
    >>> optax.apply_updates(params, updates)["w"].tolist()
    [0.5, 3.0]
  """

  def init_fn(params):
    del params
    return LocalSGDState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _check(updates, params)
    new = jax.tree.map(lambda d: (-learning_rate * d).astype(d.dtype), updates)
    return new, LocalSGDState(count=_count_up(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def slowmo(slow_learning_rate: float, momentum: float,
           local_learning_rate: float) -> optax.GradientTransformationExtraArgs:
  """SlowMo server step (Wang et al., 2019, "SlowMo: Improving communication-efficient
  distributed SGD with slow momentum", Algorithm 1)::

      u      <- momentum * u + Delta / local_learning_rate
      update  = -slow_learning_rate * local_learning_rate * u

  ``u`` is kept in gradient units, so ``alpha = slow_learning_rate`` and
  ``gamma = local_learning_rate`` enter exactly as in the paper (its Table 5 reports tuned
  ``gamma / alpha / beta``). With ``momentum = 0`` this is ``local_sgd(slow_learning_rate)``,
  and with ``slow_learning_rate = 1`` also plain averaging.

  Some codebases keep the buffer in delta units (``u <- beta*u + Delta``) and fold the local
  learning rate into the slow one (``update = -alpha' * u``). For a constant ``gamma`` the two
  agree with ``alpha' = alpha``; they differ when ``gamma`` follows a schedule, because here
  each round's delta is rescaled by that round's ``gamma`` before it enters the buffer.
  ``docs/concepts.md`` discusses what this means for the paper's tuned values.

  Args:
    slow_learning_rate: alpha, the outer (slow) learning rate.
    momentum: beta, the slow momentum coefficient in [0, 1).
    local_learning_rate: gamma, the workers' learning rate for this round.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra keyword arguments are ignored.

  Examples:
    The same delta twice: the buffer ``u`` (gradient units) builds up momentum.

    >>> import jax.numpy as jnp, optax
    >>> from optax_localsgd import slowmo
    >>> server = slowmo(slow_learning_rate=1.0, momentum=0.5, local_learning_rate=0.5)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = server.init(params)
    >>> delta = {"w": jnp.array([1.0, -2.0])}  # W_old - W_new
    >>> for _ in range(2):
    ...   updates, state = server.update(delta, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   print(updates["w"].tolist())
    [-1.0, 2.0]
    [-1.5, 3.0]
    >>> state.momentum["w"].tolist()  # u = 0.5 * (delta / 0.5) + delta / 0.5
    [3.0, -6.0]
  """
  # Checked only for Python numbers: sweeps pass traced values to vmap over candidates.
  if isinstance(local_learning_rate, (int, float)) and local_learning_rate <= 0:
    raise UsageError(f"slowmo needs local_learning_rate > 0, got {local_learning_rate}.")

  def init_fn(params):
    return SlowMoState(count=jnp.zeros([], jnp.int32),
                       momentum=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _check(updates, params)
    _validation.check_deltas_match(updates, state.momentum, what="deltas")
    u = jax.tree.map(
        lambda m, d: (momentum * m + d / local_learning_rate).astype(m.dtype),
        state.momentum, updates)
    step = jax.tree.map(
        lambda m, d: (-slow_learning_rate * local_learning_rate * m).astype(d.dtype),
        u, updates)
    return step, SlowMoState(count=_count_up(state.count), momentum=u)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
