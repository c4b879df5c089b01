"""The ``optax-localsgd`` command: ``train``, ``demo``, ``meta-train``, ``evaluate``, ``sweep``
and ``publish``; ``optax-localsgd COMMAND --help`` documents each. ``train --federated`` and
``evaluate --federated`` run the federated setting (:mod:`optax_localsgd.harness.federated`)."""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

from optax_localsgd import cli_federated, compression, tasks
from optax_localsgd.data import CorruptDatasetError, DatasetNotFoundError
from optax_localsgd.errors import UsageError
from optax_localsgd.harness import servers

# Relative to the current folder, not the source tree: it must work from an installed package.
# The file the package ships (sweep.tuned_hparams) is updated only by passing its path.
SWEEP_OUT = "runs/sweep/tuned_hparams.json"


def _add_compress_arg(p: argparse.ArgumentParser, several: bool = False) -> None:
  # Parsed by the configs (compression.from_spec), so a bad spec is one UsageError line.
  p.add_argument("--compress", default=None, metavar="SPEC" + (",SPEC..." if several else ""),
                 help=f"workers compress their deltas before sending them: "
                 f"{compression.SPEC_HELP}; default: uncompressed (docs/compression.md)"
                 + ("; several, comma-separated (e.g. none,top_k:0.1,top_k:0.01): one page "
                    "comparing them, with loss against bits sent (paper Figure 13)"
                    if several else ""))


def _add_train_args(p: argparse.ArgumentParser) -> None:
  from optax_localsgd.harness.trainer import TrainConfig
  d = TrainConfig()
  p.add_argument("--task", default=d.task, choices=tasks.available_tasks(), metavar="TASK",
                 help=f"task name, one of: {', '.join(tasks.available_tasks())} "
                 f"(default {d.task})")
  from optax_localsgd.harness.federated import FEDERATED_ONLY, FederatedTrainConfig
  p.add_argument("--server", default=None,
                 choices=sorted(servers.available_servers() + list(FEDERATED_ONLY)),
                 help=f"server optimizer (default {d.server}; with --federated "
                 f"{FederatedTrainConfig().server}; {', '.join(FEDERATED_ONLY)} need "
                 f"--federated)")
  p.add_argument("--workers", "-K", type=int, default=d.workers, help="number of workers K")
  p.add_argument("--local-steps", "-H", type=int, default=d.local_steps,
                 help="local steps per round H")
  p.add_argument("--batch-size", "-B", type=int, default=None,
                 help=f"examples per worker per local step (default {d.batch_size}; with "
                 f"--federated {FederatedTrainConfig().batch_size})")
  p.add_argument("--rounds", type=int, default=d.rounds, help="communication rounds")
  p.add_argument("--seed", type=int, default=d.seed)
  p.add_argument("--local-lr", type=float, default=None,
                 help=f"workers' SGD learning rate gamma (default {d.local_lr}; with "
                 f"--federated {FederatedTrainConfig().local_lr}, or a learned optimizer's "
                 f"meta-training one)")
  p.add_argument("--server-lr", type=float, default=None,
                 help="server learning rate (SlowMo's alpha; lr of local_sgd, diloco, fed*, "
                 "and of the data-parallel sgd/adam); default: the optimizer's own")
  p.add_argument("--momentum", type=float, default=None, help="SlowMo beta / DiLoCo momentum")
  p.add_argument("--clip-norm", type=float, default=None, help="workers' gradient clipping")
  p.add_argument("--weight-decay", type=float, default=0.0, help="workers' weight decay")
  p.add_argument("--eval-every", type=int, default=d.eval_every,
                 help="rounds between evaluations of the global model")
  p.add_argument("--weights", default=None,
                 help="lopt_a / lagg_a weights: a bundled name (optax_localsgd.pretrained."
                 "available()), a .safetensors (or older .npz) path or a meta-train --out "
                 "directory; default: the bundled SERVER/TASK_kK_hH if it exists, else fresh, "
                 "un-meta-trained weights")
  p.add_argument("--devices", type=int, default=1,
                 help="spread the workers over this many devices (must divide K); the server "
                 "step is then sharded over them (ZeRO-1, docs/distributed.md)")
  p.add_argument("--data-dir", default=None,
                 help="dataset directory (default: $OPTAX_LOCALSGD_DATA, the user cache, "
                 "/usr/share/datasets)")
  _add_compress_arg(p)
  cli_federated.add_federated_args(p)


