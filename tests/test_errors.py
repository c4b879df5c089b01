"""Bad input gets a ValueError whose message names the problem."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_localsgd as ol
from conftest import make_params

KEY = jax.random.PRNGKey(0)


def test_lagg_a_stack_with_wrong_leading_axis():
  params = make_params()
  tx = ol.lagg_a(ol.init_lagg_a(KEY, 8), 8)
  bad = jax.tree.map(lambda p: jnp.stack([p] * 4), params)
  with pytest.raises(ValueError, match=r"leading axis 4, expected k=8"):
    tx.update(bad, tx.init(params), params)


def test_lagg_a_given_averaged_deltas_instead_of_stack():
  params = {"w": jnp.ones((8, 3))}
  tx = ol.lagg_a(ol.init_lagg_a(KEY, 8), 8)
  with pytest.raises(ValueError, match=r"worker deltas.*\(8, 8, 3\)"):
    tx.update(params, tx.init(params), params)


def test_meta_params_for_another_k():
  with pytest.raises(ValueError, match=r"built for K=8 .* asked for k=16"):
    ol.lagg_a(ol.init_lagg_a(KEY, 8), 16)


def test_wrong_kind_of_meta_params():
  with pytest.raises(ValueError, match="use lagg_a"):
    ol.lopt_a(ol.init_lagg_a(KEY, 8))
  with pytest.raises(ValueError, match="use lopt_a"):
    ol.lagg_a(ol.init_lopt_a(KEY), 8)
  with pytest.raises(ValueError, match="expects MetaParams"):
    ol.lopt_a({"w0": jnp.zeros((39, 32))})


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_bad_k(k):
  with pytest.raises(ValueError, match="integer k >= 1"):
    ol.init_lagg_a(KEY, k)


@pytest.mark.parametrize("make", [
    lambda: ol.lopt_a(ol.init_lopt_a(KEY)), lambda: ol.local_sgd(), lambda: ol.slowmo(1., .9, .1)])
def test_delta_tree_that_does_not_match_params(make):
  tx = make()
  params = make_params()
  missing = {k: v for k, v in params.items() if k != "bias"}
  with pytest.raises(ValueError, match="do not have the structure of params"):
    tx.update(missing, tx.init(params), params)
  wrong_shape = dict(params, dense=jnp.ones((6, 5)))
  with pytest.raises(ValueError, match=r"Shape mismatch at \['dense'\].*\(6, 5\).*\(5, 6\)"):
    jax.jit(tx.update)(wrong_shape, tx.init(params), params)


def test_lopt_a_without_params():
  tx = ol.lopt_a(ol.init_lopt_a(KEY))
  params = make_params()
  with pytest.raises(ValueError, match=r"lopt_a needs the current global params"):
    tx.update(params, tx.init(params))


@pytest.mark.parametrize("gamma", [0.0, -0.1, float("nan"), np.float32(0.0), jnp.array(-1.0)])
def test_slowmo_bad_local_learning_rate(gamma):
  with pytest.raises(ol.UsageError, match="slowmo needs local_learning_rate > 0, got"):
    ol.slowmo(1.0, 0.9, gamma)


@pytest.mark.parametrize("beta", [1.0, -0.1, 1.5, jnp.array(1.0)])
def test_slowmo_momentum_outside_unit_interval(beta):
  with pytest.raises(ol.UsageError, match=r"slowmo needs 0 <= momentum < 1, got"):
    ol.slowmo(1.0, beta, 0.1)


def test_slowmo_schedules_and_traced_values_are_not_range_checked():
  """A schedule cannot be checked at build time, nor a value a sweep vmaps over."""
  ol.slowmo(optax.constant_schedule(1.0), 0.9, optax.constant_schedule(0.1))
  params = {"w": jnp.ones(3)}

  def one(gamma):
    tx = ol.slowmo(1.0, 0.9, gamma)
    return tx.update(params, tx.init(params), params)[0]["w"]

  np.testing.assert_allclose(jax.vmap(one)(jnp.array([0.1, 0.3])), -np.ones((2, 3)), rtol=1e-6)


@pytest.mark.parametrize("k", [8.0, jnp.array(8), True])
def test_lagg_a_needs_a_python_integer_k(k):
  with pytest.raises(ValueError, match=r"lagg_a needs k as a Python integer"):
    ol.lagg_a(ol.init_lagg_a(KEY, 8), k)
  ol.lagg_a(ol.init_lagg_a(KEY, 8), np.int64(8))  # a NumPy integer is fine
