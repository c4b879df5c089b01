"""Server registry, and every hand-designed server against the Optax composition or NumPy loop
its docstring says it is."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_localsgd as ol
from optax_localsgd.harness import servers
from optax_localsgd.transforms import baselines


def test_registry_builds_every_server():
  for name in servers.available_servers():
    s = servers.make_server(name, num_workers=4, local_learning_rate=0.1)
    assert s.mode in ("local", "data_parallel")
    assert s.per_worker_deltas == (name == "lagg_a")
  with pytest.raises(ValueError, match="Unknown server 'nope'; available: adam"):
    servers.make_server("nope", num_workers=4, local_learning_rate=0.1)


def _nesterov_outer_sgd(deltas, w0, lr, mu):
  """DiLoCo's outer step in NumPy (PyTorch SGD(nesterov=True) on the outer gradient Delta):
  m <- mu m + Delta; w <- w - lr_t (Delta + mu m). Returns the weights after each step."""
  m, w, out = np.zeros_like(w0), w0.copy(), []
  for t, d in enumerate(deltas):
    m = mu * m + d
    w = w - (lr(t) if callable(lr) else lr) * (d + mu * m)
    out.append(w)
  return out


@pytest.mark.parametrize("make, lr, mu", [
    (baselines.diloco, 0.7, 0.9),  # the defaults: DiLoCo's (Douillard et al., 2023)
    (lambda: baselines.diloco(0.3, 0.5), 0.3, 0.5),
    (lambda: baselines.diloco(optax.linear_schedule(0.2, 1.0, 3), 0.9),
     lambda t: 0.2 + 0.8 * min(t, 3) / 3, 0.9),
])
def test_diloco_is_nesterov_outer_sgd(make, lr, mu):
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(3, 2)).astype(np.float32)
  deltas = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(5)]  # W_old - W_new
  tx = make()
  params = {"w": jnp.asarray(w0)}
  state = tx.init(params)
  for d, want in zip(deltas, _nesterov_outer_sgd(deltas, w0, lr, mu)):
    updates, state = tx.update({"w": jnp.asarray(d)}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["w"], want, rtol=1e-5, atol=1e-6)


ROUNDS = 6


def _trajectories(ours, theirs, dtype=jnp.float32, seed=0):
  """Both transforms jitted for ROUNDS rounds on the same deltas, each from its own params;
  yields (round, our updates, their updates, our params, their params)."""
  rng = np.random.default_rng(seed)
  p0 = {"w": jnp.asarray(rng.normal(size=(4, 3)), dtype), "b": jnp.zeros((3,), dtype)}
  pa, pb, sa, sb = p0, p0, ours.init(p0), theirs.init(p0)
  ua_fn, ub_fn = jax.jit(ours.update), jax.jit(theirs.update)
  for t in range(ROUNDS):
    d = jax.tree.map(lambda p: jnp.asarray(rng.normal(scale=0.1, size=p.shape), dtype), p0)
    ua, sa = ua_fn(d, sa, pa)
    ub, sb = ub_fn(d, sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    yield t, ua, ub, pa, pb


def _assert_same_trajectory(ours, theirs, rtol, dtype=jnp.float32):
  for t, ua, ub, pa, pb in _trajectories(ours, theirs, dtype):
    for name in ("w", "b"):
      assert ua[name].dtype == ub[name].dtype == dtype
      for what, a, b in (("updates", ua, ub), ("params", pa, pb)):
        np.testing.assert_allclose(np.asarray(a[name], np.float32), np.asarray(b[name], np.float32),
                                   rtol=rtol, atol=1e-7, err_msg=f"{what}, round {t}")


WARMUP = optax.linear_schedule(0.5, 1.5, transition_steps=4)
DECAY = optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.7)
STEP_DOWN = optax.piecewise_constant_schedule(0.3, {2: 1 / 3})  # gamma 0.3, then 0.1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lr", [1.0, 0.7, WARMUP, DECAY])
def test_local_sgd_is_optax_sgd(lr, dtype):
  """local_sgd(lr) is documented as optax.sgd(lr) on the mean delta, schedule included: the
  same updates bit for bit (the step size is cast to the delta's dtype first in both)."""
  for t, ua, ub, _, _ in _trajectories(ol.local_sgd(lr), optax.sgd(lr), dtype):
    for name in ("w", "b"):
      np.testing.assert_array_equal(np.asarray(ua[name], np.float32),
                                    np.asarray(ub[name], np.float32), err_msg=f"round {t}")


@pytest.mark.parametrize("alpha", [1.0, 1.66, WARMUP])
@pytest.mark.parametrize("beta, gamma", [(0.95, 0.1), (0.5, 0.3)])
def test_slowmo_with_constant_gamma_is_heavy_ball_optax_sgd(alpha, beta, gamma):
  """For a constant gamma, u = Delta-buffer / gamma and update = -alpha gamma u is optax's
  trace (t = Delta + beta t) scaled by -alpha: optax.sgd(alpha, momentum=beta), as
  docs/baselines.md states."""
  _assert_same_trajectory(ol.slowmo(alpha, beta, gamma), optax.sgd(alpha, momentum=beta), 2e-5)


def _slowmo_as_optax(alpha, beta, gamma):
  """Wang et al.'s rule as an Optax chain: divide by gamma_t, heavy-ball trace, scale by
  -alpha_t gamma_t; every stage reads its own count, which all advance together."""
  at = lambda x: x if callable(x) else (lambda t: x)
  return optax.chain(optax.scale_by_schedule(lambda t: 1.0 / at(gamma)(t)),
                     optax.trace(decay=beta),
                     optax.scale_by_learning_rate(lambda t: at(alpha)(t) * at(gamma)(t)))


@pytest.mark.parametrize("alpha", [1.0, DECAY])
def test_slowmo_with_a_gamma_schedule_divides_each_delta_by_its_rounds_gamma(alpha):
  beta = 0.9
  _assert_same_trajectory(ol.slowmo(alpha, beta, STEP_DOWN),
                          _slowmo_as_optax(alpha, beta, STEP_DOWN), 2e-5)
  # ... which is not the folded form optax.sgd(alpha, beta) once gamma has changed (round 2 on).
  last = list(_trajectories(ol.slowmo(alpha, beta, STEP_DOWN), optax.sgd(alpha, momentum=beta)))
  assert not np.allclose(last[-1][1]["w"], last[-1][2]["w"], rtol=1e-2)


# Each federated server is an Optax optimizer on the mean delta; these pin the defaults to
# Reddi et al. (2020): betas (0.9, 0.99) and eps 1e-3, which the calls below leave implicit.
@pytest.mark.parametrize("ours, theirs", [
    (baselines.fedadam(0.01), optax.adam(0.01, b1=0.9, b2=0.99, eps=1e-3)),
    (baselines.fedyogi(0.01), optax.yogi(0.01, b1=0.9, b2=0.99, eps=1e-3)),
    (baselines.fedadagrad(0.1), optax.adagrad(0.1, eps=1e-3)),
])
def test_federated_optimizers_use_reddi_et_al_defaults(ours, theirs):
  p = {"w": jnp.ones((3, 2))}
  sa, sb = ours.init(p), theirs.init(p)
  for i in range(3):
    d = {"w": jnp.full((3, 2), 0.1 * (i + 1))}
    ua, sa = ours.update(d, sa, p)
    ub, sb = theirs.update(d, sb, p)
    np.testing.assert_allclose(ua["w"], ub["w"])
  assert float(ua["w"][0, 0]) < 0  # a positive delta (old > new) moves the weights down


def test_worker_sgd_clips_then_decays_then_steps():
  tx = baselines.worker_sgd(0.5, clip_norm=1.0, weight_decay=0.1)
  p = {"w": jnp.full((4,), 2.0)}
  g = {"w": jnp.full((4,), 10.0)}
  u, _ = tx.update(g, tx.init(p), p)
  clipped = 10.0 / np.linalg.norm(np.full(4, 10.0))  # each entry after clip to norm 1
  np.testing.assert_allclose(u["w"], -0.5 * (clipped + 0.1 * 2.0), rtol=1e-6)