def _config(args):
  from optax_localsgd.harness.trainer import TrainConfig
  d = TrainConfig()
  if args.server in ("fedavg", "scaffold"):
    raise UsageError(f"--server {args.server} is a federated method: add --federated --alpha A.")
  return TrainConfig(
      task=args.task, server=args.server or d.server, workers=args.workers,
      local_steps=args.local_steps, batch_size=args.batch_size or d.batch_size,
      rounds=args.rounds, seed=args.seed,
      local_lr=d.local_lr if args.local_lr is None else args.local_lr,
      server_lr=args.server_lr, momentum=args.momentum, clip_norm=args.clip_norm,
      weight_decay=args.weight_decay, eval_every=args.eval_every, devices=args.devices,
      data_dir=args.data_dir, compress=args.compress)


def _save_plot(draw: Callable[[pathlib.Path], None], path: pathlib.Path) -> bool:
  """``draw(path)``; without matplotlib, one line on stderr saying how to get the PNG."""
  from optax_localsgd.util.plotting import INSTALL_HINT, PlotsUnavailable
  try:
    draw(path)
    return True
  except PlotsUnavailable:
    # The numbers are in the JSON next to it; the plot is optional (the `plot` extra).
    print(f"note: no {path}: matplotlib is not installed ({INSTALL_HINT}).", file=sys.stderr)
    return False


def _write_outputs(out: pathlib.Path, name: str, histories: list[dict], title: str) -> None:
  from optax_localsgd.util.plotting import plot_histories
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{name}.json").write_text(json.dumps(histories, indent=1) + "\n")
  png = out / f"{name}.png"
  plotted = _save_plot(lambda p: plot_histories(histories, p, title), png)
  print(f"wrote {out / (name + '.json')}" + (f" and {png}" if plotted else ""), file=sys.stderr)


def _learned_weights(server: str, task: str, k: int, h: int, weights: str | None,
                     compress: str | None = None):
  """(MetaParams or None, description) for a learned server; None for the others. With a
  compressor, bundled weights meta-trained for it are preferred."""
  from optax_localsgd import pretrained
  if server not in ("lopt_a", "lagg_a"):
    return None, None
  comp = compression.from_flag(compress)
  name = weights or pretrained.default_name(server, task, k, h, comp and comp.weights_tag())
  if name is None:
    print(f"note: {server} runs with fresh, un-meta-trained weights (no bundled "
          f"{server}/{task}_k{k}_h{h}; pass --weights).", file=sys.stderr)
    return None, None
  return pretrained.load(name, num_workers=k), name


def cmd_train(args) -> int:
  cli_federated.check_mode(args, ("workers", "local_steps", "clip_norm", "weight_decay", "devices",
                     "compress"))
  if args.federated:
    return cli_federated.train_federated(args)
  from optax_localsgd.harness import trainer
  cfg = _config(args)
  meta, _ = _learned_weights(cfg.server, cfg.task, cfg.workers, cfg.local_steps, args.weights,
                             cfg.compress)
  hist = trainer.train(cfg, meta_params=meta, progress=not args.quiet)
  _write_outputs(pathlib.Path(args.out), "metrics", [hist],
                 f"{cfg.task}: {cfg.server}, K={cfg.workers}, H={cfg.local_steps}")
  print(json.dumps({k: hist.get(k) for k in ("label", "wall_s", "test_accuracy")} | {
      "final_global_train_loss": hist["global_train_loss"][-1]}))
  return 0


