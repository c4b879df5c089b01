"""The federated round (issue 16): client sampling, per-client epochs, mesh == vmap, errors."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_localsgd as ol
from optax_localsgd import baselines, engine
from optax_localsgd.engine import federated
from conftest import cpu_devices_env

SCRIPT = pathlib.Path(__file__).with_name("federated_script.py")


def _toy(n_clients=6, sizes=None):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(120, 3)).astype(np.float32)
  y = x @ np.array([1.0, -2.0, 0.5], np.float32)
  sizes = sizes or [20] * n_clients
  cuts = np.cumsum(sizes)[:-1]
  parts = np.split(rng.permutation(sum(sizes)), cuts)
  loss = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
  return engine.client_data({"x": x, "y": y}, parts), {"w": jnp.zeros(3)}, loss


def test_the_key_samples_k_distinct_clients_uniformly():
  n, k = 10, 3
  cdata, params, loss = _toy(n)
  cfg = engine.FederatedConfig(n, k, batch_size=4, local_steps=1)
  server = ol.local_sgd()
  fn = jax.jit(engine.make_federated_round_fn(loss, engine.classification_batch,
                                              optax.sgd(0.1), server, cfg))
  state = engine.init_federated_state(server, cfg, params)
  draws = np.stack([np.asarray(fn(params, state, jax.random.PRNGKey(r), cdata)[2]["clients"])
                    for r in range(600)])
  assert all(len(set(d)) == k for d in draws)  # without replacement
  assert draws.min() >= 0 and draws.max() < n
  counts = np.bincount(draws.ravel(), minlength=n)
  # 1800 draws over 10 clients: 180 each; a binomial sd of about 11, so 180 +- 45 is 4 sd.
  assert np.all(np.abs(counts - 180) < 45), counts
  # The key decides: the same key, the same clients; 600 keys gave many different sets.
  again = fn(params, state, jax.random.PRNGKey(7), cdata)[2]["clients"]
  np.testing.assert_array_equal(again, draws[7])
  assert len({tuple(sorted(d)) for d in draws}) > 100


def test_epochs_cover_a_client_once_each():
  shard = jnp.asarray(np.r_[np.arange(100, 107), [100] * 5], jnp.int32)  # 7 real, 5 padding
  idx = np.asarray(federated._epoch_indices(jax.random.PRNGKey(0), shard, jnp.int32(7), 20))
  assert sorted(idx[:7]) == sorted(idx[7:14]) == list(range(100, 107))
  assert len(set(idx[14:])) == 6 and set(idx[14:]) <= set(range(100, 107))
  assert not np.array_equal(idx[:7], idx[7:14])  # a fresh order every epoch


def test_per_client_steps_follow_the_epochs():
  cfg = engine.federated_config([5, 20, 41, 150], 2, batch_size=20, local_epochs=1.0)
  assert cfg.local_steps == 8
  np.testing.assert_array_equal(cfg.steps(np.array([5, 20, 41, 150])), [1, 1, 3, 8])
  fixed = engine.FederatedConfig(4, 2, 20, local_steps=3)
  np.testing.assert_array_equal(fixed.steps(np.array([5, 150])), [3, 3])


def test_small_clients_train_and_match_a_plain_loop():
  """A round over clients of 1, 3 and 30 examples equals the hand-written loop: masked steps
  change nothing, each client stops after its own ceil(E n / B) steps."""
  cdata, params, loss = _toy(sizes=[1, 3, 30])
  params = {"w": jnp.array([0.3, 0.1, -0.2])}
  cfg = engine.federated_config(cdata.sizes, 3, batch_size=4, local_epochs=1.0)
  server = ol.local_sgd()
  fn = engine.make_federated_round_fn(loss, engine.classification_batch, optax.sgd(0.1),
                                      server, cfg)
  key = jax.random.PRNGKey(5)
  new, _, m = fn(params, engine.init_federated_state(server, cfg, params), key, cdata)
  ids = np.asarray(m["clients"])
  keys = jax.random.split(jax.random.split(key)[1], 3)
  deltas = []
  arrays = jax.tree.map(jnp.asarray, cdata.arrays)
  for slot, i in enumerate(ids):
    size = int(cdata.sizes[i])
    h = max(1, int(np.ceil(size / 4)))
    idx = federated._epoch_indices(keys[slot], jnp.asarray(cdata.shards[i]), jnp.int32(size),
                                   cfg.local_steps * 4).reshape(cfg.local_steps, 4)
    p = params
    for s in range(h):
      g = jax.grad(loss)(p, engine.classification_batch(arrays, idx[s]))
      p = jax.tree.map(lambda w, gg: w - 0.1 * gg, p, g)
    deltas.append(params["w"] - p["w"])
  np.testing.assert_allclose(new["w"], params["w"] - np.mean(deltas, axis=0), rtol=1e-5,
                             atol=1e-7)


@pytest.fixture(scope="module")
def placements(tmp_path_factory):
  out = tmp_path_factory.mktemp("federated") / "r.npz"
  env = cpu_devices_env(8)
  p = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], env=env,
                     capture_output=True, text=True, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  return np.load(out)


@pytest.mark.parametrize("method", ["fedavg", "lagg_a", "scaffold"])
def test_mesh_matches_vmap(placements, method):
  r = placements
  assert r["n_devices"] == 8
  v, m = f"{method}/vmap", f"{method}/mesh"
  np.testing.assert_array_equal(r[f"{v}/clients"], r[f"{m}/clients"])
  np.testing.assert_allclose(r[f"{v}/losses"], r[f"{m}/losses"], rtol=1e-5)
  for k in ("w1", "b1", "w2", "b2"):
    np.testing.assert_allclose(r[f"{v}/{k}"], r[f"{m}/{k}"], rtol=1e-4, atol=1e-6)
  names = [n for n in r.files if n.startswith(f"{v}/client_state")]
  assert bool(names) == (method == "scaffold")
  for n in names:
    np.testing.assert_allclose(r[n], r[n.replace("/vmap/", "/mesh/")], rtol=1e-4, atol=1e-6)
  # Something trained: the loss fell (LAgg-A's untrained random init only has to move).
  if method == "lagg_a":
    assert not np.allclose(r[f"{v}/w1"], r["fedavg/vmap/w1"])
  else:
    assert r[f"{v}/losses"][-1] < r[f"{v}/losses"][0]


def test_input_errors():
  cdata, params, loss = _toy(4)
  with pytest.raises(ValueError, match="without replacement"):
    engine.FederatedConfig(4, 5, 4, 1)
  with pytest.raises(ValueError, match="local_epochs"):
    engine.FederatedConfig(4, 2, 4, 1, local_epochs=0.0)
  with pytest.raises(ValueError, match="hold no example"):
    engine.client_data(cdata.arrays, [np.arange(3), np.array([], np.int64)])
  cfg = engine.FederatedConfig(4, 2, 4, 1)
  server = ol.local_sgd()
  fn = engine.make_federated_round_fn(loss, engine.classification_batch, optax.sgd(0.1),
                                      server, cfg)
  with pytest.raises(ValueError, match="FederatedState"):
    fn(params, server.init(params), jax.random.PRNGKey(0), cdata)
  state = engine.init_federated_state(server, cfg, params)
  with pytest.raises(ValueError, match="5 clients"):
    fn(params, state, jax.random.PRNGKey(0), engine.client_data(cdata.arrays,
                                                                [np.arange(2)] * 5))
  hooked = engine.make_federated_round_fn(loss, engine.classification_batch, optax.sgd(0.1),
                                          server, cfg, client_hook=baselines.scaffold(0.1)[1])
  with pytest.raises(ValueError, match="client_hook"):
    hooked(params, state, jax.random.PRNGKey(0), cdata)
