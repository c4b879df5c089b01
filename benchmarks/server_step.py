"""Server-step cost of each transform against optax.adam on a ResNet-50-shaped parameter tree.

Measures, in one process and interleaved round-robin so machine noise hits all alike:
  * the median time of one jitted ``update`` (state donated, as in a training loop);
  * optimizer-state bytes per parameter;
  * XLA's memory analysis of each compiled update (arguments, outputs, temporaries);
  * the learned steps blocked (the default) and unblocked (``leaf_step=reference_leaf_step``,
    the whole feature matrix at once), and with ``block_size=65536`` (every tensor above 65,536
    parameters in blocks);
  * "bare MLP": only the MLP's matmuls (28 -> 32 -> 32 -> 2) over as many rows as parameters,
    in blocks of 65,536 rows, the floor of the learned step without its features;
  * the learned steps and the bare MLP with ``mlp_dtype="bfloat16"`` (bfloat16 matmul operands,
    float32 accumulation; the ``_bf16`` rows);
and reports each time as a ratio to Adam's step measured in the same run.

  * on a GPU, the learned steps with the fused Pallas kernel
    (``leaf_step=pallas.pallas_leaf_step``, ``transforms/learned/pallas.py``); on a CPU Pallas
    only interprets, far too slowly for 25M parameters, so those cases run only if named.

Usage:
  python benchmarks/server_step.py [--reps 7] [--scale 1.0] [--out benchmarks/results]
  python benchmarks/server_step.py --cases adam,lopt_a,lopt_a_pallas,lagg_a_k8,lagg_a_k8_pallas \
      --reps 20 --out $OUT     # the GPU check (a few minutes on an H100/H200)

``--scale`` shrinks every channel count (0.25 gives a ~1.6M-parameter tree for a quick check).
Writes ``server_step.json`` and ``server_step.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

import _results  # benchmarks/_results.py, next to this script
import optax_localsgd as ol
from optax_localsgd.transforms.learned import pallas
from optax_localsgd.transforms.learned.mlp import mlp_apply, reference_leaf_step

K = 8


def resnet50_shapes(scale: float = 1.0) -> dict[str, tuple[int, ...]]:
  """Parameter shapes of ResNet-50 (HWIO convs, BatchNorm scale/bias, 1000-way classifier).

  At ``scale=1`` this is the torchvision/Keras ResNet-50: 25,557,032 parameters.
  """
  c = lambda n: max(1, int(round(n * scale)))
  shapes = {}

  def conv_bn(name, kh, cin, cout):
    shapes[f"{name}/kernel"] = (kh, kh, cin, cout)
    shapes[f"{name}/bn_scale"] = (cout,)
    shapes[f"{name}/bn_bias"] = (cout,)

  conv_bn("stem", 7, 3, c(64))
  cin = c(64)
  for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512))):
    w, cout = c(width), c(width * 4)
    for b in range(blocks):
      name = f"stage{stage}/block{b}"
      conv_bn(f"{name}/conv1", 1, cin, w)
      conv_bn(f"{name}/conv2", 3, w, w)
      conv_bn(f"{name}/conv3", 1, w, cout)
      if b == 0:
        conv_bn(f"{name}/proj", 1, cin, cout)
      cin = cout
  shapes["fc/kernel"] = (cin, 1000)
  shapes["fc/bias"] = (1000,)
  return shapes


def _tree_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def bare_mlp(meta, n: int, block: int = 2**16, mlp_dtype: str = "float32"):
  """A function of a (block, 28) feature block running the MLP over ``n`` rows, block by block."""
  tf = jnp.zeros(11, jnp.float32)

  def fn(x):
    def body(i, acc):
      # + i: no loop-invariant hoisting
      d, m = mlp_apply(meta.mlp, x + i.astype(x.dtype), tf, mlp_dtype)
      return acc + jnp.sum(d * jnp.exp(1e-3 * m))
    return lax.fori_loop(0, -(-n // block), body, jnp.zeros((), jnp.float32))
  return fn


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--reps", type=int, default=7, help="timed calls per transform")
  ap.add_argument("--scale", type=float, default=1.0, help="channel-count multiplier")
  ap.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
  ap.add_argument("--skip-unblocked", action="store_true",
                  help="leave out the unblocked learned steps (5-10 GB of temporaries at scale 1)")
  ap.add_argument("--cases", default=None,
                  help="comma-separated cases to run (default: all; the *_pallas ones only on "
                  "a GPU or TPU, where Pallas compiles)")
  args = ap.parse_args(argv)

  shapes = resnet50_shapes(args.scale)
  rng = np.random.default_rng(0)
  params = {k: jnp.asarray(rng.normal(scale=0.05, size=s), jnp.float32)
            for k, s in shapes.items()}
  n_params = sum(int(np.prod(s)) for s in shapes.values())
  delta = jax.tree.map(lambda p: 1e-3 * jnp.sign(p), params)
  stack = jax.tree.map(lambda d: jnp.broadcast_to(d, (K,) + d.shape) * jnp.arange(
      1, K + 1, dtype=d.dtype).reshape((K,) + (1,) * d.ndim) / K, delta)
  key = jax.random.PRNGKey(0)
  lopt, lagg = ol.init_lopt_a(key), ol.init_lagg_a(key, K)
  cases = {
      "adam": (optax.adam(1e-3), delta),
      "local_sgd": (ol.local_sgd(1.0), delta),
      "slowmo": (ol.slowmo(1.0, 0.95, 0.1), delta),
      "lopt_a": (ol.lopt_a(lopt), delta),
      "lopt_a_block65536": (ol.lopt_a(lopt, block_size=2**16), delta),
      "lopt_a_unblocked": (ol.lopt_a(lopt, leaf_step=reference_leaf_step), delta),
      "lopt_a_bf16": (ol.lopt_a(lopt, mlp_dtype="bfloat16"), delta),
      f"lagg_a_k{K}": (ol.lagg_a(lagg, K), stack),
      f"lagg_a_k{K}_block65536": (ol.lagg_a(lagg, K, block_size=2**16), stack),
      f"lagg_a_k{K}_unblocked": (ol.lagg_a(lagg, K, leaf_step=reference_leaf_step), stack),
      f"lagg_a_k{K}_bf16": (ol.lagg_a(lagg, K, mlp_dtype="bfloat16"), stack),
      "lopt_a_pallas": (ol.lopt_a(lopt, leaf_step=pallas.pallas_leaf_step), delta),
      f"lagg_a_k{K}_pallas": (ol.lagg_a(lagg, K, leaf_step=pallas.pallas_leaf_step), stack),
  }
  if args.cases:
    unknown = set(args.cases.split(",")) - set(cases)
    if unknown:
      raise SystemExit(f"unknown cases {sorted(unknown)}; choose from {sorted(cases)}")
    cases = {k: v for k, v in cases.items() if k in args.cases.split(",")}
  elif jax.default_backend() not in ("gpu", "tpu"):
    cases = {k: v for k, v in cases.items() if not k.endswith("pallas")}
  if args.skip_unblocked:
    cases = {k: v for k, v in cases.items() if not k.endswith("unblocked")}

  compiled, states, result = {}, {}, {"transforms": {}}
  # The bare MLP is timed like a transform; its "state" is its input block.
  mlp_x = jnp.asarray(rng.normal(size=(2**16, 28)), jnp.float32)
  bare = ("bare_mlp", "float32"), ("bare_mlp_bf16", "bfloat16")
  for name, dtype in bare:
    compiled[name] = jax.jit(bare_mlp(lopt, n_params, mlp_dtype=dtype)).lower(mlp_x).compile()
    states[name] = mlp_x
    result["transforms"][name] = {"state_bytes_per_param": 0.0}
  for name, (tx, d) in cases.items():
    state = tx.init(params)
    fn = jax.jit(tx.update, donate_argnums=(1,))
    t0 = time.perf_counter()
    lowered = fn.lower(d, state, params)
    compiled[name] = lowered.compile()
    compile_s = time.perf_counter() - t0
    out, states[name] = compiled[name](d, state, params)  # warm-up call
    jax.block_until_ready(out)
    entry = {"compile_s": compile_s,
             "state_bytes_per_param": _tree_bytes(states[name]) / n_params}
    mem = compiled[name].memory_analysis()
    if mem is not None:
      entry["xla_memory_bytes"] = {
          "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
          "temporaries": mem.temp_size_in_bytes, "aliased": mem.alias_size_in_bytes}
    result["transforms"][name] = entry
    print(f"compiled {name} in {compile_s:.1f}s", file=sys.stderr)

  times = {name: [] for name in [*cases, *(b for b, _ in bare)]}
  for rep in range(args.reps):
    for name, (tx, d) in cases.items():
      t0 = time.perf_counter()
      out, states[name] = compiled[name](d, states[name], params)
      jax.block_until_ready((out, states[name]))
      times[name].append(time.perf_counter() - t0)
    for name, _ in bare:
      t0 = time.perf_counter()
      jax.block_until_ready(compiled[name](states[name]))
      times[name].append(time.perf_counter() - t0)
    print(f"rep {rep + 1}/{args.reps}", file=sys.stderr)

  adam_s = statistics.median(times["adam"])
  for name, ts in times.items():
    med = statistics.median(ts)
    result["transforms"][name].update(
        median_step_s=med, min_step_s=min(ts), step_over_adam=med / adam_s)

  lopt_mem = result["transforms"]["lopt_a"].get("xla_memory_bytes")
  result.update(
      n_params=n_params, n_tensors=len(shapes), reps=args.reps, scale=args.scale, k=K,
      device=str(jax.devices()[0].device_kind), platform=jax.default_backend(),
      cpu_count=os.cpu_count(), jax=jax.__version__, optax=optax.__version__,
      python=platform.python_version(), date=datetime.datetime.now().isoformat(timespec="seconds"),
      command=" ".join(["python benchmarks/server_step.py", *(argv or sys.argv[1:])]))
  if lopt_mem:
    # Peak device memory of one donated update: inputs + outputs + temporaries - donated aliases.
    result["lopt_a_peak_bytes"] = (lopt_mem["arguments"] + lopt_mem["outputs"]
                                   + lopt_mem["temporaries"] - lopt_mem["aliased"])

  _results.write(args.out, "server_step", result, to_markdown(result))
  print(to_markdown(result))
  return result


def to_markdown(r: dict) -> str:
  lines = [
      f"# Server step on a ResNet-50-shaped tree ({r['n_params']:,} parameters, "
      f"{r['n_tensors']} tensors)", "",
      f"`{r['command']}` on {r['platform']} ({r['device']}, {r['cpu_count']} cores), "
      f"jax {r['jax']}, optax {r['optax']}, {r['date']}; median of {r['reps']} interleaved calls.",
      "", "| transform | step (ms) | step / Adam step | state bytes / param "
      "| XLA temporaries (MiB) | temporaries / param bytes |",
      "| --- | ---: | ---: | ---: | ---: | ---: |"]
  for name, e in r["transforms"].items():
    temp = e.get("xla_memory_bytes", {}).get("temporaries")
    temp_cols = ("n/a | n/a" if temp is None else
                 f"{temp / 2**20:.0f} | {temp / (4 * r['n_params']):.2f}")
    lines.append(f"| {name} | {1e3 * e['median_step_s']:.1f} | {e['step_over_adam']:.2f} | "
                 f"{e['state_bytes_per_param']:.2f} | {temp_cols} |")
  if "lopt_a_peak_bytes" in r:
    m = r["transforms"]["lopt_a"]["xla_memory_bytes"]
    lines += ["", f"Peak memory of one lopt_a update (XLA memory analysis): "
              f"{r['lopt_a_peak_bytes'] / 2**20:.0f} MiB = arguments {m['arguments'] / 2**20:.0f} "
              f"+ outputs {m['outputs'] / 2**20:.0f} + temporaries {m['temporaries'] / 2**20:.0f} "
              f"- donated {m['aliased'] / 2**20:.0f} MiB "
              f"({r['lopt_a_peak_bytes'] / r['n_params']:.1f} bytes per parameter)."]
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
