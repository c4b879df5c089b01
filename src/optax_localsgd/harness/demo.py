"""What ``optax-localsgd demo`` compares, with which values, and its table.

The setting is the paper's Fashion-MNIST 2-layer MLP with K = 8 workers, H = 4 local steps and
B = 128: local SGD and SlowMo with the paper's tuned values (Table 5), DiLoCo (not in the
paper) with the values this package's sweep stored for the setting, and every bundled learned
optimizer for it.
"""

from __future__ import annotations

from optax_localsgd import pretrained
from optax_localsgd.transforms.learned.params import MetaParams

SETTING = dict(task="fmnist_mlp", workers=8, local_steps=4, batch_size=128)
# Paper Table 5: tuned local learning rates and SlowMo's (gamma, alpha, beta).
PAPER_RUNS = (
    ("local SGD", dict(server="local_sgd", local_lr=0.3)),
    ("SlowMo", dict(server="slowmo", local_lr=0.1, server_lr=1.0, momentum=0.95)),
)
SWEPT = ("diloco",)  # read from tuned_hparams.json under HPARAMS_KEY
HPARAMS_KEY = "fmnist_mlp/K8/H4/B128"
TARGETS = (0.5, 0.3)  # training losses of the rounds-to columns


def runs() -> list[tuple[str, dict, MetaParams | None]]:
  """(label, ``TrainConfig`` overrides, meta-params or ``None``) of each demo run, in order."""
  from optax_localsgd.harness import sweep
  from optax_localsgd.harness.evaluation import LABELS
  out: list[tuple[str, dict, MetaParams | None]] = [(l, kw, None) for l, kw in PAPER_RUNS]
  tuned = sweep.tuned_hparams(HPARAMS_KEY)
  out += [(LABELS[m], dict(server=m, **tuned[m]), None) for m in SWEPT]
  k, h = SETTING["workers"], SETTING["local_steps"]
  for server in ("lagg_a", "lopt_a"):
    name = pretrained.default_name(server, SETTING["task"], k, h)
    if name is not None:
      local_lr = pretrained.metadata(name)["info"].get("local_lr", 0.3)
      out.append((f"{LABELS[server]} ({name})", dict(server=server, local_lr=local_lr),
                  pretrained.load(name, num_workers=k)))
  return out


def train_all(rounds: int, *, seed: int = 0, eval_every: int = 10, data_dir: str | None = None,
              progress: bool = True) -> list[dict]:
  """``trainer.train`` histories of every run of :func:`runs`, ``rounds`` rounds each."""
  from optax_localsgd.harness import trainer
  histories = []
  for label, kw, meta in runs():
    cfg = trainer.TrainConfig(**SETTING, rounds=rounds, seed=seed, eval_every=eval_every,
                              data_dir=data_dir, **kw)
    histories.append(trainer.train(cfg, meta_params=meta, progress=progress, label=label))
  return histories


def table(histories: list[dict], rounds: int) -> str:
  """Markdown comparison: final training loss (nats), rounds to each of :data:`TARGETS`, test
  accuracy (%) and wall time (s) of each history."""
  from optax_localsgd.harness.trainer import rounds_to_reach
  head = (f"| optimizer | training loss @ {rounds} | "
          + " | ".join(f"rounds to {t}" for t in TARGETS) + " | test accuracy | time (s) |")
  lines = [head, "|" + " --- |" * (4 + len(TARGETS))]
  for h in histories:
    reach = [rounds_to_reach(h, t) for t in TARGETS]
    lines.append(f"| {h['label']} | {h['global_train_loss'][-1]:.4f} | "
                 + " | ".join("-" if r is None else str(r) for r in reach)
                 + f" | {100 * h.get('test_accuracy', float('nan')):.2f}% | {h['wall_s']:.0f} |")
  lines.append("\nTraining loss: the global model's loss on a fixed 10,000-example subset of "
               "the training set; rounds are counted at evaluation points.")
  return "\n".join(lines)