def cmd_demo(args) -> int:
  from optax_localsgd.harness import demo
  histories = demo.train_all(args.rounds, seed=args.seed, eval_every=args.eval_every,
                             data_dir=args.data_dir, progress=not args.quiet)
  print(demo.table(histories, args.rounds))
  _write_outputs(pathlib.Path(args.out), "demo", histories,
                 "Fashion-MNIST 2-layer MLP, K=8 workers, H=4 local steps")
  return 0


def _perturb_leaves(flag: str | None) -> tuple[str, ...] | None:
  from optax_localsgd.meta.problem import LEAVES
  if flag is None or flag == "all":
    return None
  leaves = tuple(x.strip() for x in flag.split(",") if x.strip())
  bad = [x for x in leaves if x not in LEAVES]
  if bad or not leaves:
    raise UsageError(f"--perturb {flag!r}: unknown leaves {bad or '(none given)'}; give a "
                     f"comma-separated subset of {','.join(LEAVES)}, or all.")
  return leaves


def meta_train_config(args):
  """The :class:`~optax_localsgd.meta.train.MetaTrainConfig` of parsed ``meta-train`` flags."""
  from optax_localsgd.harness.federated import FederatedTrainConfig
  from optax_localsgd.meta.problem import PESConfig
  from optax_localsgd.meta.train import FederatedMeta, MetaTrainConfig
  cli_federated.check_mode(args, ("workers", "local_steps", "compress"))
  # A flag left out is None; one given (even an invalid 0) is kept, so validation sees it.
  pick = lambda flag, default: default if flag is None else flag
  fed, workers, batch_size = None, args.workers, pick(args.batch_size, 128)
  if args.federated:
    d = FederatedTrainConfig()
    fed = FederatedMeta(args.alpha, pick(args.clients, d.num_clients),
                        pick(args.local_epochs, d.local_epochs))
    workers = pick(args.clients_per_round, d.clients_per_round)
    batch_size = pick(args.batch_size, d.batch_size)
  pes = PESConfig(sigma=args.sigma, truncation=args.truncation, min_inner=args.min_inner,
                  max_inner=args.max_inner, outer_steps=args.outer_steps, lr_peak=args.lr_peak,
                  lr_end=args.lr_end, warmup_steps=args.warmup_steps, loss_clip=args.loss_clip,
                  grad_clip=args.grad_clip, perturb=_perturb_leaves(args.perturb))
  return MetaTrainConfig(
      optimizer=args.optimizer, tasks=tuple(args.task), workers=workers,
      local_steps=args.local_steps, batch_size=batch_size, local_lr=args.local_lr,
      tasks_per_estimate=args.tasks_per_estimate, pes=pes, seed=args.seed,
      checkpoint_every=args.checkpoint_every, data_dir=args.data_dir, init_from=args.init_from,
      feature_set=args.feature_set, output_init_scale=args.output_init_scale,
      compress=args.compress, nominal_init=args.nominal_init, federated=fed)


def cmd_meta_train(args) -> int:
  from optax_localsgd.meta.train import meta_train
  cfg = meta_train_config(args)
  command = "optax-localsgd " + " ".join(args.argv)
  res = meta_train(cfg, args.out, resume=args.resume, progress=not args.quiet, command=command,
                   stop_after=args.stop_after, export_partial=args.export_partial,
                   time_budget_s=args.time_budget, snapshot_every=args.snapshot_every)
  summary = {"step": res["step"], "interrupted": res["interrupted"],
             "weights": str(res["weights"]) if res["weights"] else None,
             "last_meta_loss": res["log"]["meta_loss"][-1] if res["log"]["meta_loss"] else None}
  print(json.dumps(summary))
  return 0


