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


class LocalSGDState(NamedTuple):
  """State of :func:`local_sgd`: the round counter (int32), which a learning-rate schedule
  reads."""
  count: jax.Array


class SlowMoState(NamedTuple):
  """State of :func:`slowmo`.

  Attributes:
    count: rounds done (int32); the schedules read it.
    momentum: the slow momentum buffer ``u``, in units of a gradient (Delta / gamma).
  """
  count: jax.Array
  momentum: Any


def _at(hyperparameter: optax.ScalarOrSchedule, count: jax.Array):
  """The value for this round: a schedule is called with the rounds done so far (0 at the
  first update, as Optax's ``scale_by_schedule`` does); a number is itself."""
  return hyperparameter(count) if callable(hyperparameter) else hyperparameter


def _check(updates, params):
  if params is not None:
    _validation.check_deltas_match(updates, params)


def local_sgd(learning_rate: optax.ScalarOrSchedule = 1.0
              ) -> optax.GradientTransformationExtraArgs:
  """Local SGD / FedAvg server step on the mean delta ``Delta_t``::

      update_t = -eta_t * Delta_t,    eta_t = learning_rate(t) for a schedule, else learning_rate

  where ``t`` counts the rounds done before this one (0 at the first update). With
  ``eta = 1`` the new global weights are exactly the mean of the workers' weights (Stich, 2019,
  "Local SGD converges fast and communicates little"). The updates are those of
  ``optax.sgd(learning_rate)`` applied to ``Delta_t``, schedule included.

  Args:
    learning_rate: eta, the server learning rate, dimensionless (it scales a delta, which is
      already in weight units; 1.0 = averaging). A number, or an Optax schedule (a function of
      the round count ``t``, e.g. ``optax.linear_schedule``).

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

    A schedule is called with the round count: here eta is 1, then 0.5.

    >>> server = local_sgd(optax.piecewise_constant_schedule(1.0, {1: 0.5}))
    >>> state = server.init(params)
    >>> for _ in range(2):
    ...   updates, state = server.update(delta, state, params)
    ...   print(updates["w"].tolist())
    [-0.5, 1.0]
    [-0.25, 0.5]
  """

  def init_fn(params):
    del params
    return LocalSGDState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _check(updates, params)
    lr = _at(learning_rate, state.count)
    # The step size is cast to the delta's dtype first, as optax.scale_by_schedule does.
    new = jax.tree.map(lambda d: jnp.asarray(-lr, d.dtype) * d, updates)
    return new, LocalSGDState(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def slowmo(slow_learning_rate: optax.ScalarOrSchedule, momentum: float,
           local_learning_rate: optax.ScalarOrSchedule) -> optax.GradientTransformationExtraArgs:
  """SlowMo server step (Wang et al., 2019, "SlowMo: Improving communication-efficient
  distributed SGD with slow momentum", Algorithm 1), on the mean delta ``Delta_t``::

      u_t      = momentum * u_{t-1} + Delta_t / gamma_t          (u_{-1} = 0)
      update_t = -alpha_t * gamma_t * u_t

  with ``alpha_t = slow_learning_rate(t)`` and ``gamma_t = local_learning_rate(t)`` where those
  are schedules (``t``: rounds done before this one, 0 at the first update).

  ``u`` is kept in gradient units, so ``alpha = slow_learning_rate`` and
  ``gamma = local_learning_rate`` enter exactly as in the paper (its Table 5 reports tuned
  ``gamma / alpha / beta``). With ``momentum = 0`` this is ``local_sgd(slow_learning_rate)``,
  and with ``slow_learning_rate = 1`` also plain averaging. With a constant ``gamma`` it is
  Optax's heavy-ball SGD on the delta, ``optax.sgd(slow_learning_rate, momentum=momentum)``
  (``alpha`` may be a schedule there too).

  Some codebases keep the buffer in delta units (``u <- beta*u + Delta``) and fold the local
  learning rate into the slow one (``update = -alpha' * u``). For a constant ``gamma`` the two
  agree with ``alpha' = alpha``; they differ when ``gamma`` follows a schedule, because here
  each round's delta is rescaled by that round's ``gamma`` before it enters the buffer.
  ``docs/concepts.md`` discusses what this means for the paper's tuned values.

  Args:
    slow_learning_rate: alpha, the outer (slow) learning rate, dimensionless (``alpha *
      gamma`` multiplies a buffer in gradient units). A number or an Optax schedule of the
      round count.
    momentum: beta, the slow momentum coefficient in [0, 1). A number (as for ``optax.sgd``,
      not a schedule).
    local_learning_rate: gamma > 0, the workers' learning rate during round ``t``, in the
      units of their optimizer's learning rate. A number, or a schedule of the *round* count
      ``t`` (a schedule of the workers' local step ``s`` must be turned into one of ``t``, e.g.
      ``lambda t: worker_schedule(t * H)`` for H local steps per round).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; extra keyword arguments are ignored.

  Raises:
    UsageError: a constant ``local_learning_rate <= 0`` or ``momentum`` outside [0, 1).
      Schedules and traced values (sweeps, ``optax.inject_hyperparams``) are not checked.

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
  _validation.check_hyperparameter("slowmo", local_learning_rate, lambda v: v > 0,
                                   "local_learning_rate > 0")
  _validation.check_hyperparameter("slowmo", momentum, lambda v: 0 <= v < 1,
                                   "0 <= momentum < 1")

  def init_fn(params):
    return SlowMoState(count=jnp.zeros([], jnp.int32),
                       momentum=jax.tree.map(jnp.zeros_like, params))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    _check(updates, params)
    _validation.check_deltas_match(updates, state.momentum, what="deltas")
    alpha = _at(slow_learning_rate, state.count)
    gamma = _at(local_learning_rate, state.count)
    u = jax.tree.map(
        lambda m, d: (momentum * m + d / gamma).astype(m.dtype), state.momentum, updates)
    step = jax.tree.map(lambda m, d: (-alpha * gamma * m).astype(d.dtype), u, updates)
    return step, SlowMoState(count=optax.safe_increment(state.count), momentum=u)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
