"""The PES estimator on problems whose smoothed gradient is known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np

from optax_localsgd.meta import pes

SIGMA = 0.1


def _estimate(unroll, theta, state, xi, n, key, sigma=SIGMA):
  keys = jax.random.split(key, n)
  eps = pes.sample_perturbation(jax.random.fold_in(key, 1), theta, n, sigma)
  return pes.antithetic_pes(unroll, theta, state, xi, keys, eps, sigma)


def test_quadratic_matches_smoothed_gradient_within_standard_error():
  """For f(t) = sum a t^2 + b t, the Gaussian-smoothed gradient equals 2 a t + b."""
  a = jnp.asarray([1.0, 3.0, 0.5, 2.0])
  b = jnp.asarray([0.3, -1.0, 2.0, 0.0])
  theta = {"t": jnp.asarray([0.5, -0.2, 1.0, 0.3])}
  unroll = lambda th, s, k: (s, jnp.sum(a * th["t"] ** 2 + b * th["t"]))
  n = 20000
  est = _estimate(unroll, theta, jnp.zeros((n, 2)), {"t": jnp.zeros((n, 4))}, n,
                  jax.random.PRNGKey(0))
  # Per-task contributions, to get the standard error of their mean.
  per_task = est.xi["t"] * (est.losses[:, 0] - est.losses[:, 1])[:, None] / (2 * SIGMA**2)
  se = np.std(per_task, axis=0) / np.sqrt(n)
  want = 2 * a * theta["t"] + b
  np.testing.assert_allclose(est.grad["t"], per_task.mean(0), rtol=1e-4)
  assert np.all(np.abs(est.grad["t"] - want) < 4 * se + 1e-6), (est.grad["t"], want, se)


def test_persistent_perturbations_give_the_gradient_through_the_whole_unroll():
  """State s accumulates theta each truncation; after j truncations the loss (s - c)^2 has
  total derivative 2 (j theta - c) j. PES recovers it; resetting xi every truncation (plain
  truncated ES) would give 2 (j theta - c), biased by a factor j."""
  theta = {"t": jnp.asarray([0.7, -0.4])}
  c = jnp.asarray([1.0, 1.0])
  unroll = lambda th, s, k: (s + th["t"], jnp.sum((s + th["t"] - c) ** 2))
  n, j = 40000, 3
  state = jnp.zeros((n, 2, 2))
  xi = {"t": jnp.zeros((n, 2))}
  key = jax.random.PRNGKey(1)
  for step in range(j):
    est = _estimate(unroll, theta, state, xi, n, jax.random.fold_in(key, step))
    state, xi = est.inner_states, est.xi
  want = 2 * (j * theta["t"] - c) * j
  per_task = est.xi["t"] * (est.losses[:, 0] - est.losses[:, 1])[:, None] / (2 * SIGMA**2)
  se = np.std(per_task, axis=0) / np.sqrt(n)
  assert np.all(np.abs(est.grad["t"] - want) < 4 * se), (est.grad["t"], want, se)
  assert np.all(np.abs(est.grad["t"] - want / j) > 10 * se)  # not the truncated-ES answer


def test_non_finite_pairs_are_ignored_and_flagged():
  theta = {"t": jnp.ones(3)}
  unroll = lambda th, s, k: (s, jnp.where(s > 0, jnp.nan, jnp.sum(th["t"] ** 2)))
  state = jnp.asarray([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])  # task 1's + particle is NaN
  est = _estimate(unroll, theta, state, {"t": jnp.zeros((3, 3))}, 3, jax.random.PRNGKey(2))
  assert est.finite.tolist() == [True, False, True]
  assert np.all(np.isfinite(est.grad["t"]))
  xi, losses = np.asarray(est.xi["t"]), np.asarray(est.losses)
  keep = xi[[0, 2]] * (losses[[0, 2], 0] - losses[[0, 2], 1])[:, None]
  # The mean over the two finite pairs.
  np.testing.assert_allclose(est.grad["t"], keep.sum(0) / (2 * 2 * SIGMA**2), rtol=1e-5)


def test_no_finite_pair_gives_no_estimate():
  """Not a zero gradient, which momentum and weight decay would still step on: NaN, which the
  meta-trainer's outer optimizer (optax.apply_if_finite) skips."""
  theta = {"t": jnp.ones(3)}
  unroll = lambda th, s, k: (s, jnp.nan * jnp.sum(th["t"]))
  est = _estimate(unroll, theta, jnp.zeros((2, 2)), {"t": jnp.zeros((2, 3))}, 2,
                  jax.random.PRNGKey(3))
  assert not np.any(est.finite) and np.all(np.isnan(est.grad["t"]))
