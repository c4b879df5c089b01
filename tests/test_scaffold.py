"""SCAFFOLD (Karimireddy et al. 2020, option II) in the federated round equals a NumPy
reference of its update; the hook's pieces do what the paper's Algorithm 1 says."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from optax_localsgd import baselines, engine
from optax_localsgd.engine import federated
from optax_localsgd.transforms import ScaffoldClient

N, K, B, LR, LR_G, ROUNDS = 5, 3, 4, 0.05, 0.7, 3
SIZES = [6, 9, 12, 4, 10]


def _problem():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(sum(SIZES), 3))
  # Each client has its own optimum, so the client drift SCAFFOLD corrects is real.
  owner = np.repeat(np.arange(N), SIZES)
  y = np.einsum("nd,nd->n", x, rng.normal(size=(N, 3))[owner]) + 0.1 * rng.normal(size=len(x))
  parts = np.split(np.arange(len(x)), np.cumsum(SIZES)[:-1])
  arrays = {"x": x.astype(np.float32), "y": y.astype(np.float32)}
  return engine.client_data(arrays, parts), x, y


def _loss(p, b):
  return jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)


def _reference(cdata, x, y, cfg, keys):
  """SCAFFOLD in float64 NumPy; only the client ids and minibatch indices come from the
  engine's documented key scheme (split(key) -> (sampling, clients))."""
  w = np.zeros(3)
  c = np.zeros(3)
  ci = np.zeros((N, 3))
  for key in keys:
    k_sample, k_clients = jax.random.split(key)
    ids = np.asarray(jax.random.choice(k_sample, N, (K,), replace=False))
    slot_keys = jax.random.split(k_clients, K)
    deltas, new_ci = [], {}
    for slot, i in enumerate(ids):
      n_i = SIZES[i]
      h_i = int(np.ceil(n_i / B))
      idx = np.asarray(federated._epoch_indices(
          slot_keys[slot], jnp.asarray(cdata.shards[i]), jnp.int32(n_i),
          cfg.local_steps * B)).reshape(cfg.local_steps, B)
      yi = w.copy()
      for s in range(h_i):
        xb, yb = x[idx[s]], y[idx[s]]
        g = 2.0 / B * xb.T @ (xb @ yi - yb)
        yi = yi - LR * (g - ci[i] + c)
      new_ci[i] = ci[i] - c + (w - yi) / (h_i * LR)
      deltas.append(w - yi)
    w = w - LR_G * np.mean(deltas, axis=0)
    c = c + sum(new_ci[i] - ci[i] for i in ids) / N
    for i in ids:
      ci[i] = new_ci[i]
  return w, c, ci


def test_scaffold_round_equals_numpy_reference():
  cdata, x, y = _problem()
  cfg = engine.federated_config(cdata.sizes, K, B, local_epochs=1.0)
  assert cfg.local_steps == 3
  server, hook = baselines.scaffold(LR, LR_G)
  fn = jax.jit(engine.make_federated_round_fn(_loss, engine.classification_batch,
                                              optax.sgd(LR), server, cfg, client_hook=hook))
  params = {"w": jnp.zeros(3)}
  state = engine.init_federated_state(server, cfg, params, hook)
  keys = [jax.random.PRNGKey(10 + r) for r in range(ROUNDS)]
  for key in keys:
    params, state, _ = fn(params, state, key, cdata)
  w, c, ci = _reference(cdata, x, y, cfg, keys)
  np.testing.assert_allclose(params["w"], w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(state.hook["w"], c, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state.clients["w"], ci, rtol=1e-4, atol=1e-5)
  # The control variates are in play: c is far from its initial 0 ...
  assert np.abs(c).max() > 0.1
  # ... and they change the result against FedAvg on the same draws.
  fedavg = jax.jit(engine.make_federated_round_fn(_loss, engine.classification_batch,
                                                  optax.sgd(LR), server, cfg))
  p2, s2 = {"w": jnp.zeros(3)}, engine.init_federated_state(server, cfg, {"w": jnp.zeros(3)})
  for key in keys:
    p2, s2, _ = fedavg(p2, s2, key, cdata)
  assert np.abs(np.asarray(p2["w"]) - w).max() > 1e-3


def test_hook_pieces():
  hook = ScaffoldClient(0.5)
  params = {"a": jnp.ones(2), "b": jnp.ones((2, 3))}
  clients, c = hook.init(params, 4)
  assert clients["b"].shape == (4, 2, 3) and float(jnp.abs(c["a"]).sum()) == 0
  ci = {"a": jnp.array([1.0, 2.0]), "b": jnp.zeros((2, 3))}
  c = {"a": jnp.array([0.5, 0.5]), "b": jnp.ones((2, 3))}
  np.testing.assert_allclose(hook.correction(ci, c)["a"], [-0.5, -1.5])
  delta = {"a": jnp.array([2.0, 4.0]), "b": jnp.zeros((2, 3))}
  new = hook.client_update(ci, c, delta, jnp.int32(2))
  np.testing.assert_allclose(new["a"], [1.0 - 0.5 + 2.0, 2.0 - 0.5 + 4.0])  # / (2 * 0.5)
  old_k = jax.tree.map(lambda v: v[None], ci)
  new_k = jax.tree.map(lambda v: v[None], new)
  np.testing.assert_allclose(hook.server_update(c, old_k, new_k, 4)["a"],
                             [0.5 + 1.5 / 4, 0.5 + 3.5 / 4])


def test_bad_learning_rate():
  with pytest.raises(ValueError, match="local_learning_rate"):
    ScaffoldClient(0.0)
