"""The federated side of the ``optax-localsgd`` command: ``train --federated`` and ``evaluate
--federated`` (:mod:`optax_localsgd.harness.federated`), apart from :mod:`optax_localsgd.cli`
so that each file holds one setting's flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

from optax_localsgd.errors import UsageError


def add_federated_args(p: argparse.ArgumentParser) -> None:
  from optax_localsgd.harness.federated import FederatedTrainConfig
  d = FederatedTrainConfig()
  p.add_argument("--federated", action="store_true",
                 help="the federated setting (docs/federated.md): N clients with Dirichlet "
                 "label skew, K sampled per round, E local epochs of batches of B")
  p.add_argument("--alpha", type=float, default=None,
                 help="with --federated (required): Dirichlet concentration of the label skew, "
                 "> 0 (the paper: 0.1 and 100)")
  p.add_argument("--clients", type=int, default=None, metavar="N",
                 help=f"with --federated: number of clients N (default {d.num_clients})")
  p.add_argument("--clients-per-round", type=int, default=None, metavar="K",
                 help=f"with --federated: clients sampled per round (default "
                 f"{d.clients_per_round})")
  p.add_argument("--local-epochs", type=float, default=None, metavar="E",
                 help=f"with --federated: local epochs per round (default {d.local_epochs:g})")


_FEDERATED_FLAGS = ("alpha", "clients", "clients_per_round", "local_epochs")


def _flags(dests) -> str:
  return ", ".join("--" + d.replace("_", "-") for d in dests)


def check_mode(args, not_federated: tuple[str, ...]) -> None:
  """UsageError for a flag of the other mode: a federated one without --federated, or with it
  one the federated setting has no use for (changed from its default)."""
  if not args.federated:
    given = [d for d in _FEDERATED_FLAGS if getattr(args, d) is not None]
    if given:
      raise UsageError(f"{_flags(given)} {'applies' if len(given) == 1 else 'apply'} only "
                       f"with --federated.")
    return
  given = [d for d in not_federated if getattr(args, d) != args.subparser.get_default(d)]
  if given:
    raise UsageError(f"{_flags(given)} {'does' if len(given) == 1 else 'do'} not apply with "
                     f"--federated (its flags: --clients, --clients-per-round, --alpha, "
                     f"--local-epochs, -B; docs/federated.md).")
  if args.alpha is None:
    raise UsageError("--federated needs --alpha A, the Dirichlet concentration of the label "
                     "skew (> 0; the paper: 0.1 and 100).")


def _given(args, *dests: str) -> tuple[str, ...]:
  """The flags among ``dests`` that the command line sets."""
  return tuple(d for d in dests if getattr(args, d) is not None)


def _federated_config(args, **fields):
  """The FederatedTrainConfig of the flags; a flag not given keeps the config's default."""
  from optax_localsgd.harness.federated import FederatedTrainConfig
  given = {"num_clients": args.clients, "clients_per_round": args.clients_per_round,
           "local_epochs": args.local_epochs, "batch_size": args.batch_size, **fields}
  return FederatedTrainConfig(
      task=args.task, alpha=args.alpha, rounds=args.rounds, eval_every=args.eval_every,
      data_dir=args.data_dir, **{k: v for k, v in given.items() if v is not None})


def train_federated(args) -> int:
  from optax_localsgd import cli
  from optax_localsgd.harness import federated
  server = args.server or federated.FederatedTrainConfig().server
  meta, local_lr = None, args.local_lr
  if server in federated.LEARNED:
    k = args.clients_per_round or federated.FederatedTrainConfig().clients_per_round
    name = args.weights or federated.default_weights(server, args.task, k, args.alpha)
    if name is None:
      print(f"note: {server} runs with fresh, un-meta-trained weights (none bundled for "
            f"{args.task}; pass --weights).", file=sys.stderr)
    else:
      meta, meta_lr = federated.load_learned(server, name, k)
      local_lr = meta_lr if local_lr is None else local_lr
  cfg = _federated_config(args, server=server, seed=args.seed, local_lr=local_lr,
                          server_lr=args.server_lr, momentum=args.momentum)
  key, table = federated.table_hparams(cfg, overridden=_given(args, "local_lr", "server_lr"))
  if server in table:  # a baseline the paper tuned for this setting
    cfg = federated.with_hparams(cfg, table[server])
    print(f"note: {server} takes the paper's Table 7 values for {key} where no flag sets them: "
          f"local_lr {cfg.local_lr:g}, server_lr {cfg.server_hparams()['server_lr']:g}.",
          file=sys.stderr)
  hist = federated.train_federated(cfg, meta_params=meta, progress=not args.quiet)
  cli._write_outputs(pathlib.Path(args.out), "metrics", [hist],
                 f"{cfg.task}: {cfg.server}, N={cfg.num_clients}, K={cfg.clients_per_round}, "
                 f"alpha={cfg.alpha:g}")
  print(json.dumps({k: hist.get(k) for k in ("label", "wall_s", "test_accuracy")} | {
      "final_global_train_loss": hist["global_train_loss"][-1]}))
  return 0


def evaluate_federated(args) -> int:
  from optax_localsgd import cli
  from optax_localsgd.harness import federated, report
  methods = tuple(args.methods.split(",")) if args.methods else federated.DEFAULT_METHODS
  seeds = cli._parse_seeds(args.seeds)
  setting = _federated_config(args, local_lr=args.local_lr)
  weights = cli._weights_flags(args, {m: name for m in methods if (
      name := federated.default_weights(m, setting.task, setting.clients_per_round,
                                              setting.alpha))})
  name = args.name or (f"{setting.task}_fed_n{setting.num_clients}_k"
                       f"{setting.clients_per_round}_a{setting.alpha:g}")
  # --local-lr sets every baseline's client learning rate.
  key, table = federated.table_hparams(setting, overridden=_given(args, "local_lr"))
  runs = federated.run_all(setting, methods, seeds, weights, pathlib.Path(args.cache) / name,
                           hparams=table, progress=not args.quiet)
  summary = federated.summarize(runs)
  command = "optax-localsgd " + " ".join(args.argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  plotted = cli._save_plot(lambda p: report.plot_federated(setting, methods, runs, p),
                           out / f"{name}.png")
  text = report.federated_markdown(setting, methods, seeds, summary, command,
                                   f"{name}.png" if plotted else None, hparams_key=key)
  (out / f"{name}.md").write_text(text)
  (out / f"{name}.json").write_text(json.dumps(
      {"command": command, "setting": dataclasses.asdict(setting), "hparams_key": key,
       "summary": summary},
      indent=1) + "\n")
  print(text)
  print(f"wrote {out / (name + '.md')}, .json" + (" and .png" if plotted else ""),
        file=sys.stderr)
  return 0
