"""Runs a few local-SGD rounds on synthetic data and saves the result (for test_engine.py).

Run in a subprocess because the number of CPU devices and jax.distributed must be fixed before
JAX starts:
  python tests/engine_script.py --out r.npz
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/engine_script.py --mesh ...
  python tests/engine_script.py --mesh --num-processes 2 --process-id 0 --port 12345 ...
"""

import argparse

import numpy as np

K, H, B, ROUNDS = 8, 2, 16, 4


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--servers", default="local_sgd,slowmo,lopt_a,lagg_a")
  ap.add_argument("--mesh", action="store_true", help="spread workers over all devices")
  ap.add_argument("--num-processes", type=int, default=1)
  ap.add_argument("--process-id", type=int, default=0)
  ap.add_argument("--local-devices", type=int, default=None)
  ap.add_argument("--port", type=int, default=0)
  ap.add_argument("--compress", default=None, help="a compression spec for every worker")
  ap.add_argument("--shard-server", action="store_true",
                  help="with --mesh: the ZeRO-1 server step (engine/zero.py)")
  ap.add_argument("--out", required=True)
  args = ap.parse_args()

  import jax
  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id,
                               local_device_ids=list(range(args.local_devices)))
  import jax.numpy as jnp
  import optax
  import optax_localsgd as ol
  from optax_localsgd import compression, engine

  rng = np.random.default_rng(0)
  x = rng.normal(size=(512, 6)).astype(np.float32)
  y = (x @ rng.normal(size=(6, 3))).argmax(1).astype(np.int32)
  shards = np.arange(512, dtype=np.int32).reshape(K, -1)
  params = {"w1": jnp.asarray(rng.normal(size=(6, 16)) * 0.4, jnp.float32),
            "b1": jnp.zeros(16), "w2": jnp.asarray(rng.normal(size=(16, 3)) * 0.3, jnp.float32),
            "b2": jnp.zeros(3)}

  def loss(p, batch):
    h = jax.nn.relu(batch["x"] @ p["w1"] + p["b1"])
    logits = h @ p["w2"] + p["b2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  key = jax.random.PRNGKey(1)
  servers = {
      "local_sgd": (ol.local_sgd(1.0), False),
      "slowmo": (ol.slowmo(1.0, 0.9, 0.1), False),
      "lopt_a": (ol.lopt_a(ol.init_lopt_a(key)), False),
      "lagg_a": (ol.lagg_a(ol.init_lagg_a(key, K), K), True),
      # DiLoCo's outer step and Adam: elementwise, like local_sgd and slowmo.
      "diloco": (optax.sgd(0.7, momentum=0.9, nesterov=True), False),
      "adam": (optax.chain(optax.scale_by_adam(), optax.scale(-0.05)), False),
      # Meta-trained weights take real steps (a fresh init's are tiny).
      "lopt_a_trained": (ol.lopt_a(ol.pretrained.load("lopt_a/fmnist_mlp_k8_h4")), False),
      "lagg_a_trained": (ol.lagg_a(ol.pretrained.load("lagg_a/fmnist_mlp_k8_h4"), K), True),
  }
  mesh = engine.worker_mesh() if args.mesh else None
  data = engine.DeviceData({"x": x, "y": y}, shards)
  if mesh is not None:
    data = engine.replicate(data, mesh)
  results = {"n_devices": len(jax.devices())}

  def fetch(x):  # a sharded array spans other processes' devices under jax.distributed
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  for name in args.servers.split(","):
    server, per_worker = servers[name]
    cfg = engine.RoundConfig(K, H, B, per_worker_deltas=per_worker,
                             compression=compression.from_spec(args.compress))
    if args.shard_server:
      p = engine.replicate(params, mesh)
      state = engine.init_round_state(server, cfg, p, mesh, shard_server=True)
    else:
      p, state = params, engine.init_round_state(server, cfg, params)
      if mesh is not None:
        p, state = engine.replicate((p, state), mesh)
    round_fn = jax.jit(engine.make_round_fn(loss, engine.classification_batch,
                                            optax.sgd(0.3), server, cfg, mesh,
                                            shard_server=args.shard_server))
    losses = []
    for r in range(ROUNDS):
      p, state, m = round_fn(p, state, jax.random.fold_in(key, r), data)
      losses.append(float(m["train_loss"]))
    results[f"{name}/losses"] = np.asarray(losses)
    results.update({f"{name}/{k}": np.asarray(jax.device_get(v)) for k, v in p.items()})
    results[f"{name}/bits"] = float(m["bits"])
    if args.shard_server:  # each device's server state, gathered: (8, slice) per leaf
      sstate = state.server if args.compress else state
      for i, leaf in enumerate(jax.tree.leaves(sstate.per_device)):
        results[f"{name}/server{i}"] = fetch(leaf)
    if args.compress:  # the workers' compressor states, gathered from their devices
      for i, leaf in enumerate(jax.tree.leaves(state.workers)):
        results[f"{name}/workers{i}"] = fetch(leaf)
  if args.process_id == 0:
    np.savez(args.out, **results)


if __name__ == "__main__":
  main()
