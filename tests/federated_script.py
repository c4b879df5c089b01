"""Federated rounds vmapped on one device and spread over a mesh (for test_federated.py).

Run in a subprocess because the number of CPU devices must be fixed before JAX starts:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/federated_script.py --out r.npz
"""

import argparse

import numpy as np

N, K, B, ROUNDS = 24, 8, 8, 3


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  import optax
  import optax_localsgd as ol
  from optax_localsgd import baselines, data, engine

  rng = np.random.default_rng(0)
  x = rng.normal(size=(480, 6)).astype(np.float32)
  y = (x @ rng.normal(size=(6, 3))).argmax(1).astype(np.int32)
  parts = data.dirichlet_partition(y, N, alpha=0.5, seed=0, min_size=2)
  cdata = engine.client_data({"x": x, "y": y}, parts)
  params = {"w1": jnp.asarray(rng.normal(size=(6, 16)) * 0.4, jnp.float32),
            "b1": jnp.zeros(16), "w2": jnp.asarray(rng.normal(size=(16, 3)) * 0.3, jnp.float32),
            "b2": jnp.zeros(3)}

  def loss(p, batch):
    h = jax.nn.relu(batch["x"] @ p["w1"] + p["b1"])
    return optax.softmax_cross_entropy_with_integer_labels(h @ p["w2"] + p["b2"],
                                                           batch["y"]).mean()

  key = jax.random.PRNGKey(1)
  sc_server, sc_hook = baselines.scaffold(0.2, 1.0)
  methods = {
      "fedavg": (ol.local_sgd(1.0), None, False),
      "lagg_a": (ol.lagg_a(ol.init_lagg_a(key, K), K), None, True),
      "scaffold": (sc_server, sc_hook, False),
  }
  mesh = engine.worker_mesh()
  out = {"n_devices": np.int32(len(jax.devices()))}
  for name, (server, hook, per_worker) in methods.items():
    cfg = engine.federated_config(cdata.sizes, K, B, local_epochs=1.0,
                                  per_worker_deltas=per_worker)
    for placement, m in (("vmap", None), ("mesh", mesh)):
      fn = jax.jit(engine.make_federated_round_fn(loss, engine.classification_batch,
                                                  optax.sgd(0.2), server, cfg, m, hook))
      p, s = params, engine.init_federated_state(server, cfg, params, hook)
      d = cdata if m is None else engine.replicate(cdata, m)
      losses, ids = [], []
      for r in range(ROUNDS):
        p, s, met = fn(p, s, jax.random.fold_in(key, r), d)
        losses.append(met["train_loss"])
        ids.append(met["clients"])
      out[f"{name}/{placement}/losses"] = np.asarray(losses)
      out[f"{name}/{placement}/clients"] = np.asarray(ids)
      for kk, v in p.items():
        out[f"{name}/{placement}/{kk}"] = np.asarray(v)
      for i, leaf in enumerate(jax.tree.leaves(s.clients)):
        out[f"{name}/{placement}/client_state{i}"] = np.asarray(leaf)
  np.savez(args.out, **out)


if __name__ == "__main__":
  main()
