"""Train a DeiT-tiny ViT on downsampled ImageNet with local SGD and a learned server optimizer.

K workers each take H SGD steps per communication round from the global weights; the server
(LOpt-A by default, with meta-trained weights) turns their deltas into one update. The data
are the official "Downsampled ImageNet" npz files (Imagenet32 / Imagenet64), or any set in the
same format, such as a 32x32 Tiny ImageNet. The whole training split is held in host and device
memory (uint8 pixels: 3.9 GB for Imagenet32, 15.7 GB for Imagenet64), and minibatches are
drawn on the device. Over several devices (--devices) the workers are spread over them and the
server step is sharded (ZeRO-1: each device keeps the server state of, and computes the step
for, 1/N of every tensor).

Outputs, in --out: ``log.json`` (per-round mean local training loss, val loss and accuracy
every --eval-every rounds), ``curve.png`` (both against rounds; needs matplotlib) and
``checkpoint.npz`` (params, server state, round and PRNG key, written atomically every
--checkpoint-every rounds, at the end and on Ctrl-C / SIGTERM; --resume continues exactly).

Example (CPU, a few minutes)::

  python examples/vit_imagenet.py --data-dir ~/data/imagenet32 -K 4 -H 2 -B 16 --rounds 20 \\
      --eval-every 10 --eval-examples 500 --out runs/vit
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import textwrap
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_localsgd import data, engine, pretrained, tasks
from optax_localsgd.harness import servers, trainer
from optax_localsgd.errors import UsageError  # flags, data or files: one line, no traceback
from optax_localsgd.io import checkpoint as ckpt
from optax_localsgd.util.progress import Progress
from optax_localsgd.util.signals import StopFlag

PROG = "vit_imagenet.py"
SERVERS = ("lopt_a", "lagg_a", "slowmo", "local_sgd", "diloco")
LEARNED = ("lopt_a", "lagg_a")
# Default meta-trained weights per learned server (bundled names, see pretrained.available()):
# those meta-trained on ImageNet images (the MLP on 32x32 Tiny ImageNet), as in the paper's
# ViT experiment, whose optimizers were meta-trained on the ImageNet MLP.
DEFAULT_WEIGHTS = {"lopt_a": "lopt_a/tiny_imagenet32_mlp_k8_h4",
                   "lagg_a": "lagg_a/tiny_imagenet32_mlp_k8_h4"}
CHECKPOINT, LOG, CURVE = "checkpoint.npz", "log.json", "curve.png"
GET_DATA = ("Get the official 'Downsampled ImageNet 32x32' (or '64x64') npz files from "
            "https://image-net.org/download-images (an ImageNet account is needed), unzip "
            "train_data_batch_1.npz .. train_data_batch_10.npz and val_data.npz into one "
            "folder, and pass it with --data-dir.")


# ------------------------------------------------------------------------------------------
# Command line.


def _paragraphs(*texts: str) -> str:
  """Paragraphs wrapped for --help (the formatter keeps our line breaks)."""
  return "\n\n".join(textwrap.fill(t, 88) for t in texts)


def build_parser() -> argparse.ArgumentParser:
  """The example's flags; ``--help`` documents each one."""
  ap = argparse.ArgumentParser(
      prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
      description=_paragraphs(
          "Train a DeiT-tiny ViT on downsampled ImageNet (Imagenet32/64 npz format) with K "
          "workers x H local SGD steps per round and a server optimizer (default: the learned "
          "LOpt-A). Writes log.json, curve.png and checkpoint.npz in --out."),
      epilog=_paragraphs(
          "Data: " + GET_DATA,
          "Any set in the same format works, e.g. a 32x32 Tiny ImageNet (--num-classes is "
          "inferred from the labels).",
          "Ctrl-C or SIGTERM finishes the current chunk of rounds, writes the checkpoint and "
          "exits; rerun with the same flags plus --resume to continue. Set "
          "JAX_COMPILATION_CACHE_DIR=<dir> to reuse compiled programs across restarts."))
  d = ap.add_argument_group("data")
  d.add_argument("--data-dir", required=True, type=pathlib.Path,
                 help="folder with train_data_batch_*.npz and val_data.npz")
  d.add_argument("--resolution", type=int, choices=(32, 64), default=32,
                 help="image side in pixels (default 32; ViT patches: 4 px at 32, 8 px at 64)")
  d.add_argument("--num-classes", type=int, default=None,
                 help="number of classes (default: the largest label in the files, e.g. 1000 "
                 "for ImageNet, 202 for the shared Tiny ImageNet copy)")
  t = ap.add_argument_group("local SGD")
  t.add_argument("--workers", "-K", type=int, default=8, help="number of workers K (default 8)")
  t.add_argument("--local-steps", "-H", type=int, default=4,
                 help="local SGD steps per worker per round H (default 4)")
  t.add_argument("--batch-size", "-B", type=int, default=128,
                 help="examples per worker per local step (default 128)")
  t.add_argument("--rounds", type=int, default=1000,
                 help="total communication rounds, counting those of a resumed run "
                 "(default 1000)")
  t.add_argument("--local-lr", type=float, default=0.1,
                 help="workers' SGD learning rate gamma (default 0.1)")
  t.add_argument("--clip-norm", type=float, default=1.0,
                 help="workers clip each gradient to this global norm; 0 disables "
                 "(default 1.0)")
  t.add_argument("--depth", type=int, default=12,
                 help="transformer blocks (default 12, DeiT-tiny; fewer only for a quick try)")
  s = ap.add_argument_group("server")
  s.add_argument("--server", choices=SERVERS, default="lopt_a",
                 help="server optimizer (default lopt_a)")
  s.add_argument("--weights", default=None,
                 help="lopt_a/lagg_a meta-trained weights: a bundled name or a path to a "
                 f".npz file (default {DEFAULT_WEIGHTS['lopt_a']!r} for lopt_a, "
                 f"{DEFAULT_WEIGHTS['lagg_a']!r} for lagg_a; LAgg-A weights need their K)")
  s.add_argument("--untrained", action="store_true",
                 help="lopt_a/lagg_a with fresh, un-meta-trained weights (tiny steps; for "
                 "trying the pipeline when no weights are installed)")
  s.add_argument("--server-lr", type=float, default=None,
                 help="slowmo: alpha (default 1.0); diloco: outer lr (default 0.7); "
                 "local_sgd: lr (default 1.0, plain averaging)")
  s.add_argument("--momentum", type=float, default=None,
                 help="slowmo: beta (default 0.95); diloco: Nesterov momentum (default 0.9)")
  r = ap.add_argument_group("run")
  r.add_argument("--eval-every", type=int, default=50,
                 help="rounds between val evaluations (default 50)")
  r.add_argument("--eval-examples", type=int, default=10_000,
                 help="val examples per evaluation, a fixed subset (default 10000)")
  r.add_argument("--checkpoint-every", type=int, default=100,
                 help="rounds between checkpoints (default 100); also at the end and on "
                 "Ctrl-C/SIGTERM")
  r.add_argument("--out", type=pathlib.Path, default=pathlib.Path("runs/vit_imagenet"),
                 help="output folder for log.json, curve.png, checkpoint.npz "
                 "(default runs/vit_imagenet)")
  r.add_argument("--resume", action="store_true",
                 help="continue the run in --out from its checkpoint up to --rounds")
  r.add_argument("--devices", type=int, default=None,
                 help="spread the K workers over this many local devices (must divide K; "
                 "default: all local devices if their number divides K, else 1)")
  r.add_argument("--seed", type=int, default=0,
                 help="seed of the init, the worker shards and the minibatches (default 0)")
  r.add_argument("--quiet", action="store_true", help="no progress bar")
  return ap


