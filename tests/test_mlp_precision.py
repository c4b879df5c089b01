"""``mlp_dtype="bfloat16"`` (issue 14): the learned MLP's hidden-layer matmuls with bfloat16
operands and float32 accumulation, against a NumPy reference of exactly that arithmetic, and
the same numbers whole and in blocks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_localsgd as ol
from conftest import random_meta
from optax_localsgd.transforms.learned import blocked, mlp
from optax_localsgd.transforms.learned.mlp import reference_leaf_step
from test_blocked import ODD_SHAPES, _meta, _tensor_inputs


def _np_mlp(w, x, tf, bf16: bool):
  """F_phi in float64, with the two hidden matmuls' operands rounded to bfloat16 if ``bf16``."""
  r = (lambda a: np.asarray(np.asarray(a, np.float32).astype(jnp.bfloat16), np.float64)
       ) if bf16 else (lambda a: np.asarray(a, np.float64))
  w = {k: np.asarray(v, np.float64) for k, v in w.items()}
  n_x = x.shape[1]
  b0 = w["b0"] + np.asarray(tf, np.float64) @ w["w0"][n_x:]
  h = np.maximum(r(x) @ r(w["w0"][:n_x]) + b0, 0)
  h = np.maximum(r(h.astype(np.float32)) @ r(w["w1"]) + w["b1"], 0)
  out = h @ w["w2"] + w["b2"]
  return out[:, 0], out[:, 1]


def test_bfloat16_mlp_is_bfloat16_operands_with_float32_sums():
  meta = random_meta(ol.init_lopt_a(jax.random.PRNGKey(0)), offset_scale=0.05)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(4096, meta.mlp["w0"].shape[0] - 11)).astype(np.float32)
  tf = rng.normal(size=11).astype(np.float32)
  got = np.stack(mlp.mlp_apply(meta.mlp, jnp.asarray(x), jnp.asarray(tf), "bfloat16"))
  assert got.dtype == np.float32
  want_bf16 = np.stack(_np_mlp(meta.mlp, x, tf, bf16=True))
  want_f32 = np.stack(_np_mlp(meta.mlp, x, tf, bf16=False))
  err_bf16 = np.abs(got - want_bf16).max()
  err_f32 = np.abs(got - want_f32).max()
  # Rounding the operands is the whole difference from float32: the bfloat16 reference is
  # matched to float32 summation error, the float32 one only to bfloat16's 3 digits.
  assert err_bf16 < 0.05 * err_f32, (err_bf16, err_f32)
  assert err_f32 > 1e-4 * np.abs(want_f32).max()


@pytest.mark.parametrize("name", ["dense", "conv", "rank5", "bias"])
@pytest.mark.parametrize("k", [None, 3])
def test_blocked_bfloat16_step_equals_the_whole_tensor_bfloat16_step(name, k):
  meta = _meta("ada-v2", 0.05, k)
  args = _tensor_inputs(meta, ODD_SHAPES[name], k, np.random.default_rng(7))
  want = np.asarray(reference_leaf_step(meta, *args, mlp_dtype="bfloat16"))
  f32 = np.asarray(reference_leaf_step(meta, *args))
  scale = np.abs(f32).max()
  for b in (5, 64):
    step = functools.partial(blocked.blocked_leaf_step, block_size=b, mlp_dtype="bfloat16")
    got = np.asarray(jax.jit(step)(meta, *args))
    # Reordered normaliser sums can flip the bfloat16 rounding of a few operands.
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * scale, err_msg=f"block {b}")
    assert np.abs(got - want).mean() < 0.2 * np.abs(f32 - want).mean() + 1e-7 * scale


@pytest.mark.parametrize("kind", ["lopt_a", "lagg_a"])
def test_transforms_take_mlp_dtype_and_stay_close_to_float32(kind):
  key = jax.random.PRNGKey(3)
  k = 4
  meta = random_meta(ol.init_lopt_a(key) if kind == "lopt_a" else ol.init_lagg_a(key, k),
                     offset_scale=0.05)
  make = (lambda **kw: ol.lopt_a(meta, **kw)) if kind == "lopt_a" else (
      lambda **kw: ol.lagg_a(meta, k, **kw))
  rng = np.random.default_rng(1)
  params = {"w": jnp.asarray(rng.normal(size=(300, 200)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(200,)), jnp.float32)}
  lead = () if kind == "lopt_a" else (k,)
  delta = jax.tree.map(lambda p: jnp.asarray(0.01 * rng.normal(size=lead + p.shape),
                                             jnp.float32), params)
  outs = {}
  for dtype in (None, "float32", "bfloat16", jnp.bfloat16):
    tx = make(mlp_dtype=dtype)
    u, _ = jax.jit(tx.update)(delta, tx.init(params), params)
    outs[str(dtype)] = np.concatenate([np.ravel(x) for x in jax.tree.leaves(u)])
  np.testing.assert_array_equal(outs["None"], outs["float32"])
  np.testing.assert_array_equal(outs["bfloat16"], outs[str(jnp.bfloat16)])
  rel = np.linalg.norm(outs["bfloat16"] - outs["None"]) / np.linalg.norm(outs["None"])
  assert 0 < rel < 0.05, rel


@pytest.mark.parametrize("bad", ["float16", "bf16", 3, jnp.int32])
def test_unknown_mlp_dtype_is_a_clear_error(bad):
  with pytest.raises(ValueError, match="mlp_dtype must be one of float32, bfloat16"):
    ol.lopt_a(ol.init_lopt_a(jax.random.PRNGKey(0)), mlp_dtype=bad)


def test_mlp_dtype_with_a_custom_leaf_step_is_an_error():
  with pytest.raises(ValueError, match="both leaf_step and mlp_dtype"):
    ol.lopt_a(ol.init_lopt_a(jax.random.PRNGKey(0)), leaf_step=reference_leaf_step,
              mlp_dtype="bfloat16")
