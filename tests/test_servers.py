"""Server registry and the baselines as Optax compositions."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

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
  m <- mu m + Delta; w <- w - lr (Delta + mu m). Returns the weights after each step."""
  m, w, out = np.zeros_like(w0), w0.copy(), []
  for d in deltas:
    m = mu * m + d
    w = w - lr * (d + mu * m)
    out.append(w)
  return out


@pytest.mark.parametrize("make, lr, mu", [
    (baselines.diloco, 0.7, 0.9),  # the defaults: DiLoCo's (Douillard et al., 2023)
    (lambda: baselines.diloco(0.3, 0.5), 0.3, 0.5),
])
def test_diloco_is_nesterov_outer_sgd(make, lr, mu):
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(3, 2)).astype(np.float32)
  deltas = [rng.normal(size=(3, 2)).astype(np.float32) for _ in range(4)]  # W_old - W_new
  tx = make()
  params = {"w": jnp.asarray(w0)}
  state = tx.init(params)
  for d, want in zip(deltas, _nesterov_outer_sgd(deltas, w0, lr, mu)):
    updates, state = tx.update({"w": jnp.asarray(d)}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(params["w"], want, rtol=1e-5, atol=1e-6)


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
