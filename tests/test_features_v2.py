"""ada-v2 (the authors' feature semantics): golden values worked out by hand from the published
formulas (docs/features.md, "ada-v2"), and the property ada-v1 lacked: the update depends on
how large the deltas are."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_localsgd as ol
from optax_localsgd.transforms.learned import features

V2 = "ada-v2"


def test_new_meta_parameters_default_to_ada_v2():
  assert ol.init_lopt_a(jax.random.PRNGKey(0)).config.feature_set == V2
  assert ol.init_lagg_a(jax.random.PRNGKey(0), 4).config.feature_set == V2


def test_unknown_feature_set_is_a_clear_error():
  with pytest.raises(ValueError, match="Unknown feature set 'ada-v9'.*ada-v1, ada-v2"):
    ol.init_lopt_a(jax.random.PRNGKey(0), feature_set="ada-v9")


def test_normalizer_golden_values():
  # x * rsqrt(1e-5 + mean(x^2)): [3, 4] has mean square 12.5; [1e-3, -1e-3] has 1e-6, well
  # below the epsilon, so its scale survives: 1e-3 / sqrt(1.1e-5) = 0.30151134.
  y = features.second_moment_normalize(jnp.asarray([3.0, 4.0]), axes=(0,))
  np.testing.assert_allclose(y, [0.8485278, 1.1313704], rtol=1e-6)
  y = features.second_moment_normalize(jnp.asarray([1e-3, -1e-3]), axes=(0,))
  np.testing.assert_allclose(y, [0.30151134, -0.30151134], rtol=1e-6)
  np.testing.assert_array_equal(features.second_moment_normalize(jnp.zeros(3), axes=(0,)), 0.0)


def test_time_features_golden_values():
  # tanh(t/x - 1): t = 0 gives tanh(-1) everywhere; t = 3 gives tanh(2), tanh(0), tanh(-0.7), ...
  np.testing.assert_allclose(features.time_features(jnp.int32(0), V2),
                             np.full(11, -0.7615941559557649), rtol=1e-6)
  want = [0.9640275800758169, 0.0, -0.6043677771171636, -0.7162978701990245,
          -0.7487042869693086, -0.7573623242165262, -0.7603313514858207, -0.76117386166057,
          -0.7614681348639831, -0.7615521553229998, -0.7615815564376488]
  np.testing.assert_allclose(features.time_features(jnp.int32(3), V2), want, rtol=1e-6,
                             atol=1e-7)


def test_decay_parametrisation_golden_values():
  init = features.INITIAL_DECAYS
  np.testing.assert_allclose(features.decays(jnp.zeros(7), init, V2).keep, init, rtol=1e-6)
  off = jnp.asarray([0.1, 0.0, 0.0, -0.1, 0.5, 0.0, 0.0])
  d = features.decays(off, init, V2)
  # beta_1 = 1 - 0.1 e; beta_4 = 1 - 0.001 / e; beta_5: 1 - 0.1 e^5 < 0, clipped to 0 as in the
  # authors' second-moment accumulators (momentum decays are not clipped there).
  np.testing.assert_allclose(d.keep[0], 1 - 0.1 * math.e, rtol=1e-6)
  np.testing.assert_allclose(d.mix[3], 0.001 / math.e, rtol=1e-5)
  assert float(d.keep[4]) == 0.0 and float(d.mix[4]) == 1.0
  np.testing.assert_allclose(features.decays(jnp.full(7, 0.5), init, V2).keep[0],
                             1 - 0.1 * math.exp(5), rtol=1e-6)
  # Ten times as sensitive as ada-v1's logit offsets near beta = 0.9, and of the other sign:
  # d(1 - beta)/d offset = 10 (1 - beta) against -beta (1 - beta) for the logit.
  small = jnp.zeros(7).at[0].set(1e-3)
  dv2 = features.decays(small, init, V2).mix[0] - 0.1
  dv1 = features.decays(small, init, "ada-v1").mix[0] - 0.1
  np.testing.assert_allclose(float(dv2 / dv1), -10 / 0.9, rtol=2e-2)


def _normalize(c):
  return c / np.sqrt(1e-5 + np.mean(c * c))


def _features_after_one_round(w, delta):
  acc = features.update_accumulators(features.init_accumulators(jnp.asarray(w)),
                                     jnp.asarray(delta),
                                     features.decays(jnp.zeros(7), features.INITIAL_DECAYS, V2),
                                     V2)
  return np.asarray(features.tensor_features(acc, jnp.asarray(w), jnp.asarray(delta),
                                             jnp.asarray(delta)[None], feature_set=V2))


def test_bias_feature_matrix_golden():
  """A (2,) tensor after one round from zero state, decays at their initial values: the
  unfactored branch (full second moments at beta_5..7)."""
  w, g = np.array([1.0, 2.0]), np.array([0.3, -0.1])
  m = [0.1 * g, 0.01 * g, 0.001 * g]            # (1 - beta_i) * delta
  v = 0.001 * g * g                               # beta_4 = 0.999
  vd = [0.1 * g * g, 0.01 * g * g, 0.001 * g * g]  # beta_5..7 = 0.9, 0.99, 0.999 (+1e-30)
  cols = [w, *m, v, *[x / np.sqrt(v + 1e-6) for x in m], 1 / np.sqrt(v + 1e-6),
          *[g / np.sqrt(x + 1e-9) for x in vd], *vd, *vd,
          *[1 / np.sqrt(x + 1e-8) for x in vd], *[1 / np.sqrt(x + 1e-8) for x in vd],
          *[a / np.sqrt(x + 1e-6) for a, x in zip(m, vd)], g]
  want = np.stack([_normalize(c) for c in cols], axis=1)
  got = _features_after_one_round(w.astype(np.float32), g.astype(np.float32))
  assert got.shape == (2, 28)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  # Two entries by hand: w normalised is [1, 2] / sqrt(2.5 + 1e-5); m_1 = [0.03, -0.01] has
  # mean square 5e-4, so it is [0.03, -0.01] / sqrt(5.1e-4).
  np.testing.assert_allclose(got[:, 0], [0.6324543, 1.2649086], rtol=1e-6)
  np.testing.assert_allclose(got[:, 1], [1.3284223, -0.4428074], rtol=1e-6)


def test_matrix_feature_matrix_golden():
  """A (2, 3) tensor: factored. The largest axis (1) is d0: v_row averages over it (one value
  per row), v_col over axis 0; row factor rsqrt(v_row / (mean v_row + 1e-9)), col factor
  rsqrt(v_col)."""
  w = np.arange(6.0).reshape(2, 3) / 6
  g = np.array([[0.1, -0.2, 0.3], [0.4, 0.0, -0.1]])
  m = [(1 - b) * g for b in (0.9, 0.99, 0.999)]
  v = 0.001 * g * g
  cols = [w, *m, v, *[x / np.sqrt(v + 1e-6) for x in m], 1 / np.sqrt(v + 1e-6)]
  row_feat, col_feat, fac = [], [], []
  for mix in (0.1, 0.01, 0.001):
    vr = mix * np.mean(g * g, axis=1)  # (2,)
    vc = mix * np.mean(g * g, axis=0)  # (3,)
    row_feat.append(np.broadcast_to(vr[:, None], (2, 3)))
    col_feat.append(np.broadcast_to(vc[None, :], (2, 3)))
    fac.append((1 / np.sqrt(vr / (vr.mean() + 1e-9)))[:, None] / np.sqrt(vc)[None, :])
  cols += [g * f for f in fac] + row_feat + col_feat
  cols += [1 / np.sqrt(x + 1e-8) for x in row_feat] + [1 / np.sqrt(x + 1e-8) for x in col_feat]
  cols += [a * f for a, f in zip(m, fac)] + [g]
  want = np.stack([_normalize(c).reshape(6) for c in cols], axis=1)
  got = _features_after_one_round(w.astype(np.float32), g.astype(np.float32))
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
  # By hand: row 0 has mean delta^2 (0.01 + 0.04 + 0.09) / 3 = 0.14 / 3, row 1 0.17 / 3; the
  # tiled v_row column of beta_5 holds 0.1 of that, whose mean square (2.69e-5) is close to the
  # normaliser's 1e-5, so the epsilon shows: 0.14/30 / sqrt(1e-5 + mean((0.14/30)^2, (0.17/30)^2)).
  a, b = 0.14 / 30, 0.17 / 30
  np.testing.assert_allclose(got[0, 12], a / math.sqrt(1e-5 + (a * a + b * b) / 2), rtol=1e-5)


def _delta_reader(feature_set):
  """LOpt-A weights whose direction output is the normalised Δ feature itself and whose
  magnitude output is 0: update = -1e-3 * normalise(Δ)."""
  meta = ol.init_lopt_a(jax.random.PRNGKey(0), feature_set=feature_set)
  z = lambda a: jnp.zeros_like(a)
  mlp = {k: z(v) for k, v in meta.mlp.items()}
  mlp["w0"] = mlp["w0"].at[27, 0].set(1.0).at[27, 1].set(-1.0)  # relu(x), relu(-x)
  mlp["w1"] = mlp["w1"].at[0, 0].set(1.0).at[1, 1].set(1.0)
  mlp["w2"] = mlp["w2"].at[0, 0].set(1.0).at[1, 0].set(-1.0)    # d = relu(x) - relu(-x) = x
  return type(meta)(mlp=mlp, decay_offsets=meta.decay_offsets, config=meta.config)


@pytest.mark.parametrize("scale, ratio", [(1.0, 1 / math.sqrt(1 + 1e-5)),
                                          (1e-3, 1e-3 / math.sqrt(1.1e-5)),
                                          (1e-6, 1e-6 / math.sqrt(1e-5 + 1e-12))])
def test_ada_v2_update_follows_the_scale_of_the_deltas(scale, ratio):
  """With Δ = s·u (mean u² = 1) the Δ feature is s·u / sqrt(1e-5 + s²): the step shrinks with
  the deltas once they are small. ada-v1 takes the same step at every scale."""
  u = jnp.asarray([1.0, -1.0, 1.0, -1.0]).reshape(2, 2)
  params = {"w": jnp.ones((2, 2))}
  for fset, want in ((V2, ratio), ("ada-v1", 1.0)):
    tx = ol.lopt_a(_delta_reader(fset))
    upd, _ = tx.update({"w": scale * u}, tx.init(params), params)
    np.testing.assert_allclose(upd["w"] / (-1e-3 * u), want, rtol=1e-5, err_msg=fset)


def test_ada_v2_weights_round_trip_through_a_weight_file(tmp_path):
  meta = ol.init_lopt_a(jax.random.PRNGKey(2))
  path = tmp_path / "w.safetensors"
  ol.pretrained.save(path, meta, {"note": "test"})
  back = ol.pretrained.load(path)
  assert back.config.feature_set == V2
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  d = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
  a, _ = ol.lopt_a(meta).update(d, ol.lopt_a(meta).init(params), params)
  b, _ = ol.lopt_a(back).update(d, ol.lopt_a(back).init(params), params)
  np.testing.assert_array_equal(a["w"], b["w"])