def _parse_seeds(text: str) -> tuple[int, ...]:
  """``"100-109"`` or ``"1,2,5"`` -> a tuple of seeds."""
  seeds: list[int] = []
  for part in text.split(","):
    lo, _, hi = part.partition("-")
    try:
      seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    except ValueError:
      raise UsageError(f"--seeds expects e.g. 100-109 or 100,101, got {text!r}.") from None
  return tuple(seeds)


def _weights_flags(args, weights: dict) -> dict:
  """``weights`` updated with the --weights METHOD=NAME_OR_PATH flags."""
  for w in args.weights or []:
    method, sep, name = w.partition("=")
    if not sep:
      raise UsageError(f"--weights expects METHOD=NAME_OR_PATH, got {w!r}.")
    weights[method] = name
  return weights


class _Evaluation(NamedTuple):
  cfg: Any
  runs: dict
  summary: dict
  hparams_key: str  # the entry the baselines' hyperparameters came from
  own_key: str  # this setting's own entry (differs from hparams_key when borrowed)


def _evaluation(args, methods: tuple[str, ...], comp: compression.Compression | None,
                cache: pathlib.Path) -> _Evaluation:
  """One compressor's evaluation: its config, runs, summary and hyperparameter key.

  With a compressor, the baselines take the entry ``KEY/SPEC`` of the hyperparameter file
  (paper Table 6's values for top-k) and, where none is there, the uncompressed ``KEY``'s (the
  page says they were borrowed); the learned optimizers take weights meta-trained for it where
  they ship (``pretrained.default_name``).
  """
  from optax_localsgd import pretrained
  from optax_localsgd.harness import evaluation, sweep
  spec = None if comp is None else comp.spec()
  weights = {m: name for m in methods if (name := pretrained.default_name(
      m, args.task, args.workers, args.local_steps, comp and comp.weights_tag()))}
  _weights_flags(args, weights)
  cfg = evaluation.EvalConfig(
      task=args.task, workers=args.workers, local_steps=args.local_steps,
      batch_size=args.batch_size, rounds=args.rounds, seeds=_parse_seeds(args.seeds),
      methods=methods, weights=tuple(sorted(weights.items())), target_loss=args.target_loss,
      eval_every=args.eval_every, eval_dense_until=args.eval_dense_until,
      data_dir=args.data_dir, compress=spec)
  base_key = sweep.SweepConfig(args.task, args.workers, args.local_steps, args.batch_size).key()
  own_key = base_key if spec is None else f"{base_key}/{spec}"
  path = pathlib.Path(args.hparams) if args.hparams else None
  key = args.hparams_key or own_key
  try:
    hparams = sweep.tuned_hparams(key, path)
  except UsageError:
    if args.hparams_key or key == base_key:
      raise
    key, hparams = base_key, sweep.tuned_hparams(base_key, path)
  runs = evaluation.run_all(cfg, hparams, cache, progress=not args.quiet)
  summary = evaluation.summarize(cfg, runs)
  for m in methods:
    summary[m]["hparams"] = ({"weights": weights[m], "local_lr": runs[m][0]["config"]["local_lr"]}
                             if m in weights else hparams[m])
    summary[m]["bits_per_round"] = runs[m][0].get("bits_per_round")
  return _Evaluation(cfg, runs, summary, key, own_key)