def check_args(args: argparse.Namespace) -> None:
  """Flag combinations argparse cannot check; raises UsageError."""
  for name in ("workers", "local_steps", "batch_size", "rounds", "depth", "eval_every",
               "eval_examples", "checkpoint_every"):
    if getattr(args, name) < 1:
      raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
  if args.server not in LEARNED and (args.weights or args.untrained):
    raise UsageError(f"--weights/--untrained are for lopt_a and lagg_a, not {args.server}.")
  if args.weights and args.untrained:
    raise UsageError("pass either --weights or --untrained, not both.")


# ------------------------------------------------------------------------------------------
# Setup: data, model, server, devices.


def load_data(data_dir: pathlib.Path, resolution: int,
              num_classes: int | None) -> tuple[dict, dict, int]:
  """Train and val arrays ``{"x": uint8 (N, r, r, 3), "y": int32 0-based}`` and the class count."""
  if not data_dir.is_dir():
    raise UsageError(f"--data-dir {data_dir} does not exist or is not a folder. {GET_DATA}")
  splits = {}
  for split, files in (("train", "train_data_batch_<n>.npz"), ("val", "val_data.npz")):
    try:
      splits[split] = data.load_imagenet_downsampled(split, data_dir, resolution, num_classes)
    except data.DatasetNotFoundError as e:
      raise UsageError(f"no {files} in --data-dir {data_dir.resolve()}. {GET_DATA}") from e
    except data.CorruptDatasetError as e:
      raise UsageError(str(e)) from e
  train, val = splits["train"], splits["val"]
  # Inferred counts can differ between splits (a class missing from one); take the larger.
  n_classes = num_classes or max(train.num_classes, val.num_classes)
  return {"x": train.x, "y": train.y}, {"x": val.x, "y": val.y}, n_classes


