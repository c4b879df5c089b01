"""Markdown tables and PNG curves for the evaluation harness (``optax-localsgd evaluate``)."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from optax_localsgd import tasks
from optax_localsgd.harness import evaluation
from optax_localsgd.util.plotting import figure


def _fmt(stat: Sequence[float], n_total: int, digits: int, *, count: bool = False,
         empty: str | None = None) -> str:
  mean, se, n = stat
  if n == 0:
    return empty or ("not reached" if count else "–")
  s = f"{mean:.{digits}f}" + (f" ± {se:.{digits}f}" if math.isfinite(se) else "")
  return s + (f" ({n}/{n_total})" if count and n < n_total else "")


def markdown(cfg: evaluation.EvalConfig, summary: Mapping[str, Mapping[str, Any]],
             command: str, png_name: str | None = None, *,
             borrowed_hparams_key: str | None = None) -> str:
  """The results page: setup, the command, the table, how to read it.

  ``borrowed_hparams_key``: the sweep entry the baselines' hyperparameters come from when it is
  not this setting's own (no sweep was run for it); the page then says so.
  """
  n_seeds = len(cfg.seeds)
  lines = [
      f"# {cfg.task}, K = {cfg.workers}, H = {cfg.local_steps}, B = {cfg.batch_size}",
      "",
      f"{n_seeds} seeds ({', '.join(map(str, cfg.seeds))}), {cfg.rounds} communication rounds "
      "per run. Reproduce with:",
      "",
      "```bash",
      command,
      "```",
      "",
      "| optimizer | speedup over local SGD | rounds to training loss "
      f"{cfg.target_loss:g} | final training loss | test accuracy |",
      "| --- | --- | --- | --- | --- |",
  ]
  for m in cfg.methods:
    row = summary[m]
    lines.append(
        f"| {evaluation.LABELS[m]} | {_fmt(row['speedup'], n_seeds, 2, count=True)} | "
        f"{_fmt(row['rounds_to_target'], n_seeds, 0, count=True)} | "
        f"{_fmt(row['final_train_loss'], n_seeds, 4)} | {_fmt(row['test_accuracy'], n_seeds, 4)} |")
  lines += [
      "",
      "Mean ± standard error over seeds; `(n/N)`: only n of the N seeds reached the loss, and "
      "the mean is over those.",
      "",
      "*Training loss* is the global model's cross-entropy on a fixed subset of 10,000 training "
      "examples (the same for every run), evaluated after every round up to round "
      f"{cfg.eval_dense_until} and every {cfg.eval_every} rounds after that; it is not the "
      "workers' local loss. *Speedup* (paper Table 2): per seed, the round at which local SGD "
      "first reaches its lowest training loss divided by the round at which the optimizer first "
      "reaches that loss. *Test accuracy*: the final global model on the full test split.",
      "",
      inputs_line(cfg.task),
  ]
  hp = {m: summary[m].get("hparams") for m in cfg.methods if summary[m].get("hparams")}
  if hp:
    lines += ["", "Hyperparameters:", ""]
    if borrowed_hparams_key:
      lines += [f"The baselines use the values tuned for `{borrowed_hparams_key}`: no sweep was "
                "run for this setting, so they are not tuned for it (nor are the learned "
                "optimizers, whose weights are named below).", ""]
    lines += [f"- {evaluation.LABELS[m]}: `{json.dumps(v, sort_keys=True)}`" for m, v in hp.items()]
  if png_name:
    lines += ["", f"![training loss curves]({png_name})"]
  return "\n".join(lines) + "\n"


def inputs_line(task_spec: str) -> str:
  """The results pages' sentence on the task's input preprocessing (``Task.preprocessing``)."""
  return f"*Inputs*: {tasks.from_spec(task_spec).preprocessing()}."


def seed_curves(hists: Sequence[Mapping[str, Any]],
                key: str = "global_train_loss") -> tuple[np.ndarray, np.ndarray]:
  """``(eval rounds, values (seeds, rounds))`` of ``key`` over the runs of one method; a run
  that stopped early or lacks ``key`` is left out (0 rows if none has it)."""
  rounds = np.asarray(hists[0]["eval_rounds"])
  values = np.asarray([h[key] for h in hists if len(h.get(key, ())) == len(rounds)], np.float64)
  return rounds, values.reshape(-1, len(rounds))


def plot_curves(cfg: evaluation.EvalConfig, runs: Mapping[str, list[dict]],
                path: pathlib.Path) -> None:
  """Mean training loss over seeds (line) and its min-max band, per method, log-scale."""
  fig = figure(figsize=(7, 4.5), layout="tight")
  ax = fig.subplots()
  for m in cfg.methods:
    rounds, losses = seed_curves(runs[m])
    mean = np.nanmean(losses, axis=0)
    (line,) = ax.plot(rounds, mean, label=evaluation.LABELS[m], lw=1.5)
    ax.fill_between(rounds, np.nanmin(losses, 0), np.nanmax(losses, 0), alpha=0.15,
                    color=line.get_color(), lw=0)
  ax.axhline(cfg.target_loss, color="grey", lw=0.8, ls=":")
  ax.set_yscale("log")
  ax.set_xlabel("communication round")
  ax.set_ylabel("training loss (global model, fixed 10k subset)")
  # Two lines: a task spec with overrides would run past the figure's edge on one.
  ax.set_title(f"{cfg.task}, K={cfg.workers}, H={cfg.local_steps}\nmean over "
               f"{len(cfg.seeds)} seeds, band = min-max", fontsize=10)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, which="both")
  fig.savefig(path, dpi=120)


def plot_federated(setting, methods: Sequence[str], runs: Mapping[str, list[dict]],
                   path: pathlib.Path) -> None:
  """The paper's Figure 17 for one alpha: the global model's test accuracy against
  communication rounds, mean over seeds (line) and min-max band, per method; beside it the
  training loss on the fixed subset (log scale)."""
  from optax_localsgd.harness.federated import LABELS
  fig = figure(figsize=(11, 4.2), layout="constrained")
  ax_a, ax_l = fig.subplots(1, 2)
  for m in methods:
    for ax, key in ((ax_a, "eval_test_accuracy"), (ax_l, "global_train_loss")):
      rounds, ys = seed_curves(runs[m], key)
      if not len(ys):
        continue  # no test split on disk, or every seed stopped early
      (line,) = ax.plot(rounds, np.nanmean(ys, 0), label=LABELS[m], lw=1.4)
      ax.fill_between(rounds, np.nanmin(ys, 0), np.nanmax(ys, 0), alpha=0.15,
                      color=line.get_color(), lw=0)
  ax_a.set(xlabel="communication round", ylabel="test accuracy (global model, full test split)")
  ax_l.set(xlabel="communication round", ylabel="training loss (global model, fixed subset)",
           yscale="log")
  for ax in (ax_a, ax_l):
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
  n = len(next(iter(runs.values())))
  fig.suptitle(f"{setting.task}, N={setting.num_clients}, K={setting.clients_per_round}, "
               f"alpha={setting.alpha:g}: mean over {n} seeds, band = min-max")
  fig.savefig(path, dpi=110)


def _diverged_cell(per_seed: Sequence[Mapping[str, Any]], n_total: int) -> str:
  """``k/N (round A–B)``: how many seeds diverged and the rounds they stopped at; ``–``: none."""
  stopped = sorted(s["diverged_at_round"] for s in per_seed
                   if s.get("diverged_at_round") is not None)
  if not stopped:
    return "–"
  span = f"{stopped[0]}–{stopped[-1]}" if stopped[-1] > stopped[0] else f"{stopped[0]}"
  return f"{len(stopped)}/{n_total} (round {span})"


def federated_markdown(setting, methods: Sequence[str], seeds: Sequence[int],
                       summary: Mapping[str, Mapping[str, Any]], command: str,
                       png: str | None = None, hparams_key: str | None = None) -> str:
  """The results page of ``optax-localsgd evaluate --federated``: setting, command, table of
  final test accuracy (and final training loss) per method, and the hyperparameters.

  ``setting`` is the :class:`~optax_localsgd.harness.federated.FederatedTrainConfig` the runs
  share (its ``server`` and ``seed`` are replaced per run); ``png`` the curves' file name,
  linked below the table when given; ``hparams_key`` the entry of the paper's Table 7 the
  baselines' learning rates come from (``None``: untuned defaults).
  """
  from optax_localsgd.harness.federated import LABELS
  n = len(seeds)
  s = setting
  lines = [
      f"# {s.task}, federated: N = {s.num_clients} clients, K = {s.clients_per_round} per "
      f"round, Dirichlet alpha = {s.alpha:g}",
      "",
      f"{n} seeds ({', '.join(map(str, seeds))}), {s.rounds} communication rounds per run; "
      f"every sampled client runs E = {s.local_epochs:g} local epoch(s) of SGD on batches of "
      f"B = {s.batch_size}. Reproduce with:",
      "",
      "```bash",
      command,
      "```",
      "",
      "| optimizer | test accuracy | final training loss | diverged |",
      "| --- | --- | --- | --- |",
  ]
  for m in methods:
    row = summary[m]
    lines.append(f"| {LABELS[m]} | {_fmt(row['test_accuracy'], n, 4, count=True, empty='–')} | "
                 f"{_fmt(row['final_train_loss'], n, 4, count=True, empty='–')} | "
                 f"{_diverged_cell(row['per_seed'], n)} |")
  lines += [
      "",
      "Mean ± standard error over the seeds that did not diverge (`(n/N)`: only n of the N "
      "did). *Diverged*: runs whose global training loss became non-finite, and the round at "
      "which they stopped. Each seed fixes the Dirichlet partition of the "
      "training split among the clients, the initial model, the clients sampled every round and "
      "their minibatches; every method sees the same ones. *Test accuracy*: the final global "
      "model on the full test split. *Training loss*: the final global model's cross-entropy on "
      "a fixed subset of 10,000 training examples.",
      "",
      inputs_line(s.task),
      "",
      ("Hyperparameters (the baselines' client and server learning rates: the paper's "
       f"Table 7, entry `{hparams_key}` of the hyperparameter file, unless a flag of the "
       "command sets them; "
       if hparams_key else
       "Hyperparameters (untuned for this setting: the registry's server defaults; ")
      + "beta1 0.9, beta2 0.99, tau 1e-3 for the adaptive servers, as in Table 7; a learned "
      "optimizer's clients use the local learning rate it was meta-trained with):",
      "",
  ]
  lines += [f"- {LABELS[m]}: `{json.dumps(summary[m]['hparams'], sort_keys=True)}`"
            for m in methods]
  if png:
    lines += ["", f"![test accuracy and training loss against rounds]({png})"]
  return "\n".join(lines) + "\n"