def cmd_evaluate(args) -> int:
  cli_federated.check_mode(args, ("workers", "local_steps", "hparams", "hparams_key", "target_loss",
                     "eval_dense_until", "compress"))
  if args.federated:
    return cli_federated.evaluate_federated(args)
  if args.local_lr is not None:
    raise UsageError("--local-lr applies with --federated; the baselines' tuned values come "
                     "from --hparams.")
  from optax_localsgd.harness import compressed, evaluation, report
  args.batch_size = args.batch_size or 128
  methods = tuple((args.methods or ",".join(evaluation.BASELINES + evaluation.LEARNED))
                  .split(","))
  # Every bad spec fails here, before any run; "none" parses to None.
  comps = [compression.from_flag(s) for s in (args.compress or "none").split(",")]
  setting = f"{args.task}_k{args.workers}_h{args.local_steps}"
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  command = "optax-localsgd " + " ".join(args.argv)
  if len(comps) > 1:
    name = args.name or f"{setting}_compressed"
    evs = [_evaluation(args, methods, c, pathlib.Path(args.cache) / name / compressed.slug(
        None if c is None else c.spec())) for c in comps]
    cfgs, runs = [e.cfg for e in evs], [e.runs for e in evs]
    plotted = _save_plot(lambda p: compressed.plot(cfgs, runs, p), out / f"{name}.png")
    text = compressed.markdown(cfgs, [e.summary for e in evs], [e.hparams_key for e in evs],
                               command, f"{name}.png" if plotted else None)
    payload = {"command": command, "settings": [
        {"compress": e.cfg.compress, "hparams_key": e.hparams_key, "summary": e.summary}
        for e in evs]}
  else:
    tag = "" if comps[0] is None else f"_{comps[0].weights_tag()}"
    name = args.name or setting + tag
    e = _evaluation(args, methods, comps[0], pathlib.Path(args.cache) / name)
    plotted = _save_plot(lambda p: report.plot_curves(e.cfg, e.runs, p), out / f"{name}.png")
    text = report.markdown(e.cfg, e.summary, command, f"{name}.png" if plotted else None,
                           borrowed_hparams_key=(e.hparams_key if e.hparams_key != e.own_key
                                                 else None))
    payload = {"command": command, "hparams_key": e.hparams_key, "summary": e.summary}
  (out / f"{name}.md").write_text(text)
  (out / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
  print(text)
  print(f"wrote {out / (name + '.md')}, .json" + (" and .png" if plotted else ""),
        file=sys.stderr)
  return 0


def cmd_sweep(args) -> int:
  from optax_localsgd.harness import sweep
  cfg = sweep.SweepConfig(
      task=args.task, workers=args.workers, local_steps=args.local_steps,
      batch_size=args.batch_size, rounds=args.rounds, min_rounds=args.min_rounds, eta=args.eta,
      grid=args.grid, data_dir=args.data_dir)
  path = pathlib.Path(args.out)
  command = "optax-localsgd " + " ".join(args.argv)
  for method in args.methods.split(","):
    result = sweep.sweep_method(cfg, method, log=(lambda _: None) if args.quiet else print)
    sweep.update_file(path, cfg, method, result, command)
    print(f"{method}: {json.dumps(result['best'])}")
  return 0


def maintainer_tool(name: str):
  """``tools/NAME.py`` of the checkout in the current folder (maintainer tooling, no wheel)."""
  import importlib.util
  path = pathlib.Path("tools") / f"{name}.py"
  if not path.is_file():
    raise UsageError(f"This command is maintainer tooling: run it from the top of a source "
                     f"checkout of optax-localsgd (it needs {path}, which is not installed).")
  spec = importlib.util.spec_from_file_location(f"optax_localsgd_tools.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def cmd_publish(args) -> int:
  from optax_localsgd import pretrained
  model_card = maintainer_tool("model_card")
  run = pathlib.Path(args.run)
  card = model_card.publish(
      pretrained.resolve(run), args.name, pathlib.Path(args.root), curve=run / "meta_loss.png",
      results=pathlib.Path(args.results) if args.results else None,
      notes=pathlib.Path(args.notes).read_text() if args.notes else "")
  print(f"wrote {card}")
  return 0


def _add_setting_args(p: argparse.ArgumentParser) -> None:
  """The setting an evaluation or a sweep is for (task, K, H, B, data) and --quiet."""
  p.add_argument("--task", default="fmnist_mlp", help="task name (default fmnist_mlp)")
  p.add_argument("--workers", "-K", type=int, default=8, help="number of workers K")
  p.add_argument("--local-steps", "-H", type=int, default=4, help="local steps per round H")
  p.add_argument("--batch-size", "-B", type=int, default=128,
                 help="examples per worker per local step")
  p.add_argument("--data-dir", default=None, help="dataset directory")
  p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(
      prog="optax-localsgd",
      description="Local SGD with learned and hand-designed server optimizers.")
  sub = ap.add_subparsers(dest="command", required=True)
  t = sub.add_parser("train", help="train one task with one server optimizer",
                     description="Train a task with K workers x H local steps per round, "
                     "or with --federated K of N clients per round; writes OUT/metrics.json "
                     "and OUT/metrics.png.")
  _add_train_args(t)
  t.add_argument("--out", default="runs/train", help="output directory")
  t.add_argument("--quiet", action="store_true", help="no progress bar")
  t.set_defaults(fn=cmd_train, subparser=t)
  d = sub.add_parser("demo", help="compare server optimizers on real Fashion-MNIST",
                     description="Fashion-MNIST 2-layer MLP, K=8, H=4, B=128: local SGD and "
                     "SlowMo with the paper's tuned hyperparameters, DiLoCo with the package's "
                     "tuned ones, and every bundled learned optimizer for this setting; prints "
                     "a comparison table and writes OUT/demo.json and (with matplotlib) "
                     "OUT/demo.png.")
  d.add_argument("--rounds", type=int, default=150, help="communication rounds per optimizer")
  d.add_argument("--eval-every", type=int, default=10,
                 help="rounds between evaluations of the global model")
  d.add_argument("--seed", type=int, default=0)
  d.add_argument("--data-dir", default=None, help="dataset directory")
  d.add_argument("--out", default="runs/demo", help="output directory")
  d.add_argument("--quiet", action="store_true", help="no progress bars")
  d.set_defaults(fn=cmd_demo)
  m = sub.add_parser(
      "meta-train", help="meta-train LOpt-A or LAgg-A with PES",
      description="Meta-train a learned server optimizer with persistent evolution strategies "
      "(paper Algorithm 2). Writes OUT/checkpoint.npz (every --checkpoint-every steps and on "
      "Ctrl-C), OUT/log.json, OUT/meta_loss.png and, at the end, OUT/weights.safetensors. "
      "With --federated --alpha A, the inner problems are federated (FedLOpt, paper appendix "
      "E.6): K of N Dirichlet-skewed clients per round, E local epochs of batches of B.")
  m.add_argument("--optimizer", required=True, choices=("lopt_a", "lagg_a"))
  m.add_argument("--task", action="append", required=True, metavar="TASK",
                 help="task to meta-train on; repeat for a multi-task meta-batch")
  m.add_argument("--workers", "-K", type=int, default=8)
  m.add_argument("--local-steps", "-H", type=int, default=4)
  m.add_argument("--batch-size", "-B", type=int, default=None,
                 help="examples per worker per local step (default 128; with --federated 20)")
  m.add_argument("--local-lr", type=float, default=0.3, help="workers' SGD learning rate")
  m.add_argument("--outer-steps", type=int, default=5000)
  m.add_argument("--tasks-per-estimate", type=int, default=8)
  m.add_argument("--truncation", type=int, default=50, help="rounds per truncated unroll")
  m.add_argument("--min-inner", type=int, default=100, help="shortest inner problem (rounds)")
  m.add_argument("--max-inner", type=int, default=1000, help="longest inner problem (rounds)")
  m.add_argument("--sigma", type=float, default=0.01, help="PES perturbation std")
  m.add_argument("--lr-peak", type=float, default=3e-3)
  m.add_argument("--lr-end", type=float, default=1e-3)
  m.add_argument("--warmup-steps", type=int, default=100)
  m.add_argument("--loss-clip", type=float, default=None, metavar="FACTOR",
                 help="divergence guard: clip each round's meta-loss at FACTOR x the task's "
                 "loss at initialisation and restart pairs that stay there (default: off)")
  m.add_argument("--grad-clip", type=float, default=None, metavar="NORM",
                 help="clip each PES estimate to this global norm before AdamW (default: off)")
  m.add_argument("--perturb", default=None, metavar="LEAVES",
                 help="meta-train only these leaves of the optimizer, comma-separated from "
                 "w0,b0,w1,b1,w2,b2,decay_offsets (default all, the paper); fewer perturbed "
                 "weights give less noisy PES estimates (docs/meta.md)")
  m.add_argument("--seed", type=int, default=0)
  m.add_argument("--feature-set", default="ada-v2", choices=("ada-v2", "ada-v1"),
                 help="features of a fresh init (default ada-v2, the authors' semantics)")
  m.add_argument("--output-init-scale", type=float, default=1.0, metavar="S",
                 help="factor on a fresh init's output-layer weights; 0 starts from an "
                 "optimizer that takes no step (default 1, the authors' init)")
  m.add_argument("--init-from", default=None, metavar="NAME_OR_PATH",
                 help="start from these weights (same optimizer and K), e.g. to fine-tune "
                 "H=4 weights for another H; default: a fresh init from --seed")
  m.add_argument("--init", dest="nominal_init", default=None, metavar="nesterov:LR,MOMENTUM",
                 help="start a fresh init as DiLoCo's outer Nesterov step (docs/meta.md)")
  m.add_argument("--checkpoint-every", type=int, default=100)
  m.add_argument("--data-dir", default=None)
  m.add_argument("--out", required=True, help="output directory")
  m.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.npz")
  m.add_argument("--stop-after", type=int, default=None,
                 help="stop (with a checkpoint) after this many outer steps of this call")
  m.add_argument("--snapshot-every", type=int, default=None, metavar="N",
                 help="also keep the weights every N outer steps in OUT/snapshots/")
  m.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                 help="stop with a checkpoint after the first outer step that ends this many "
                 "seconds after the start (compilation included); with --export-partial the "
                 "weights are written too, e.g. to fit a device call of fixed length")
  m.add_argument("--export-partial", action="store_true",
                 help="write OUT/weights.safetensors even when stopping early (with --resume "
                 "--stop-after 0: export the checkpoint as it is)")
  _add_compress_arg(m)
  cli_federated.add_federated_args(m)
  m.add_argument("--quiet", action="store_true")
  m.set_defaults(fn=cmd_meta_train, subparser=m)
  e = sub.add_parser(
      "evaluate", help="compare the learned optimizers with tuned baselines (Tables 2-3)",
      description="Train every method on held-out seeds and write OUT/NAME.md (table), "
      "OUT/NAME.json (per-seed metrics) and OUT/NAME.png (curves). Runs are cached in "
      "CACHE/NAME/, so an interrupted evaluation resumes. Training loss = the global model's "
      "loss on a fixed 10,000-example training subset. With --federated: FedAvg, FedAdam, "
      "FedYogi, FedAdagrad, SCAFFOLD and LOpt-A on N Dirichlet-skewed clients, a table of "
      "final test accuracy in OUT/NAME.md and OUT/NAME.json, test-accuracy curves (the "
      "paper's Figure 17) in OUT/NAME.png (docs/federated.md).")
  _add_setting_args(e)
  e.add_argument("--rounds", type=int, default=1000)
  e.add_argument("--seeds", default="100-109", help="e.g. 100-109 or 100,101")
  e.add_argument("--methods", default=None,
                 help="comma-separated (default local_sgd,slowmo,diloco,sgd,adam,lopt_a,lagg_a;"
                 " with --federated fedavg,fedadam,fedyogi,fedadagrad,scaffold,lopt_a)")
  e.add_argument("--weights", action="append", metavar="METHOD=NAME_OR_PATH",
                 help="weights of a learned method (default: the bundled "
                 "METHOD/TASK_kK_hH when it exists)")
  e.add_argument("--hparams", default=None,
                 help="tuned-hyperparameter JSON (default: the one shipped with the package)")
  e.add_argument("--hparams-key", default=None,
                 help="entry to use, e.g. fmnist_mlp/K8/H4/B128 (default: this run's)")
  e.add_argument("--target-loss", type=float, default=0.2)
  e.add_argument("--eval-every", type=int, default=10)
  e.add_argument("--eval-dense-until", type=int, default=300,
                 help="evaluate after every round up to this one")
  e.add_argument("--name", default=None,
                 help="output name (default TASK_kK_hH, with one --compress TASK_kK_hH_TAG, with "
                 "several TASK_kK_hH_compressed; with --federated TASK_fed_nN_kK_aALPHA)")
  e.add_argument("--cache", default="runs/eval")
  e.add_argument("--out", default="docs/results")
  _add_compress_arg(e, several=True)
  cli_federated.add_federated_args(e)
  from optax_localsgd.harness.federated import FederatedTrainConfig
  e.add_argument("--local-lr", type=float, default=None,
                 help=f"with --federated: the baselines' client learning rate (default "
                 f"{FederatedTrainConfig().local_lr}); learned optimizers use their "
                 f"meta-training one")
  # -B defaults to 128, or with --federated to the paper's B = 20 (FederatedTrainConfig).
  e.set_defaults(fn=cmd_evaluate, subparser=e, batch_size=None)
  s = sub.add_parser(
      "sweep", help="tune the baselines over the paper's grids (appendix D)",
      description="Successive halving over the grids of optax_localsgd.harness.sweep; the winners "
      "are stored under TASK/KK/HH/BB in the JSON file --out (other entries are kept).")
  _add_setting_args(s)
  s.add_argument("--methods", default="local_sgd,slowmo,diloco,sgd,adam")
  s.add_argument("--rounds", type=int, default=1000, help="the last rung's rounds")
  s.add_argument("--min-rounds", type=int, default=37, help="the first rung's rounds")
  s.add_argument("--eta", type=int, default=3, help="keep the best 1/eta at each rung")
  s.add_argument("--grid", choices=("paper", "reduced"), default="paper")
  s.add_argument("--out", default=SWEEP_OUT,
                 help="JSON file to add the winners to, created with its folders if missing "
                 "(default %(default)s, relative to the current folder; pass it to evaluate "
                 "--hparams)")
  s.set_defaults(fn=cmd_sweep)
  pub = sub.add_parser(
      "publish", help="ship a meta-training run's weights under pretrained/ with a model card "
      "(maintainer tooling: from the top of a source checkout)",
      description="Copies RUN/weights.safetensors to ROOT/NAME.safetensors (converting an older "
      "RUN/weights.npz), records its sha256 in "
      "ROOT/MANIFEST.json and writes the model card ROOT/NAME.md with RUN/meta_loss.png.")
  pub.add_argument("run", help="meta-training output directory")
  pub.add_argument("name", help="e.g. lopt_a/fmnist_mlp_k8_h4")
  pub.add_argument("--root", default="pretrained")
  pub.add_argument("--results", default=None, help="docs/results/NAME.md to include")
  pub.add_argument("--notes", default=None, help="markdown file of notes for the card")
  pub.set_defaults(fn=cmd_publish)
  return ap


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  args.argv = argv
  for name in ("workers", "local_steps", "batch_size", "rounds", "eval_every", "devices",
               "outer_steps", "tasks_per_estimate", "truncation", "checkpoint_every",
               "clients", "clients_per_round"):
    value = getattr(args, name, None)  # None: not given, the config's default
    if value is not None and value < 1:
      print(f"optax-localsgd: error: --{name.replace('_', '-')} must be >= 1.", file=sys.stderr)
      return 2
  try:
    return args.fn(args)
  except (DatasetNotFoundError, CorruptDatasetError, UsageError) as e:
    # Mistakes in the user's input, said in one line. Anything else is a bug: let it
    # propagate with its traceback.
    print(f"optax-localsgd: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
