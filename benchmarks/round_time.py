"""Communication-round time of the Fashion-MNIST MLP (K=8, H=4, B=128), 1 device vs N devices.

For local SGD, SlowMo, DiLoCo, LOpt-A and LAgg-A a third placement shards the server step over the N
devices (``shard_server=True``, ZeRO-1; ``engine/zero.py``).

Both placements run in one process on the same data, interleaved call by call, and each is
timed as a jitted ``lax.scan`` of ``--rounds-per-call`` rounds (so dispatch is amortised as in
training). On a CPU host the N devices are XLA's virtual host devices
(``--xla_force_host_platform_device_count``), which this script sets before JAX starts.

Usage:
  python benchmarks/round_time.py [--devices 8] [--servers local_sgd,lopt_a,lagg_a] [--reps 5]
Writes ``round_time.json`` and ``round_time.md`` under ``--out`` (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics
import sys
import time

import _results  # benchmarks/_results.py, next to this script


# Servers with a sharded step (engine/zero.py): the elementwise ones and the learned ones.
SHARDABLE = ("local_sgd", "slowmo", "diloco", "lopt_a", "lagg_a")


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--servers", default="local_sgd,slowmo,lopt_a,lagg_a")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--rounds-per-call", type=int, default=10)
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  args = ap.parse_args(argv)
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={args.devices}")
  # Spare threads in XLA's CPU pool, so a collective cannot wait for one (docs/distributed.md).
  os.environ.setdefault("NPROC", str(4 * args.devices))

  import jax
  import jax.numpy as jnp
  from optax_localsgd import baselines, data, engine, tasks
  from optax_localsgd.harness import servers

  if len(jax.devices()) < args.devices:
    raise SystemExit(f"need {args.devices} devices, JAX sees {len(jax.devices())}")
  K, H, B = 8, 4, 128
  task = tasks.get_task("fmnist_mlp")
  ds = data.load_fashion_mnist("train")
  arrays = {"x": ds.x, "y": ds.y}
  shards = data.split_homogeneous(len(ds), K, 0)
  mesh = engine.worker_mesh(jax.devices()[:args.devices])
  params0 = task.init(jax.random.PRNGKey(0))

  many, sharded = f"{args.devices} devices", f"{args.devices} devices, sharded server"
  fns = {}
  for name in args.servers.split(","):
    server = servers.make_server(name, num_workers=K, local_learning_rate=0.3)
    cfg = engine.RoundConfig(K, H, B, per_worker_deltas=server.per_worker_deltas)
    placements = [("1 device", None, False), (many, mesh, False)]
    if name in SHARDABLE:
      placements.append((sharded, mesh, True))
    for placement, m, shard in placements:
      fn = engine.make_round_fn(task.loss, engine.classification_batch,
                                baselines.worker_sgd(0.3), server.tx, cfg, m,
                                shard_server=shard)
      dd = engine.DeviceData(arrays, shards)
      if m is None:
        dd, p, s = jax.device_put((dd, params0, server.tx.init(params0)), jax.devices()[0])
      elif shard:
        dd, p = engine.replicate((dd, params0), m)
        s = engine.init_round_state(server.tx, cfg, p, m, shard_server=True)
      else:
        dd, p, s = engine.replicate((dd, params0, server.tx.init(params0)), m)

      def chunk(p, s, dd=dd, fn=fn):
        def body(c, i):
          p, s, _ = fn(*c, jax.random.fold_in(jax.random.PRNGKey(1), i), dd)
          return (p, s), None
        return jax.lax.scan(body, (p, s), jnp.arange(args.rounds_per_call))[0]

      f = jax.jit(chunk)
      p, s = jax.block_until_ready(f(p, s))  # compile + warm up
      fns[(name, placement)] = [f, p, s]
      print(f"compiled {name} on {placement}", file=sys.stderr)

  times = {k: [] for k in fns}
  for rep in range(args.reps):
    for k, entry in fns.items():
      f, p, s = entry
      t0 = time.perf_counter()
      entry[1], entry[2] = jax.block_until_ready(f(p, s))
      times[k].append((time.perf_counter() - t0) / args.rounds_per_call)
  rows = []
  for name in args.servers.split(","):
    one = statistics.median(times[(name, "1 device")])
    on_many = statistics.median(times[(name, many)])
    row = {"server": name, "round_s_1_device": one, f"round_s_{args.devices}_devices": on_many,
           "ratio_many_over_one": on_many / one}
    if (name, sharded) in times:
      row[f"round_s_{args.devices}_devices_sharded_server"] = statistics.median(
          times[(name, sharded)])
    rows.append(row)
  local = next((r for r in rows if r["server"] == "local_sgd"), None)
  for r in rows:
    if local:
      r["round_over_local_sgd_1_device"] = r["round_s_1_device"] / local["round_s_1_device"]
  result = {"rows": rows, "K": K, "H": H, "B": B, "devices": args.devices, "reps": args.reps,
            "rounds_per_call": args.rounds_per_call, "platform": jax.default_backend(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join(["python benchmarks/round_time.py", *(argv or sys.argv[1:])])}
  md = [f"# Round time, Fashion-MNIST 2-layer MLP, K={K}, H={H}, B={B}", "",
        f"`{result['command']}` on {result['platform']} ({result['cpu_count']} cores), "
        f"jax {result['jax']}, {result['date']}; median of {args.reps} calls of "
        f"{args.rounds_per_call} scanned rounds.", "",
        f"| server | round, 1 device (ms) | round, {args.devices} devices (ms) | "
        f"{args.devices} / 1 | round / local SGD round (1 device) | round, {args.devices} "
        "devices, sharded server (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for r in rows:
    zero1 = r.get(f"round_s_{args.devices}_devices_sharded_server")
    md.append(f"| {r['server']} | {1e3 * r['round_s_1_device']:.1f} | "
              f"{1e3 * r[f'round_s_{args.devices}_devices']:.1f} | "
              f"{r['ratio_many_over_one']:.2f} | {r.get('round_over_local_sgd_1_device', 1):.2f} | "
              f"{'–' if zero1 is None else f'{1e3 * zero1:.1f}'} |")
  _results.write(args.out, "round_time", result, "\n".join(md) + "\n")
  print("\n".join(md))
  return result


if __name__ == "__main__":
  main()
