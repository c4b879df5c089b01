"""The blocked learned step (issue 14, bounded memory) against the unblocked one and the NumPy
reference, on odd shapes of rank 0 to 5 whose sizes are not multiples of the block."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_localsgd as ol
import reference as ref
from conftest import random_meta
from optax_localsgd.transforms.learned import blocked, features
from optax_localsgd.transforms.learned.mlp import reference_leaf_step

# Rank 0 to 5; size-1 axes (a factored axis of size 1, a batch axis of size 1); primes.
ODD_SHAPES = {"scalar": (), "bias": (13,), "dense": (37, 29), "conv": (3, 3, 7, 11),
              "batch": (5, 7, 7), "rank5": (2, 3, 4, 5, 6), "row1": (1, 40),
              "mid1": (40, 1, 3), "conv1": (6, 1, 1, 5)}
FEATURE_SETS = [("ada-v2", 0.05), ("ada-v1", 0.5)]
BLOCKS = [1, 5, 7, 64, 1000]  # 1000 exceeds every tensor here: the whole-tensor path


def _meta(fset, offset_scale, k=None, seed=0):
  key = jax.random.PRNGKey(seed)
  meta = (ol.init_lopt_a(key, feature_set=fset) if k is None
          else ol.init_lagg_a(key, k, feature_set=fset))
  return random_meta(meta, offset_scale=offset_scale)


def _tensor_inputs(meta, shape, k, rng, rounds=2):
  """Accumulators after ``rounds`` rounds, and the last round's inputs of the leaf step."""
  fset = meta.config.feature_set
  p = jnp.asarray(rng.normal(size=shape), jnp.float32)
  acc = features.init_accumulators(p)
  for _ in range(rounds):
    lead = () if k is None else (k,)
    d = jnp.asarray(rng.normal(scale=0.05, size=lead + shape), jnp.float32)
    mean_d = d if k is None else jnp.mean(d, axis=0)
    acc = features.update_accumulators(acc, mean_d, meta.decay_rates(), fset)
  chans = mean_d[None] if k is None else d
  return acc, p, mean_d, chans, features.time_features(jnp.int32(rounds), fset)


@pytest.mark.parametrize("fset, offset_scale", FEATURE_SETS)
@pytest.mark.parametrize("k", [None, 3])
@pytest.mark.parametrize("name", list(ODD_SHAPES))
def test_blocked_step_equals_unblocked_step(name, k, fset, offset_scale):
  meta = _meta(fset, offset_scale, k)
  args = _tensor_inputs(meta, ODD_SHAPES[name], k, np.random.default_rng(len(name)))
  want = np.asarray(reference_leaf_step(meta, *args))
  scale = np.max(np.abs(want))
  assert scale > 0
  for b in BLOCKS:
    step = jax.jit(functools.partial(blocked.blocked_leaf_step, block_size=b))
    got = np.asarray(step(meta, *args))
    assert got.shape == want.shape and got.dtype == np.float32
    # Only the order of the normaliser's sums differs from the unblocked step.
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * scale, err_msg=f"block {b}")


def test_whole_tensor_path_is_the_reference_bit_for_bit():
  meta = _meta("ada-v2", 0.05)
  args = _tensor_inputs(meta, (37, 29), None, np.random.default_rng(0))
  got = blocked.blocked_leaf_step(meta, *args, block_size=37 * 29)
  np.testing.assert_array_equal(got, reference_leaf_step(meta, *args))


def _rounds(tx, params, deltas):
  state, outs = tx.init(params), []
  update = jax.jit(tx.update)
  for d in deltas:
    u, state = update(d, state, params)
    outs.append(u)
    params = jax.tree.map(lambda a, b: a + b, params, u)
  return outs


@pytest.mark.parametrize("fset, offset_scale", FEATURE_SETS)
@pytest.mark.parametrize("k", [None, 4])
def test_blocked_transforms_match_numpy_reference(k, fset, offset_scale):
  meta = _meta(fset, offset_scale, k, seed=3)
  rng = np.random.default_rng(5)
  # Sorted names: jax flattens a dict in key order, the reference takes lists in that order.
  params = {n: jnp.asarray(rng.normal(size=ODD_SHAPES[n]), jnp.float32) for n in sorted(ODD_SHAPES)}
  lead = () if k is None else (k,)
  deltas = [{n: jnp.asarray(rng.normal(scale=0.05, size=lead + p.shape), jnp.float32)
             for n, p in params.items()} for _ in range(3)]
  tx = (ol.lopt_a(meta, block_size=7) if k is None else ol.lagg_a(meta, k, block_size=7))
  got = _rounds(tx, params, deltas)
  r = ref.Learned({n: np.asarray(v) for n, v in meta.mlp.items()},
                  np.asarray(meta.decay_offsets), [p.shape for p in params.values()], k=k,
                  feature_set=fset)
  p = [np.asarray(x, np.float64) for x in params.values()]
  for t, d in enumerate(deltas):
    want = r.step(p, [np.asarray(x, np.float64) for x in d.values()])
    for (n, g), w in zip(got[t].items(), want):
      np.testing.assert_allclose(np.asarray(g, np.float64), w, rtol=1e-3, atol=1e-8,
                                 err_msg=f"{n} round {t}")
    p = [a + b for a, b in zip(p, want)]


def test_blocked_accumulators_are_those_of_the_unblocked_step():
  meta = _meta("ada-v2", 0.05)
  params = {"w": jnp.ones((300, 7)), "b": jnp.zeros(11)}
  d = jax.tree.map(lambda x: 0.01 * jnp.cos(jnp.arange(x.size).reshape(x.shape)), params)
  states = []
  for tx in (ol.lopt_a(meta, block_size=64), ol.lopt_a(meta, leaf_step=reference_leaf_step)):
    _, s = tx.update(d, tx.init(params), params)
    states.append(s)
  jax.tree.map(np.testing.assert_array_equal, *states)


def test_block_length_rule():
  assert blocked.block_length(100_352, None) == 100_352  # the FMNIST MLP layer stays whole
  assert blocked.block_length(blocked.AUTO_WHOLE_MAX + 1, None) <= blocked.DEFAULT_BLOCK_SIZE
  assert blocked.block_length(10, 4) == 4 and blocked.block_length(9, 4) == 3  # balanced
  assert blocked.block_length(5, 5) == 5 and blocked.block_length(5, 1) == 1


@pytest.mark.parametrize("bad", [0, -3, 2.5, "64", True])
def test_bad_block_size_is_a_clear_error(bad):
  meta = ol.init_lopt_a(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="block_size must be"):
    ol.lopt_a(meta, block_size=bad)
  with pytest.raises(ValueError, match="block_size must be"):
    ol.lagg_a(ol.init_lagg_a(jax.random.PRNGKey(0), 2), 2, block_size=bad)


def test_block_size_with_a_custom_leaf_step_is_an_error():
  meta = ol.init_lopt_a(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="both leaf_step and block_size"):
    ol.lopt_a(meta, leaf_step=reference_leaf_step, block_size=64)
