"""The compressors of optax_localsgd.compression: what they keep, what they cost, their errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SHAPES, make_params
from optax_localsgd import compression as C


def _count_nonzero(tree):
  return [int(np.count_nonzero(np.asarray(x))) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------------------
# top_k


@pytest.mark.parametrize("fraction,size,kept", [
    (0.01, 1000, 10), (0.07, 100, 7), (0.5, 7, 4), (1.0, 30, 30), (0.1, 144, 15),
    (0.01, 10, 1), (1e-9, 5, 1), (0.3, 1, 1)])
def test_top_k_keeps_ceil_of_fraction_times_size(fraction, size, kept):
  assert C.num_kept(fraction, size) == kept
  x = jnp.asarray(np.random.default_rng(0).normal(size=size), jnp.float32)
  sent, _ = C.top_k(fraction).update({"x": x}, C.top_k(fraction).init({"x": x}))
  s = np.asarray(sent["x"])
  assert np.count_nonzero(s) == kept
  # The kept entries are the largest in magnitude, unchanged.
  keep = np.argsort(-np.abs(np.asarray(x)), kind="stable")[:kept]
  np.testing.assert_array_equal(s[keep], np.asarray(x)[keep])


def test_top_k_works_per_leaf_on_every_rank():
  params = make_params(1)
  sent, _ = C.top_k(0.1).update(params, C.top_k(0.1).init(params))
  assert _count_nonzero(sent) == [C.num_kept(0.1, math.prod(s)) for s in
                                  (SHAPES["bias"], SHAPES["conv"], SHAPES["dense"], ())]
  for a, b in zip(jax.tree.leaves(sent), jax.tree.leaves(params)):
    assert a.shape == b.shape and a.dtype == b.dtype


def test_rank_zero_leaf_is_always_sent():
  tx = C.top_k(0.01)
  sent, _ = tx.update(jnp.float32(-2.5), tx.init(jnp.float32(0)))
  assert float(sent) == -2.5


def test_ties_keep_the_lower_row_major_index():
  tx = C.top_k(0.5)
  sent, _ = tx.update(jnp.ones((2, 2)), tx.init(jnp.ones((2, 2))))
  np.testing.assert_array_equal(sent, [[1, 1], [0, 0]])
  # Magnitude decides, not sign; among |-2| == |2| the first wins.
  sent, _ = C.top_k(1 / 3).update(jnp.array([1.0, -2.0, 2.0]), ())
  np.testing.assert_array_equal(sent, [0, -2, 0])


def test_error_feedback_loses_nothing_exactly():
  """sum(sent) + residual == sum(inputs), exactly: integer-valued floats make every sum exact,
  and per step, sent + new residual == input + old residual bitwise for any floats."""
  rng = np.random.default_rng(3)
  tx = C.top_k(0.2, error_feedback=True)
  ints = [{"a": jnp.asarray(rng.integers(-50, 50, size=(4, 5)), jnp.float32),
           "b": jnp.asarray(rng.integers(-50, 50, size=()), jnp.float32)} for _ in range(6)]
  state = tx.init(ints[0])
  total_sent = jax.tree.map(jnp.zeros_like, ints[0])
  for x in ints:
    sent, state = tx.update(x, state)
    assert _count_nonzero(sent)[0] <= 4
    total_sent = jax.tree.map(jnp.add, total_sent, sent)
  total_in = jax.tree.map(lambda *xs: sum(xs), *ints)
  for got, want in zip(jax.tree.leaves(jax.tree.map(jnp.add, total_sent, state.residual)),
                       jax.tree.leaves(total_in)):
    np.testing.assert_array_equal(got, want)

  floats = make_params(4)
  state = tx.init(floats)
  for step in range(3):
    x = make_params(10 + step)
    acc = jax.tree.map(jnp.add, x, state.residual)
    sent, state = tx.update(x, state)
    for s, r, a in zip(*(jax.tree.leaves(t) for t in (sent, state.residual, acc))):
      np.testing.assert_array_equal(s + r, a)
      assert not np.any((np.asarray(s) != 0) & (np.asarray(r) != 0))  # sent or kept, not split


def test_error_feedback_sends_what_was_dropped_later():
  tx = C.top_k(0.5, error_feedback=True)
  state = tx.init(jnp.zeros(2))
  sent, state = tx.update(jnp.array([3.0, 1.0]), state)
  np.testing.assert_array_equal(sent, [3, 0])
  sent, state = tx.update(jnp.array([0.0, 0.5]), state)
  np.testing.assert_array_equal(sent, [0, 1.5])  # the residual 1 plus the new 0.5
  np.testing.assert_array_equal(state.residual, [0, 0])


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, math.nan, math.inf, True, "0.1", None])
def test_top_k_rejects_a_fraction_outside_0_1(bad):
  with pytest.raises(ValueError, match=r"fraction must be a number in \(0, 1\]"):
    C.top_k(bad)
  with pytest.raises(ValueError, match="fraction"):
    C.TopK(bad)


def test_error_feedback_names_a_delta_of_another_model():
  tx = C.top_k(0.5, error_feedback=True)
  with pytest.raises(ValueError, match=r"leaf \['w'\] has shape \(3,\), but init saw \(2,\)"):
    tx.update({"w": jnp.zeros(3)}, tx.init({"w": jnp.zeros(2)}))
  with pytest.raises(ValueError, match="structure"):
    tx.update({"v": jnp.zeros(2)}, tx.init({"w": jnp.zeros(2)}))


# ------------------------------------------------------------------------------------------
# quantize


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("stochastic", [True, False])
def test_quantize_lands_on_the_scaled_grid(bits, stochastic):
  params = make_params(5)
  tx = C.quantize(bits, stochastic)
  sent, _ = tx.update(params, tx.init(params))
  levels = 2 ** (bits - 1) - 1
  for q, x in zip(jax.tree.leaves(sent), jax.tree.leaves(params)):
    assert q.shape == x.shape and q.dtype == x.dtype
    s = float(jnp.max(jnp.abs(x)))
    codes = np.asarray(q, np.float64) * levels / s
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert np.max(np.abs(codes)) <= levels + 1e-4
    # Stochastic rounding picks one of the two neighbouring levels; nearest, the closest.
    err = np.abs(np.asarray(q) - np.asarray(x))
    assert np.all(err <= s / levels * (1 if stochastic else 0.5) + 1e-6)


def test_quantize_zero_leaf_and_rank_zero_leaf():
  tx = C.quantize(2)
  sent, _ = tx.update({"z": jnp.zeros(5), "s": jnp.float32(-0.3)}, tx.init(None))
  np.testing.assert_array_equal(sent["z"], np.zeros(5))
  np.testing.assert_allclose(float(sent["s"]), -0.3, rtol=1e-6)  # a scalar is its own scale


@pytest.mark.parametrize("bits", [2, 4])
def test_stochastic_quantize_is_unbiased(bits):
  """The mean of N draws is within 5 standard errors of x, entry by entry, the standard error
  derived from the rounding variance (s/M)^2 p(1-p) of each entry (fixed seed: deterministic)."""
  n = 4000
  x = jnp.asarray(np.random.default_rng(7).uniform(-1, 1, size=64), jnp.float32)
  tx = C.quantize(bits, seed=123)

  def body(state, _):
    q, state = tx.update(x, state)
    return state, q

  _, draws = jax.lax.scan(body, tx.init(x), None, length=n)
  draws = np.asarray(draws, np.float64)
  levels = 2 ** (bits - 1) - 1
  s = float(np.max(np.abs(x)))
  y = np.asarray(x, np.float64) * levels / s
  p = y - np.floor(y)
  se = (s / levels) * np.sqrt(p * (1 - p) / n)
  np.testing.assert_array_less(np.abs(draws.mean(0) - np.asarray(x)), 5 * se + 1e-6)
  assert len({tuple(d) for d in draws[:10]}) == 10  # the key really is split every step


@pytest.mark.parametrize("bad", [1, 3, 16, 0, 4.0, True, "4", None])
def test_quantize_rejects_unsupported_bits(bad):
  with pytest.raises(ValueError, match=r"bits must be one of \(2, 4, 8\)"):
    C.quantize(bad)
  with pytest.raises(ValueError, match="bits must be one of"):
    C.Quantize(bad)


# ------------------------------------------------------------------------------------------
# jit, vmap


# Named ids: a transform's repr holds addresses, which differ between pytest-xdist workers.
@pytest.mark.parametrize("tx", [C.top_k(0.1), C.top_k(0.1, error_feedback=True), C.quantize(4),
                                C.quantize(8, stochastic=False)],
                         ids=["top_k", "top_k_ef", "quantize4", "quantize8_nearest"])
def test_jit_and_vmap_match_eager(tx):
  params = make_params(2)
  state = tx.init(params)
  eager, eager_state = tx.update(params, state)
  jitted, jitted_state = jax.jit(tx.update)(params, state)
  for a, b in zip(jax.tree.leaves((eager, eager_state)), jax.tree.leaves((jitted, jitted_state))):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # Three workers, each with its own delta and state: vmap == one by one.
  deltas = [make_params(20 + i) for i in range(3)]
  states = [tx.init(params) for _ in range(3)]
  stack = lambda ts: jax.tree.map(lambda *xs: jnp.stack(xs), *ts)
  vout, vstate = jax.jit(jax.vmap(tx.update))(stack(deltas), stack(states))
  for i, (d, s) in enumerate(zip(deltas, states)):
    out, st = tx.update(d, s)
    for a, b in zip(jax.tree.leaves((out, st)), jax.tree.leaves((vout, vstate))):
      np.testing.assert_allclose(a, b[i], rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Configuration, specs, bits


def test_bits_follow_the_documented_encoding():
  params = make_params(0)  # sizes: scalar 1, bias 7, dense 30, conv 144 (182 entries)
  assert C.dense_bits(params) == 32 * 182
  # top-0.1 keeps 1, 1, 3, 15 entries with indices of 0, 3, 5, 8 bits.
  assert C.TopK(0.1).bits(params) == 1 * 32 + 1 * 35 + 3 * 37 + 15 * 40
  assert C.TopK(0.1, error_feedback=True).bits(params) == C.TopK(0.1).bits(params)
  assert C.TopK(1.0).bits(params) == sum(n * (32 + math.ceil(math.log2(n)))
                                         for n in (1, 7, 30, 144))
  assert C.Quantize(4).bits(params) == 4 * 182 + 4 * 32
  assert C.Quantize(2, stochastic=False).bits(params) == 2 * 182 + 4 * 32
  assert C.round_bits(None, params, 8) == 8 * 32 * 182
  assert C.round_bits(C.Quantize(8), params, 3) == 3 * (8 * 182 + 128)


@pytest.mark.parametrize("text,want", [
    ("top_k:0.01", C.TopK(0.01)), ("top_k:0.01:ef", C.TopK(0.01, True)),
    ("quantize:4", C.Quantize(4)), ("quantize:2:nearest", C.Quantize(2, stochastic=False)),
    ("none", None), (None, None)])
def test_specs_parse_and_print_back(text, want):
  got = C.from_spec(text)
  assert got == want
  if got is not None:
    assert C.from_spec(got.spec()) == got
    assert hash(got) == hash(want)  # configs are hashable (RoundConfig, jit caches)


@pytest.mark.parametrize("text", ["top_k", "top_k:0", "top_k:2", "top_k:x", "top_k:0.1:fb",
                                  "quantize:3", "quantize:4.5", "quantize:4:up", "gzip:9"])
def test_bad_specs_say_what_is_expected(text):
  with pytest.raises(ValueError, match=r"Bad compression spec .*expected none, top_k:F"):
    C.from_spec(text)


def test_workers_get_their_own_rounding_noise():
  params = {"w": jnp.ones(3)}
  states = C.Quantize(4).init_workers(params, 4)
  assert states.key.shape == (4, 2) and len({tuple(k) for k in np.asarray(states.key)}) == 4
  ef = C.TopK(0.5, True).init_workers(params, 4)
  assert ef.residual["w"].shape == (4, 3) and not np.any(ef.residual["w"])