def load_meta(args: argparse.Namespace):
  """``(MetaParams or None, identity)`` for lopt_a / lagg_a; ``(None, None)`` otherwise.

  The identity (the arrays' sha256, or how fresh weights were made) goes into the checkpoint
  so that a resumed run uses the same weights, whatever path or name they are loaded by.
  """
  if args.server not in LEARNED:
    return None, None
  if args.untrained:
    print(f"{PROG}: note: fresh, un-meta-trained {args.server} weights (the starting point of "
          f"meta-training, not a useful optimizer yet).", file=sys.stderr)
    return None, f"untrained: init_{args.server}(PRNGKey({args.seed}))"
  name = args.weights or DEFAULT_WEIGHTS[args.server]
  try:
    meta = pretrained.load(name)
    sha = pretrained.metadata(name)["arrays_sha256"]
  except ValueError as e:
    raise UsageError(f"cannot load --weights {name!r}: {e}\nPass --weights PATH.npz or an "
                     f"'optax-localsgd meta-train --out' directory, or --untrained for "
                     f"fresh, un-meta-trained weights.") from e
  return meta, f"arrays sha256 {sha}"


def choose_devices(requested: int | None, k: int) -> list:
  """The local devices to spread the K workers over (one device: no mesh)."""
  local = jax.local_devices()
  if requested is None:
    return local if k % len(local) == 0 else local[:1]
  if requested > len(local):
    raise UsageError(f"--devices {requested}, but JAX sees {len(local)} local device(s): "
                     f"{local}.")
  if k % requested:
    raise UsageError(f"--devices {requested} does not divide K={k}: each device runs K / "
                     f"devices workers.")
  return local[:requested]


def make_server(args: argparse.Namespace, meta) -> servers.Server:
  """The server transform; a LAgg-A K mismatch becomes a UsageError."""
  try:
    return servers.make_server(
        args.server, num_workers=args.workers, local_learning_rate=args.local_lr,
        server_learning_rate=args.server_lr, momentum=args.momentum, meta_params=meta,
        seed=args.seed)
  except ValueError as e:
    raise UsageError(f"--server {args.server}: {e}") from e


def run_identity(args: argparse.Namespace, n_train: int, n_classes: int,
                 weights: str | None) -> dict[str, Any]:
  """What a resumed run must share with the checkpoint (not --rounds, --eval-*, --devices)."""
  return {"resolution": args.resolution, "num_classes": n_classes, "train_examples": n_train,
          "workers": args.workers, "local_steps": args.local_steps,
          "batch_size": args.batch_size, "local_lr": args.local_lr,
          "clip_norm": args.clip_norm, "depth": args.depth, "server": args.server,
          "server_lr": args.server_lr, "momentum": args.momentum, "weights": weights,
          "seed": args.seed}


# ------------------------------------------------------------------------------------------
# Outputs.


def write_log(log: dict, out: pathlib.Path) -> None:
  """``log.json``, replaced atomically (a reader never sees half a file)."""
  tmp = out / f".{LOG}.tmp"
  tmp.write_text(json.dumps(log, indent=1) + "\n")
  tmp.replace(out / LOG)


