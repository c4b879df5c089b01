"""Properties of the server transforms that hold for any input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import optax_localsgd as ol
from conftest import make_params

K = 8


def _all_transforms():
  key = jax.random.PRNGKey(0)
  return {
      "local_sgd": (ol.local_sgd(), None),
      "slowmo": (ol.slowmo(1.0, 0.95, 0.1), None),
      "lopt_a": (ol.lopt_a(ol.init_lopt_a(key)), None),
      "lagg_a": (ol.lagg_a(ol.init_lagg_a(key, K), K), K),
  }


TRANSFORMS = _all_transforms()


def _stack(tree, k):
  return tree if k is None else jax.tree.map(lambda x: jnp.stack([x] * k), tree)


# Workers' weights as small dyadic numbers, so every sum and mean below is exact in float32.
dyadic = hnp.arrays(np.float32, (K, 4, 3), elements=st.integers(-64, 64).map(lambda i: i / 8))


@given(dyadic, hnp.arrays(np.float32, (4, 3), elements=st.integers(-64, 64).map(lambda i: i / 8)))
def test_local_sgd_one_is_exactly_the_mean_of_worker_weights(workers, w_old):
  deltas = w_old[None] - workers  # old - new, per worker
  avg_delta = jnp.mean(jnp.asarray(deltas), axis=0)
  tx = ol.local_sgd(1.0)
  u, _ = tx.update(avg_delta, tx.init(w_old), w_old)
  np.testing.assert_array_equal(optax.apply_updates(w_old, u), workers.mean(axis=0))


@given(st.floats(0.01, 2.0), st.floats(0.01, 1.0), st.integers(0, 2**31 - 1))
def test_slowmo_without_momentum_is_local_sgd(alpha, gamma, seed):
  """u = delta/gamma, update = -alpha*gamma*u = -alpha*delta: local_sgd(alpha) for any gamma.

  (With alpha = 1 that is plain averaging.)"""
  params = make_params(seed % 1000)
  rng = np.random.default_rng(seed)
  a, b = ol.slowmo(alpha, 0.0, gamma), ol.local_sgd(alpha)
  sa, sb = a.init(params), b.init(params)
  for _ in range(3):
    d = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    ua, sa = a.update(d, sa, params)
    ub, sb = b.update(d, sb, params)
    for x, y in zip(jax.tree.leaves(ua), jax.tree.leaves(ub)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", TRANSFORMS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_updates_keep_structure_shapes_and_dtypes(name, dtype):
  tx, k = TRANSFORMS[name]
  params = {"layer": make_params(0, dtype=np.float32), "scale": jnp.ones((), jnp.float32)}
  params = jax.tree.map(lambda p: p.astype(dtype), params)
  deltas = _stack(jax.tree.map(lambda p: (0.01 * p).astype(dtype), params), k)
  u, state = jax.jit(tx.update)(deltas, tx.init(params), params)
  assert jax.tree.structure(u) == jax.tree.structure(params)
  for a, p in zip(jax.tree.leaves(u), jax.tree.leaves(params)):
    assert a.shape == p.shape and a.dtype == p.dtype
  assert state.count.dtype == jnp.int32 and state.count == 1


magnitudes = st.one_of(st.just(0.0), st.floats(-30, 10).map(lambda e: 10.0 ** e))


@pytest.mark.parametrize("name", TRANSFORMS)
@given(mags=st.lists(magnitudes, min_size=4, max_size=4), signs=st.lists(st.booleans(), min_size=4, max_size=4))
def test_no_nan_or_inf_for_zero_tiny_or_huge_deltas(name, mags, signs):
  tx, k = TRANSFORMS[name]
  params = make_params(0)
  deltas = {n: jnp.full(p.shape, m * (1 if s else -1), jnp.float32)
            for (n, p), m, s in zip(params.items(), mags, signs)}
  # A varying tensor too: entries spanning the whole range at once.
  span = 10.0 ** np.linspace(-30, 10, 30).reshape(5, 6)
  deltas["dense"] = jnp.asarray(span, jnp.float32)
  state = tx.init(params)
  for _ in range(3):
    u, state = tx.update(_stack(deltas, k), state, params)
    for leaf in jax.tree.leaves((u, state)):
      assert np.all(np.isfinite(np.asarray(leaf, np.float32)))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_zero_deltas_on_first_round_are_finite(name):
  tx, k = TRANSFORMS[name]
  params = make_params(0)
  u, _ = tx.update(_stack(jax.tree.map(jnp.zeros_like, params), k), tx.init(params), params)
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", TRANSFORMS)
def test_jit_and_eager_agree(name):
  tx, k = TRANSFORMS[name]
  params = make_params(1)
  rng = np.random.default_rng(0)
  s_e = s_j = tx.init(params)
  for _ in range(3):
    d = _stack(jax.tree.map(lambda p: jnp.asarray(0.1 * rng.normal(size=p.shape), jnp.float32),
                            params), k)
    u_e, s_e = tx.update(d, s_e, params)
    u_j, s_j = jax.jit(tx.update)(d, s_j, params)
    for a, b in zip(jax.tree.leaves((u_e, s_e)), jax.tree.leaves((u_j, s_j))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", TRANSFORMS)
def test_composes_with_clip_by_global_norm(name):
  tx, k = TRANSFORMS[name]
  params = make_params(2)
  deltas = _stack(jax.tree.map(lambda p: 3.0 * jnp.ones_like(p), params), k)
  chained = optax.chain(optax.clip_by_global_norm(1.0), tx)
  u, _ = chained.update(deltas, chained.init(params), params, unused_extra_arg=1)
  clip = optax.clip_by_global_norm(1.0)
  clipped, _ = clip.update(deltas, clip.init(params))
  want, _ = tx.update(clipped, tx.init(params), params)
  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_vmap_over_meta_parameters_and_tasks():
  """The meta-trainer vmaps over perturbed meta-params (particles) and over tasks."""
  key = jax.random.PRNGKey(0)
  metas = jax.vmap(ol.init_lopt_a)(jax.random.split(key, 3))
  params = jax.vmap(lambda s: make_params(0))(jnp.arange(3))  # 3 tasks' params
  params = jax.tree.map(lambda p, s: p * (1 + s.reshape((-1,) + (1,) * (p.ndim - 1))),
                        params, jax.tree.map(lambda _: jnp.arange(3.0), params))
  deltas = jax.tree.map(lambda p: 0.01 * p, params)

  def one(meta, p, d):
    tx = ol.lopt_a(meta)
    return tx.update(d, tx.init(p), p)[0]

  batched = jax.jit(jax.vmap(one))(metas, params, deltas)
  for i in range(3):
    take = lambda t: jax.tree.map(lambda x: x[i], t)
    single = one(take(metas), take(params), take(deltas))
    for a, b in zip(jax.tree.leaves(take(batched)), jax.tree.leaves(single)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-10)
