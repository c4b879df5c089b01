"""The fused Pallas kernel (transforms/learned/pallas.py) against the reference learned step,
in Pallas interpret mode on the CPU, so CI checks the kernel without a GPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_meta

import optax_localsgd as ol
from optax_localsgd.transforms.learned import features, mlp, pallas

# Rank 0 to 4, sizes that are not multiples of the blocks below, ties between axis sizes.
SHAPES = [(), (7,), (5, 6), (3, 3, 4, 5), (2, 9, 3), (300, 37)]


def _inputs(shape, k, fset, seed=0):
  rng = np.random.default_rng(seed)
  p = jnp.asarray(rng.normal(size=shape), jnp.float32)
  d = jnp.asarray(0.05 * rng.normal(size=shape), jnp.float32)
  chans = d[None] if k is None else jnp.asarray(0.05 * rng.normal(size=(k,) + shape),
                                               jnp.float32)
  meta = (ol.init_lopt_a(jax.random.PRNGKey(seed), feature_set=fset) if k is None
          else ol.init_lagg_a(jax.random.PRNGKey(seed), k, feature_set=fset))
  meta = random_meta(meta, seed)
  acc = features.init_accumulators(p)
  for _ in range(2):
    acc = features.update_accumulators(acc, d, meta.decay_rates(), fset)
  return meta, acc, p, d, chans, features.time_features(jnp.int32(3), fset)


@pytest.mark.parametrize("fset", ["ada-v2", "ada-v1"])
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernel_equals_the_reference_step(shape, k, fset):
  args = _inputs(shape, k, fset)
  ref = mlp.reference_leaf_step(*args)
  for block in ((1, 7, 128) if np.prod(shape) < 100 else (64, 4096)):
    got = pallas.pallas_leaf_step(*args, block_size=block, interpret=True)
    assert got.shape == ref.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-6 * float(jnp.abs(ref).max()),
                               err_msg=f"block {block}")


def test_kernel_as_the_leaf_step_of_lopt_a_over_rounds():
  params = {"w": jnp.ones((40, 30)), "b": jnp.zeros(30), "s": jnp.float32(0.5)}
  meta = random_meta(ol.init_lopt_a(jax.random.PRNGKey(1)), 1)
  fused = ol.lopt_a(meta, leaf_step=functools.partial(pallas.pallas_leaf_step, block_size=256,
                                                       interpret=True))
  plain = ol.lopt_a(meta)
  states = [tx.init(params) for tx in (fused, plain)]
  ps = [params, params]
  for r in range(3):
    delta = jax.tree.map(lambda x: 0.01 * jax.random.normal(jax.random.PRNGKey(r), x.shape),
                         params)
    for i, tx in enumerate((fused, plain)):
      u, states[i] = jax.jit(tx.update)(delta, states[i], ps[i])
      ps[i] = jax.tree.map(jnp.add, ps[i], u)
  for a, b, p0 in zip(jax.tree.leaves(ps[0]), jax.tree.leaves(ps[1]), jax.tree.leaves(params)):
    moved = b - p0
    assert float(jnp.abs(moved).max()) > 0
    np.testing.assert_allclose(a - p0, moved, rtol=1e-4, atol=1e-5 * float(jnp.abs(moved).max()))