def plot_curve(log: dict, path: pathlib.Path) -> bool:
  """Mean local training loss and val accuracy (%) against rounds; False without matplotlib."""
  try:
    from optax_localsgd.util.plotting import PlotsUnavailable, figure
    fig = figure(figsize=(11, 4), layout="constrained")
  except PlotsUnavailable:
    return False
  ax_l, ax_a = fig.subplots(1, 2)
  ax_l.plot(log["rounds"], log["train_loss"], linewidth=0.8)
  ax_l.set(xlabel="communication round", ylabel="mean local training loss (nats)")
  ax_a.plot(log["eval_rounds"], [100 * a for a in log["val_accuracy"]], marker="o")
  ax_a.set(xlabel="communication round", ylabel="val accuracy (%)")
  for ax in (ax_l, ax_a):
    ax.grid(True, alpha=0.3)
  c = log["config"]
  data_name = pathlib.Path(log.get("data_dir", "ImageNet")).name
  fig.suptitle(f"ViT (depth {c['depth']}) on {data_name} ({c['resolution']}x{c['resolution']}, "
               f"{c['num_classes']} classes): {c['server']}, K={c['workers']}, "
               f"H={c['local_steps']}, B={c['batch_size']}")
  fig.savefig(path, dpi=110)
  return True


# ------------------------------------------------------------------------------------------
# Training.


