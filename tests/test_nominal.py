"""The nominal init (``meta-train --init nesterov:LR,MOMENTUM``): an un-meta-trained LOpt-A /
LAgg-A whose update is DiLoCo's outer Nesterov step while the deltas are small."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_localsgd import init_lagg_a, init_lopt_a, lagg_a, lopt_a
from optax_localsgd.errors import UsageError
from optax_localsgd.meta.train import MetaTrainConfig, initial_theta
from optax_localsgd.transforms.learned import features
from optax_localsgd.transforms.learned.mlp import mlp_apply
from optax_localsgd.transforms.learned.nominal import nesterov_coefficients, nesterov_init

SHAPES = {"w": (6, 5), "b": (5,), "s": ()}


def _deltas(key, rounds, scale, k=None):
  out = []
  for r in range(rounds):
    ks = jax.random.split(jax.random.fold_in(key, r), len(SHAPES))
    lead = () if k is None else (k,)
    out.append({n: scale * jax.random.normal(kk, lead + s) for kk, (n, s) in
                zip(ks, SHAPES.items())})
  return out


def _run(tx, deltas, params):
  state = tx.init(params)
  update = jax.jit(tx.update)  # one compilation for all the rounds
  ups = []
  for d in deltas:
    u, state = update(d, state, params)
    ups.append(u)
    params = optax.apply_updates(params, u)
  return ups


def test_mlp_computes_the_linear_function_exactly():
  meta = nesterov_init(init_lopt_a(jax.random.PRNGKey(3)), 0.7, 0.9)
  a = np.zeros(meta.config.num_inputs - features.NUM_TIME_FEATURES, np.float32)
  for col, w in nesterov_coefficients(meta.config, 0.7, 0.9).items():
    a[col] = w
  x = jax.random.normal(jax.random.PRNGKey(0), (50, a.size))
  d, m = mlp_apply(meta.mlp, x, jnp.linspace(-1, 1, features.NUM_TIME_FEATURES))
  np.testing.assert_allclose(d, x @ a, rtol=1e-5, atol=1e-4)
  np.testing.assert_array_equal(m, 0.0)


def test_coefficients_from_the_formula():
  # lr sqrt(eps) / lambda_1 on the delta; times mu / (1 - mu) on m_1.
  cfg = init_lopt_a(jax.random.PRNGKey(0)).config
  c = nesterov_coefficients(cfg, 1.0, 0.95)
  assert c[features.NUM_ACCUMULATOR_FEATURES] == pytest.approx(np.sqrt(1e-5) / 1e-3)
  assert c[1] == pytest.approx(np.sqrt(1e-5) / 1e-3 * 19.0)


@pytest.mark.parametrize("lr,mu", [(1.0, 0.95), (0.5, 0.9)])
def test_lopt_a_update_is_nesterov_for_small_deltas(lr, mu):
  params = {n: jnp.ones(s) for n, s in SHAPES.items()}
  deltas = _deltas(jax.random.PRNGKey(1), 6, 1e-4)
  meta = nesterov_init(init_lopt_a(jax.random.PRNGKey(0)), lr, mu)
  got = _run(lopt_a(meta), deltas, params)
  want = _run(optax.sgd(lr, momentum=mu, nesterov=True), deltas, params)
  for g, w in zip(got, want):
    for n in SHAPES:
      # The normaliser's eps dominates mean(x^2) ~ 1e-8 (a 1e-3 relative difference) except
      # for the scalar, whose one entry sets its own mean square: its features are
      # sign-like and the step is bounded (checked below).
      if n != "s":
        np.testing.assert_allclose(g[n], w[n], rtol=0, atol=2e-3 * float(jnp.max(jnp.abs(w[n]))))


def test_large_deltas_give_a_bounded_per_tensor_step():
  # Where mean(delta^2) >> eps each feature column is x / rms(x), so the step no longer grows
  # with delta: |update| <= lambda_1 * sum |a_j| * max |x_j|, and a unit-RMS column of N
  # entries has max |x_j| <= sqrt(N).
  params = {n: jnp.ones(s) for n, s in SHAPES.items()}
  meta = nesterov_init(init_lopt_a(jax.random.PRNGKey(0)), 1.0, 0.95)
  small = _run(lopt_a(meta), _deltas(jax.random.PRNGKey(1), 3, 10.0), params)[-1]
  big = _run(lopt_a(meta), _deltas(jax.random.PRNGKey(1), 3, 1000.0), params)[-1]
  np.testing.assert_allclose(small["w"], big["w"], rtol=0, atol=1e-4 * float(jnp.max(jnp.abs(big["w"]))))
  bound = 1e-3 * sum(abs(v) for v in nesterov_coefficients(meta.config, 1.0, 0.95).values())
  assert float(jnp.max(jnp.abs(big["w"]))) <= bound * np.sqrt(30)


def test_lagg_a_update_is_nesterov_on_the_mean_delta():
  k = 4
  params = {n: jnp.ones(s) for n, s in SHAPES.items()}
  stacks = _deltas(jax.random.PRNGKey(2), 5, 1e-4, k=k)
  meta = nesterov_init(init_lagg_a(jax.random.PRNGKey(0), k), 1.0, 0.9)
  got = _run(lagg_a(meta, k), stacks, params)
  want = _run(optax.sgd(1.0, momentum=0.9, nesterov=True),
              [jax.tree.map(lambda x: x.mean(0), s) for s in stacks], params)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g["w"], w["w"], rtol=0, atol=2e-3 * float(jnp.max(jnp.abs(w["w"]))))


def test_bad_arguments():
  meta = init_lopt_a(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="momentum"):
    nesterov_init(meta, 1.0, 1.0)
  with pytest.raises(ValueError, match="server_lr"):
    nesterov_init(meta, -1.0, 0.9)
  with pytest.raises(ValueError, match="ada-v2"):
    nesterov_init(init_lopt_a(jax.random.PRNGKey(0), feature_set="ada-v1"), 1.0, 0.9)


def test_meta_train_config_parses_and_checks_the_flag():
  theta = initial_theta(MetaTrainConfig(nominal_init="nesterov:1.0,0.95", tasks_per_estimate=4))
  assert float(theta.decays()[0]) == pytest.approx(0.95, abs=1e-6)
  for bad in ("nesterov:1.0", "adam:1,0.9", "nesterov:1.0,1.5", "nesterov:x,0.9"):
    with pytest.raises(UsageError, match="nesterov:LR,MOMENTUM"):
      MetaTrainConfig(nominal_init=bad)
  with pytest.raises(UsageError, match="init-from"):
    MetaTrainConfig(nominal_init="nesterov:1,0.9", init_from="lopt_a/fmnist_mlp_k8_h4")
  plain = MetaTrainConfig().identity()
  assert "nominal_init" not in plain  # older runs keep their checkpoint identity
  assert MetaTrainConfig(nominal_init="nesterov:1,0.9").identity()["nominal_init"]
