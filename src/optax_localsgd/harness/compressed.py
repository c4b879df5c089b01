"""Several compressors side by side (paper appendix E.5): one results page and its figures.

``optax-localsgd evaluate --compress none,top_k:0.1,top_k:0.01`` runs the evaluation of
:mod:`optax_localsgd.harness.evaluation` once per compressor (each with its own baseline
hyperparameters and, where they ship, weights meta-trained for it) and writes one page with:

* a table per compressor and method: final training loss, rounds to the target loss, speedup
  over local SGD *with the same compressor*, the bits sent per round and test accuracy;
* the paper's Figure 13: training loss against ``log2`` of the bits the workers have sent so
  far (``round * bits_per_round``, the uplink, in the encoding of
  :mod:`optax_localsgd.compression.spec`), one colour per method and one line style per
  compressor;
* the paper's Figure 14: training loss against rounds, one panel per compressor.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from optax_localsgd.harness import evaluation, report
from optax_localsgd.harness.report import _fmt
from optax_localsgd.util.plotting import figure

LINE_STYLES = ("-", "--", ":", "-.")


def label(spec: str | None) -> str:
  """How a compressor is named on the page: ``top-0.01``, or ``uncompressed``."""
  if spec is None:
    return "uncompressed"
  return spec.replace("top_k:", "top-").replace(":ef", " + error feedback")


def slug(spec: str | None) -> str:
  """A file-name-safe form of a spec (the cache folder of its runs): ``top_k_0.01``."""
  return "none" if spec is None else spec.replace(":", "_")


def markdown(cfgs: Sequence[evaluation.EvalConfig],
             summaries: Sequence[Mapping[str, Mapping[str, Any]]],
             hparams_keys: Sequence[str], command: str, png_name: str | None = None) -> str:
  """The page: setup, command, one table over every compressor and method, the
  hyperparameters and where they come from, the figure."""
  c0 = cfgs[0]
  n = len(c0.seeds)
  lines = [
      f"# {c0.task}, K = {c0.workers}, H = {c0.local_steps}, B = {c0.batch_size}: "
      "compressed deltas",
      "",
      f"{n} seeds ({', '.join(map(str, c0.seeds))}), {c0.rounds} communication rounds per run, "
      f"compressors: {', '.join(label(c.compress) for c in cfgs)}. Reproduce with:",
      "",
      "```bash",
      command,
      "```",
      "",
      f"| compressor | optimizer | final training loss | rounds to training loss "
      f"{c0.target_loss:g} | speedup over local SGD (same compressor) | Mbit sent per round | "
      "test accuracy |",
      "| --- | --- | --- | --- | --- | --- | --- |",
  ]
  for cfg, summary in zip(cfgs, summaries):
    for m in cfg.methods:
      row = summary[m]
      bits = row.get("bits_per_round")
      lines.append(
          f"| {label(cfg.compress)} | {evaluation.LABELS[m]} | "
          f"{_fmt(row['final_train_loss'], n, 4)} | "
          f"{_fmt(row['rounds_to_target'], n, 0, count=True)} | "
          f"{_fmt(row['speedup'], n, 2, count=True)} | "
          f"{'–' if bits is None else f'{bits / 1e6:.3g}'} | "
          f"{_fmt(row['test_accuracy'], n, 4)} |")
  lines += [
      "",
      "Mean ± standard error over seeds; `(n/N)`: only n of the N seeds reached the loss. Every "
      "worker compresses its own delta; the bits are what the K workers send per round (values "
      "plus indices for top-k, docs/compression.md), not the broadcast of the new weights. "
      "*Training loss*: the global model's cross-entropy on a fixed subset of 10,000 training "
      "examples. *Speedup* (paper Table 2): per seed, the round at which local SGD with the "
      "same compressor first reaches its lowest training loss, divided by the round at which "
      "the optimizer first reaches that loss.",
      "",
      report.inputs_line(c0.task),
      "",
      "Hyperparameters and weights:",
      "",
  ]
  for cfg, summary, key in zip(cfgs, summaries, hparams_keys):
    lines.append(f"- {label(cfg.compress)} (baselines from `{key}`):")
    lines += [f"  - {evaluation.LABELS[m]}: `{json.dumps(summary[m]['hparams'], sort_keys=True)}`"
              for m in cfg.methods]
  if png_name:
    lines += ["", "Left: the paper's Figure 13 (training loss against the bits sent); the "
              "others: its Figure 14 (training loss against rounds), one panel per compressor.",
              "", f"![training loss against bits and rounds]({png_name})"]
  return "\n".join(lines) + "\n"


def plot(cfgs: Sequence[evaluation.EvalConfig], runs: Sequence[Mapping[str, list[dict]]],
         path: pathlib.Path) -> None:
  """Figure 13 (loss against log2 bits sent, all compressors) and Figure 14 (loss against
  rounds, a panel per compressor); mean over seeds, log-scale loss."""
  methods = list(dict.fromkeys(m for cfg in cfgs for m in cfg.methods))
  colors = {m: f"C{i}" for i, m in enumerate(methods)}
  panels = 1 + len(cfgs)
  cols = 2 if panels == 4 else panels  # three compressors (the paper's): a 2 x 2 grid
  rows = -(-panels // cols)
  fig = figure(figsize=(5.2 * cols, 4.2 * rows), layout="constrained")
  axes = np.atleast_1d(fig.subplots(rows, cols, sharey=True, squeeze=False).ravel())
  for i, (cfg, by_method) in enumerate(zip(cfgs, runs)):
    style = LINE_STYLES[i % len(LINE_STYLES)]
    for m in cfg.methods:
      rounds, losses = report.seed_curves(by_method[m])
      mean = np.nanmean(losses, axis=0)
      bits = by_method[m][0].get("bits_per_round")
      if bits:
        keep = rounds > 0  # round 0 has sent nothing: log2(0) is not on the axis
        axes[0].plot(np.log2(rounds[keep] * float(bits)), mean[keep], color=colors[m], ls=style,
                     lw=1.3, label=f"{evaluation.LABELS[m]}, {label(cfg.compress)}")
      axes[1 + i].plot(rounds, mean, color=colors[m], lw=1.4, label=evaluation.LABELS[m])
    axes[1 + i].set(title=label(cfg.compress), xlabel="communication round")
    axes[1 + i].axhline(cfg.target_loss, color="grey", lw=0.8, ls=":")
    axes[1 + i].legend(fontsize=7)
  axes[0].set(title="loss against bits sent (Figure 13)",
              xlabel="log2 of the bits sent by the workers so far",
              ylabel="training loss (global model, fixed 10k subset)", yscale="log")
  axes[0].legend(fontsize=6, ncol=1)
  for ax in axes:
    ax.grid(alpha=0.3, which="both")
  c0 = cfgs[0]
  fig.suptitle(f"{c0.task}, K={c0.workers}, H={c0.local_steps}: mean over {len(c0.seeds)} seeds")
  fig.savefig(path, dpi=110)