def next_stop(done: int, args: argparse.Namespace) -> int:
  """The next round after ``done`` that needs the host: an eval, a checkpoint or the end."""
  def up(every: int) -> int:
    return (done // every + 1) * every
  return min(up(args.eval_every), up(args.checkpoint_every), args.rounds)


def train(args: argparse.Namespace) -> int:
  """Set up, resume if asked, run to --rounds; returns the exit status."""
  out = args.out
  ck_path = out / CHECKPOINT
  if args.resume and not ck_path.is_file():
    raise UsageError(f"--resume: no checkpoint at {ck_path} (start the run without --resume, "
                     f"or point --out at the folder of the run to continue).")
  if not args.resume and ck_path.exists():
    raise UsageError(f"{ck_path} exists: pass --resume to continue that run, or choose "
                     f"another --out.")
  train_arrays, val_arrays, n_classes = load_data(args.data_dir, args.resolution,
                                                  args.num_classes)
  meta, weights = load_meta(args)
  task = tasks.get_task(f"imagenet{args.resolution}_vit_tiny", num_classes=n_classes,
                        depth=args.depth)
  server = make_server(args, meta)
  devices = choose_devices(args.devices, args.workers)
  mesh = engine.worker_mesh(devices) if len(devices) > 1 else None
  n_train = len(train_arrays["y"])
  if n_train < args.workers:
    raise UsageError(f"{n_train} training examples cannot be split among K={args.workers} "
                     f"workers.")
  identity = run_identity(args, n_train, n_classes, weights)

  # Over several devices each one computes the server step for its slice of every tensor
  # (ZeRO-1, docs/distributed.md).
  shard_server = mesh is not None
  if shard_server:  # the state holds one slice per device: a resume needs as many devices
    identity["sharded_server_devices"] = len(devices)
  round_fn = trainer.round_fn_for(task, server, args.workers, args.local_steps,
                                  args.batch_size, args.local_lr, args.clip_norm or None,
                                  mesh=mesh, shard_server=shard_server)

  key = jax.random.PRNGKey(args.seed)
  params = jax.jit(task.init)(jax.random.fold_in(key, 0))  # jitted: eager init is slow.
  server_state = engine.init_round_state(
      server.tx, trainer.round_config_for(server, args.workers, args.local_steps,
                                          args.batch_size), params, mesh, shard_server)
  run = {"params": params, "server_state": server_state,
         "round": np.zeros((), np.int64), "key": jax.random.fold_in(key, 1)}
  log = {"config": identity, "rounds": [], "train_loss": [], "eval_rounds": [],
         "val_loss": [], "val_accuracy": [], "wall_s": 0.0, "devices": len(devices),
         "sharded_server": shard_server}
  if args.resume:
    try:
      run, stored = ckpt.load_checkpoint(ck_path, run, {"identity": identity})
    except ckpt.CheckpointError as e:
      raise UsageError(f"--resume: {e}") from e
    log = stored["log"]
  log["devices"], log["data_dir"] = len(devices), str(args.data_dir.resolve())
  log.setdefault("commands", []).append(" ".join([PROG, *sys.argv[1:]]))
  if meta is not None:
    log["weights"] = args.weights or DEFAULT_WEIGHTS[args.server]

  shards = data.split_homogeneous(n_train, args.workers, args.seed)
  dev_data = engine.DeviceData(train_arrays, shards)
  state = (run["params"], run["server_state"])
  if mesh is None:
    dev_data, state = jax.device_put((dev_data, state))
  else:  # replicate leaves the sharded server state as it is, one slice per device
    dev_data, state = engine.replicate((dev_data, state), mesh)
  evaluate = trainer.make_evaluator(task, engine.eval_batches(task, val_arrays,
                                                               args.eval_examples))
  return loop(args, round_fn, dev_data, state, int(run["round"]), run["key"], evaluate, log)


def loop(args: argparse.Namespace, round_fn, dev_data, state, done: int, key,
         evaluate, log: dict) -> int:
  """Run rounds ``done..args.rounds`` with evals, checkpoints and signal handling."""
  out, ck_path = args.out, args.out / CHECKPOINT
  out.mkdir(parents=True, exist_ok=True)
  chunk = jax.jit(engine.make_multi_round_fn(round_fn))
  params, server_state = state
  t_start, wall_before = time.perf_counter(), log["wall_s"]

  def record_eval(r: int) -> float:
    loss, acc = evaluate(params)
    log["eval_rounds"].append(r)
    log["val_loss"].append(loss)
    log["val_accuracy"].append(acc)
    return acc

  def save() -> None:
    log["wall_s"] = wall_before + time.perf_counter() - t_start
    tree = {"params": params, "server_state": server_state,
            "round": np.asarray(done, np.int64), "key": key}
    ckpt.save_checkpoint(ck_path, jax.device_get(tree), {"identity": log["config"], "log": log})
    write_log(log, out)

  if not log["eval_rounds"]:
    record_eval(0)  # the starting point of the curve
  resumed = f" from round {done}" if done else ""
  bar = Progress(max(args.rounds - done, 0), enabled=not args.quiet,
                 desc=f"{log['config']['server']} K={args.workers} H={args.local_steps}{resumed}")
  status = 0
  with StopFlag() as stop:
    while done < args.rounds and stop.signum is None:
      n = next_stop(done, args) - done
      params, server_state, losses = chunk(params, server_state, key, done, jnp.arange(n),
                                           dev_data)
      losses = np.asarray(jax.device_get(losses), np.float64)
      log["rounds"].extend(range(done + 1, done + n + 1))
      log["train_loss"].extend(losses.tolist())
      done += n
      if not np.all(np.isfinite(losses)):
        bar.write(f"training loss is not finite at round {done}: stopping without a checkpoint "
                  f"(lower --local-lr, or try another --server).")
        status = 1
        break
      metrics = {"train_loss": float(losses[-1])}
      if done % args.eval_every == 0 or done == args.rounds:
        metrics["val_acc"] = record_eval(done)
      # On a signal, save now and skip the eval: a preempted job may have little time left.
      if done % args.checkpoint_every == 0 or done == args.rounds or stop.signum is not None:
        save()
      bar.update(n, **metrics)
    bar.close()
    if stop.signum is not None and done < args.rounds:
      print(f"{PROG}: stopped by signal {stop.signum} at round {done}; checkpoint in "
            f"{ck_path}. Continue with the same flags plus --resume.", file=sys.stderr)
      status = 128 + stop.signum
  log["wall_s"] = wall_before + time.perf_counter() - t_start
  write_log(log, out)
  if not plot_curve(log, out / CURVE):
    print(f"{PROG}: matplotlib is not installed, so no {CURVE} (pip install matplotlib, or "
          f"pip install 'optax-localsgd[plot]'); the numbers are in {out / LOG}.",
          file=sys.stderr)
  summary = {"round": done, "eval_round": log["eval_rounds"][-1],
             "val_accuracy": log["val_accuracy"][-1],
             "val_loss": log["val_loss"][-1], "wall_s": round(log["wall_s"], 1),
             "out": str(out)}
  print(json.dumps(summary))
  return status


def main(argv: list[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    check_args(args)
    return train(args)
  except UsageError as e:
    print(f"{PROG}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
