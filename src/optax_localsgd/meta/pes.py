"""Persistent Evolution Strategies with antithetic pairs (Vicol et al., 2021; paper Algorithm 2).

Generic over the inner problem: ``unroll(theta, inner_state, key) -> (inner_state, loss)``
advances one particle by one truncation and returns its meta-loss. Each of ``n`` tasks carries an
antithetic pair of particles, ``theta + eps`` and ``theta - eps``, with separate inner states
(leading axes ``(n, 2)``) and the same ``key`` (same data), and one accumulated perturbation
``xi`` (the ``-`` particle's is ``-xi``). The estimate

    g = 1 / (N sigma^2) * sum_particles xi_p L_p = 1 / (2 n sigma^2) * sum_i xi_i (L+_i - L-_i)

with N = 2n particles is unbiased for the gradient of the Gaussian-smoothed meta-loss of the
whole unroll so far, not only of the last truncation.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Unroll = Callable[[Any, Any, jax.Array], tuple[Any, jax.Array]]


class PESEstimate(NamedTuple):
  """Result of one antithetic PES step over ``n`` tasks.

  Attributes:
    grad: gradient estimate, structured like theta: the mean over the pairs whose losses
      are both finite (the others are left out); NaN when no pair is finite, so that the
      outer optimizer's finiteness check skips the step.
    inner_states: advanced inner states, leading axes ``(n, 2)`` (``+``, ``-``).
    xi: accumulated perturbations after this truncation, leading axis ``n``.
    losses: ``(n, 2)`` meta-losses of the ``+`` and ``-`` particles.
    finite: ``(n,)`` bool: both losses of the pair are finite (else the pair was ignored).
  """
  grad: Any
  inner_states: Any
  xi: Any
  losses: jax.Array
  finite: jax.Array


def sample_perturbation(key: jax.Array, theta: Any, n: int, sigma: float) -> Any:
  """``n`` draws of N(0, sigma^2 I) shaped like ``theta`` (leading axis ``n``)."""
  leaves, treedef = jax.tree.flatten(theta)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      sigma * jax.random.normal(k, (n,) + jnp.shape(x), jnp.result_type(x))
      for k, x in zip(keys, leaves)])


def antithetic_pes(unroll: Unroll, theta: Any, inner_states: Any, xi: Any, keys: jax.Array,
                   eps: Any, sigma: float) -> PESEstimate:
  """One PES truncation for ``n`` tasks, each with an antithetic pair.

  Args:
    unroll: ``(theta, inner_state, key) -> (inner_state, loss)`` for one particle.
    theta: the meta-parameters (a pytree of float arrays).
    inner_states: leading axes ``(n, 2)``: the ``+`` and ``-`` particle of each task.
    xi: accumulated perturbations so far, leading axis ``n`` (zeros after a reset).
    keys: ``(n, ...)`` one key per task, shared by its two particles.
    eps: this truncation's perturbations, leading axis ``n`` (``sample_perturbation``).
    sigma: the perturbation standard deviation used to draw ``eps``.

  Returns:
    A :class:`PESEstimate`.
  """
  signs = jnp.asarray([1.0, -1.0])

  def pair(e, states, key):
    def particle(sign, state):
      th = jax.tree.map(lambda t, ee: t + (sign * ee).astype(t.dtype), theta, e)
      return unroll(th, state, key)
    return jax.vmap(particle)(signs, states)

  new_states, losses = jax.vmap(pair)(eps, inner_states, keys)
  new_xi = jax.tree.map(jnp.add, xi, eps)
  finite = jnp.all(jnp.isfinite(losses), axis=1)
  diff = jnp.where(finite, losses[:, 0] - losses[:, 1], 0.0)
  n_ok = jnp.sum(finite)
  # 1 / (2 n sigma^2) over the n finite pairs; no finite pair: no estimate at all (NaN), never a
  # zero that an optimizer with momentum and weight decay would still step on.
  scale = jnp.where(n_ok > 0, 1.0 / (2 * jnp.maximum(n_ok, 1) * sigma**2), jnp.nan)
  grad = jax.tree.map(
      lambda x: (scale * jnp.tensordot(diff.astype(x.dtype), x, axes=(0, 0))).astype(x.dtype),
      new_xi)
  return PESEstimate(grad, new_states, new_xi, losses, finite)
