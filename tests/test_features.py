"""Ada features (docs/features.md) against the independent NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import optax_localsgd as ol
from optax_localsgd.transforms.learned import features
import reference as ref
from conftest import make_params, random_meta


@pytest.mark.parametrize("k, n_in, count", [(None, 39, 2402), (8, 46, 2626),
                                            (16, 54, 2882), (32, 70, 3394)])
def test_paper_parameter_and_feature_counts(k, n_in, count):
  key = jax.random.PRNGKey(0)
  meta = ol.init_lopt_a(key) if k is None else ol.init_lagg_a(key, k)
  assert meta.config.num_inputs == n_in
  assert meta.num_mlp_params() == count == ref.mlp_param_count(n_in)
  assert meta.decay_offsets.shape == (7,)
  assert meta.mlp["w0"].shape == (n_in, 32)


@pytest.mark.parametrize("shape, view, axes", [
    ((), (1, 1), (0, 1)),
    ((7,), (7, 1), (0, 1)),
    ((5, 6), (5, 6), (0, 1)),
    ((3, 3, 64, 64), (3, 3, 64, 64), (2, 3)),  # conv kernel: ties go to the later axes
    ((5, 7, 7), (5, 7, 7), (1, 2)),
    ((64, 64, 3), (64, 64, 3), (0, 1)),
    ((12, 2, 192), (12, 2, 192), (0, 2)),  # stacked layers
])
def test_factor_rule(shape, view, axes):
  spec = features.factor_spec(shape)
  assert (spec.view_shape, (spec.row_axis, spec.col_axis)) == (view, axes)
  assert ref.factor_axes(shape) == (view, *axes)


@given(st.lists(st.integers(1, 6), min_size=0, max_size=5))
def test_factor_rule_matches_reference_for_any_shape(shape):
  spec = features.factor_spec(tuple(shape))
  assert (spec.view_shape, spec.row_axis, spec.col_axis) == ref.factor_axes(tuple(shape))


def _jax_features(meta, params, deltas, rounds, k=None):
  """Feature matrices per round and leaf, from the package's functions."""
  fset = meta.config.feature_set
  dec = meta.decay_rates()
  accs = {n: features.init_accumulators(p) for n, p in params.items()}
  out = []
  for t in range(rounds):
    tf = features.time_features(jnp.int32(t), fset)
    per_leaf = {}
    for n, p in params.items():
      d = deltas[t][n]
      mean_d = d if k is None else jnp.mean(d, axis=0)
      accs[n] = features.update_accumulators(accs[n], mean_d, dec, fset)
      chans = mean_d[None] if k is None else d
      x = features.tensor_features(accs[n], p, mean_d, chans, feature_set=fset)
      per_leaf[n] = np.concatenate([x, np.broadcast_to(tf, (x.shape[0], 11))], axis=1)
    out.append(per_leaf)
  return out


@pytest.mark.parametrize("fset, offset_scale", [("ada-v2", 0.05), ("ada-v1", 0.5)])
@pytest.mark.parametrize("k", [None, 1, 8])
def test_features_match_reference(k, fset, offset_scale):
  rounds = 4
  key = jax.random.PRNGKey(1)
  meta = random_meta(ol.init_lopt_a(key, feature_set=fset) if k is None
                     else ol.init_lagg_a(key, k, feature_set=fset), offset_scale=offset_scale)
  params = make_params(0)
  rng = np.random.default_rng(2)
  lead = () if k is None else (k,)
  deltas = [{n: jnp.asarray(rng.normal(scale=0.1, size=lead + p.shape), jnp.float32)
             for n, p in params.items()} for _ in range(rounds)]
  got = _jax_features(meta, params, deltas, rounds, k)
  r = ref.Learned({n: np.asarray(v) for n, v in meta.mlp.items()},
                  np.asarray(meta.decay_offsets), [p.shape for p in params.values()], k=k,
                  feature_set=fset)
  names = list(params)
  for t in range(rounds):
    want = r.features([np.asarray(params[n]) for n in names],
                      [np.asarray(deltas[t][n]) for n in names])
    for n, w in zip(names, want):
      assert got[t][n].shape == w.shape == (max(1, int(np.prod(params[n].shape))),
                                              meta.config.num_inputs)
      np.testing.assert_allclose(got[t][n], w, rtol=2e-4, atol=2e-5, err_msg=f"{n} round {t}")


def test_normalized_columns_have_unit_second_moment_in_ada_v1():
  params = make_params(3)
  meta = ol.init_lopt_a(jax.random.PRNGKey(0), feature_set="ada-v1")
  deltas = [jax.tree.map(lambda p: 0.01 * p + 0.001, params)]
  x = _jax_features(meta, params, deltas, 1)[0]["dense"]
  np.testing.assert_allclose(np.mean(x[:, :28] ** 2, axis=0), 1.0, rtol=1e-5)


def test_rank_one_factored_moment_is_full_second_moment():
  """For a vector, delta * fac_i equals delta / sqrt(EMA(delta^2)) with decay beta_{4+i}."""
  rng = np.random.default_rng(0)
  dec = features.decays(jnp.zeros(7), features.INITIAL_DECAYS, "ada-v1")
  acc = features.init_accumulators(jnp.zeros(9))
  ema = np.zeros((3, 9))
  betas = np.asarray(features.INITIAL_DECAYS[4:7])[:, None]
  for _ in range(5):
    d = rng.normal(size=9).astype(np.float32)
    acc = features.update_accumulators(acc, jnp.asarray(d), dec, "ada-v1")
    ema = betas * ema + (1 - betas) * d.astype(np.float64) ** 2
  row = np.asarray(acc.row)[..., 0]
  rf = 1 / np.sqrt(row / row.mean(axis=1, keepdims=True))
  cf = 1 / np.sqrt(np.asarray(acc.col)[..., 0])
  np.testing.assert_allclose(rf * cf, 1 / np.sqrt(ema), rtol=1e-4)


@given(st.floats(-1e30, 1e30, allow_nan=False), st.integers(1, 50))
def test_normalize_is_scale_free_and_never_overflows(scale, n):
  x = jnp.linspace(-1.0, 1.0, n) * jnp.float32(scale)
  y = features.normalize(x, axes=(0,))
  assert np.all(np.isfinite(y))
  ms = float(jnp.mean(y ** 2))
  assert ms == 0.0 if float(jnp.max(jnp.abs(x))) == 0 else abs(ms - 1) < 1e-5


def test_ada_v1_time_features():
  tf = features.time_features(jnp.int32(30), "ada-v1")
  np.testing.assert_allclose(tf, np.tanh(30 / np.asarray(ref.TIME_SCALES)), rtol=1e-6)
  assert np.all(features.time_features(jnp.int32(0), "ada-v1") == 0)


def test_ada_v1_decays_stay_in_unit_interval_and_start_at_defaults():
  meta = ol.init_lopt_a(jax.random.PRNGKey(0), feature_set="ada-v1")
  np.testing.assert_allclose(meta.decays(), ref.BETA0, rtol=1e-6)
  big = type(meta)(meta.mlp, jnp.full((7,), -50.0), meta.config)
  assert np.all((big.decays() >= 0) & (big.decays() < 1))
