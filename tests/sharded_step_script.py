"""LOpt-A's sharded server step against the replicated one on odd shapes (test_sharded_step.py).

Run in a subprocess with N virtual CPU devices (fixed before JAX starts):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharded_step_script.py --out r.npz
Three server steps on random deltas for tensors of rank 0 to 4 whose sizes are not multiples
of N (so slices are padded, and some devices hold padding only), with meta-parameters of both
feature sets (and ada-v2 with ``mlp_dtype="bfloat16"``, label ``ada-v2-bf16``); saves both
results and the final states' momenta.
"""

import argparse

import numpy as np

SHAPES = {"scalar": (), "bias": (7,), "dense": (5, 6), "conv": (3, 3, 4, 5), "rank3": (2, 9, 3),
          "wide": (3, 37)}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import optax_localsgd as ol
  from optax_localsgd import engine
  from optax_localsgd.engine import zero

  mesh = engine.worker_mesh()
  n = len(jax.devices())
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
  deltas = [{k: jnp.asarray(0.05 * rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
            for _ in range(3)]
  results = {"n_devices": n}
  results.update({f"params0/{k}": np.asarray(v) for k, v in params.items()})
  for label, fset, mlp_dtype in (("ada-v2", "ada-v2", None), ("ada-v1", "ada-v1", None),
                                 ("ada-v2-bf16", "ada-v2", "bfloat16")):
    meta = ol.init_lopt_a(jax.random.PRNGKey(1), feature_set=fset)
    # Non-zero biases and decay offsets, and a larger output layer: every path matters.
    mlp = {k: v + 0.3 * jax.random.normal(jax.random.PRNGKey(i), v.shape)
           for i, (k, v) in enumerate(meta.mlp.items())}
    meta = type(meta)(mlp=mlp, decay_offsets=0.3 * jnp.arange(7.0) / 7, config=meta.config)
    tx = ol.lopt_a(meta, mlp_dtype=mlp_dtype)

    state, p = tx.init(params), params
    for d in deltas:  # the replicated step
      u, state = jax.jit(tx.update)(d, state, p)
      p = jax.tree.map(lambda a, b: a + b, p, u)
    results.update({f"{label}/replicated/{k}": np.asarray(v) for k, v in p.items()})

    sstate = zero.init_sharded_server_state(tx, params, mesh, engine.WORKER_AXIS)
    update = zero.sharded_update(tx, n, engine.WORKER_AXIS)

    def step(d, per_device, p):
      # Every device holds the whole delta here; the slices are cut as the engine cuts them
      # (scatter_mean of n equal copies divided by n is the delta itself).
      d_slices = zero.scatter_mean(d, n, engine.WORKER_AXIS, n)
      return update(d_slices, per_device, p)

    run = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(engine.WORKER_AXIS), P()),
                                out_specs=(P(engine.WORKER_AXIS), P(engine.WORKER_AXIS))))
    p, per_device = params, sstate.per_device
    for d in deltas:
      u, per_device = run(d, per_device, p)
      p = zero.assemble(u, p, mesh)
    results.update({f"{label}/sharded/{k}": np.asarray(v) for k, v in p.items()})
    acc = per_device.accumulators
    for k, s in SHAPES.items():  # the momenta, gathered from the slices
      m = np.asarray(acc[k].m)  # (n, 3, L)
      full = np.moveaxis(m, 1, 0).reshape(3, -1)[:, :int(np.prod(s))]
      results[f"{label}/sharded_m/{k}"] = full.reshape((3,) + s)
      results[f"{label}/replicated_m/{k}"] = np.asarray(state.accumulators[k].m)
      results[f"{label}/sharded_row/{k}"] = np.asarray(acc[k].row[0])
      results[f"{label}/replicated_row/{k}"] = np.asarray(state.accumulators[k].row)
  np.savez(args.out, **results)


if __name__ == "__main__":
  main()
