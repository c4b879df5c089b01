"""Evaluation harness: baselines and learned optimizers over held-out seeds (paper Tables 2-3).

For one task and one (K, H, B), every method trains from the same initialisations (one per
seed) for the same number of rounds; each run's history is cached as JSON, so an interrupted
evaluation resumes where it stopped and a finished one is recomputed only when its
configuration changes. The metrics are computed from the global model's training loss on a
fixed training subset (``engine.EVAL_SUBSET_SEED``), never from the workers' local losses:

* speedup over local SGD (paper Table 2): for each seed, local SGD's minimum training loss
  ``L*`` over the run and the round ``R_local`` where it first reaches it; a method's speedup
  is ``R_local / R_method(L*)``. A method that never reaches ``L*`` has speedup ``< 1`` and is
  counted as not reaching it;
* rounds to a fixed training loss (paper Table 3, 0.2 for FMNIST);
* final training loss and test accuracy.

Means are reported with their standard error over seeds (``std(ddof=1) / sqrt(n)``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from optax_localsgd import compression, pretrained
from optax_localsgd.errors import UsageError
from optax_localsgd.harness import trainer
from optax_localsgd.transforms.learned.params import MetaParams

# Seeds of the evaluation. Meta-training uses its own seed stream (``MetaTrainConfig.seed``,
# 0 for the bundled weights) and the sweeps use SWEEP_SEED, so none of these was seen before.
DEFAULT_SEEDS = tuple(range(100, 110))
BASELINES = ("local_sgd", "slowmo", "diloco", "sgd", "adam")
DATA_PARALLEL = ("sgd", "adam")
LEARNED = ("lopt_a", "lagg_a")
LABELS = {"local_sgd": "Local SGD", "slowmo": "SlowMo", "diloco": "DiLoCo",
          "sgd": "SGD (data-parallel)", "adam": "Adam (data-parallel)", "lopt_a": "LOpt-A",
          "lagg_a": "LAgg-A"}


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """What to evaluate.

  Attributes:
    task: task name. workers: K. local_steps: H. batch_size: B per worker and local step.
    rounds: communication rounds per run.
    seeds: initialisation / data seeds, one run per method and seed.
    methods: names from :data:`BASELINES` and :data:`LEARNED`.
    weights: learned method -> bundled name or path of its weight file.
    target_loss: the training loss of the rounds-to-target column (Table 3).
    eval_every: rounds between evaluations after ``eval_dense_until``.
    eval_dense_until: evaluate after every round up to here (one-round resolution).
    data_dir: dataset folder (``None``: the loaders' search paths).
    compress: every method's workers compress their deltas with this spec
      (:func:`optax_localsgd.compression.from_spec`); ``None``: uncompressed. The
      data-parallel baselines send no deltas, so they cannot be evaluated with it.
  """
  task: str = "fmnist_mlp"
  workers: int = 8
  local_steps: int = 4
  batch_size: int = 128
  rounds: int = 1000
  seeds: tuple[int, ...] = DEFAULT_SEEDS
  methods: tuple[str, ...] = BASELINES + LEARNED
  weights: tuple[tuple[str, str], ...] = ()
  target_loss: float = 0.2
  eval_every: int = 10
  eval_dense_until: int = 300
  data_dir: str | None = None
  compress: str | None = None

  def __post_init__(self):
    compression.from_flag(self.compress)
    dense = [m for m in self.methods if m in DATA_PARALLEL]
    if self.compress is not None and dense:
      raise UsageError(f"--compress applies to local SGD's worker deltas; drop the "
                       f"data-parallel {dense} from --methods.")
    unknown = sorted(set(self.methods) - set(BASELINES) - set(LEARNED))
    if unknown:
      raise UsageError(f"Unknown methods {unknown}; choose from {BASELINES + LEARNED}.")
    if "local_sgd" not in self.methods:
      raise UsageError("The speedup is relative to local SGD: include 'local_sgd' in methods.")
    missing = [m for m in self.methods if m in LEARNED and m not in dict(self.weights)]
    if missing:
      raise UsageError(f"No weight file given for {missing}; pass --weights METHOD=NAME.")
    if not self.seeds:
      raise UsageError("At least one seed is needed.")


def run_config(cfg: EvalConfig, method: str, seed: int, hparams: Mapping[str, Any],
               meta_local_lr: float | None = None) -> trainer.TrainConfig:
  """The :class:`trainer.TrainConfig` of one run.

  Baselines take their tuned hyperparameters from ``hparams[method]`` (keys ``local_lr``,
  ``server_lr``, ``momentum``); learned optimizers train their workers with the learning rate
  they were meta-trained with (``meta_local_lr``).
  """
  if method in LEARNED:
    hp = {"local_lr": meta_local_lr}
  else:
    if method not in hparams:
      raise UsageError(f"No tuned hyperparameters for {method!r} on {cfg.task} "
                       f"K={cfg.workers} H={cfg.local_steps}; run `optax-localsgd sweep` first.")
    hp = dict(hparams[method])
  return trainer.TrainConfig(
      task=cfg.task, server=method, workers=cfg.workers, local_steps=cfg.local_steps,
      batch_size=cfg.batch_size, rounds=cfg.rounds, seed=seed,
      local_lr=float(hp.get("local_lr") or 0.1), server_lr=hp.get("server_lr"),
      momentum=hp.get("momentum"), eval_every=cfg.eval_every,
      eval_dense_until=cfg.eval_dense_until, data_dir=cfg.data_dir, compress=cfg.compress)


def _fingerprint(train_cfg: trainer.TrainConfig, weights_sha: str | None) -> str:
  d = dataclasses.asdict(train_cfg)
  d.pop("data_dir")  # where the data lives does not change the run
  if d["compress"] is None:
    d.pop("compress")  # runs cached before the field existed keep their fingerprint
  return hashlib.sha256(json.dumps([d, weights_sha], sort_keys=True).encode()).hexdigest()[:16]


def run_all(cfg: EvalConfig, hparams: Mapping[str, Any], cache_dir: pathlib.Path, *,
            progress: bool = True, log: Callable[[str], None] = print) -> dict[str, list[dict]]:
  """Runs (or loads from ``cache_dir``) every method x seed; returns method -> histories.

  A cached history is reused only if its fingerprint (the full run configuration and the
  weight file's sha256) matches, so changing a hyperparameter or a weight file reruns it.
  """
  cache_dir.mkdir(parents=True, exist_ok=True)
  weights = dict(cfg.weights)
  metas: dict[str, MetaParams] = {}
  shas: dict[str, str] = {}
  local_lrs: dict[str, float] = {}
  for m in cfg.methods:
    if m in LEARNED:
      metas[m] = pretrained.load(weights[m])
      if metas[m].config.kind != m:
        raise UsageError(f"--weights {m}={weights[m]} holds {metas[m].config.kind} weights.")
      info = pretrained.metadata(weights[m]).get("info", {})
      local_lrs[m] = float(info.get("local_lr", 0.3))
      shas[m] = pretrained.file_sha256(pretrained.resolve(weights[m]))
  out: dict[str, list[dict]] = {m: [] for m in cfg.methods}
  for m in cfg.methods:
    for seed in cfg.seeds:
      tc = run_config(cfg, m, seed, hparams, local_lrs.get(m))
      fp = _fingerprint(tc, shas.get(m))
      out[m].append(cached_run(
          cache_dir / f"{m}_seed{seed}.json", fp,
          lambda: trainer.train(tc, meta_params=metas.get(m), progress=progress,
                                label=f"{LABELS[m]} seed {seed}"),
          weights=weights.get(m), log=log))
  return out


def cached_run(path: pathlib.Path, fingerprint: str, train: Callable[[], dict], *,
               weights: str | None, log: Callable[[str], None] = print) -> dict:
  """The history cached at ``path`` if its fingerprint matches, else ``train()``'s, written
  there atomically with its fingerprint (an interruption never leaves half a file).

  ``weights`` (the name the learned method's weights were given, or None) is set on the
  history either way: the fingerprint pins the weight file by its sha256, so a cached run used
  this very file, whatever it was called when it was cached.
  """
  if path.is_file():
    cached = json.loads(path.read_text())
    if cached.get("fingerprint") == fingerprint:
      cached["weights"] = weights
      return cached
    log(f"{path.name}: configuration changed, rerunning.")
  hist = train()
  hist["fingerprint"], hist["weights"] = fingerprint, weights
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(hist) + "\n")
  tmp.replace(path)
  return hist


# --------------------------------------------------------------------------------------------
# Metrics.


def speedup(method_hist: Mapping[str, Any], local_hist: Mapping[str, Any]) -> float | None:
  """Table 2's speedup of one run over the local-SGD run of the same seed (None: not reached)."""
  losses = np.asarray(local_hist["global_train_loss"], np.float64)
  best = float(np.nanmin(losses))
  r_local = trainer.rounds_to_reach(local_hist, best)
  r = trainer.rounds_to_reach(method_hist, best)
  if r is None or r_local is None:
    return None
  return r_local / max(r, 1)


def mean_se(values: Sequence[float | None]) -> tuple[float, float, int]:
  """Mean, standard error and count of the values that are not ``None`` (nan if none)."""
  v = np.asarray([x for x in values if x is not None and math.isfinite(x)], np.float64)
  if v.size == 0:
    return math.nan, math.nan, 0
  se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
  return float(v.mean()), se, int(v.size)


def summarize(cfg: EvalConfig, runs: Mapping[str, list[dict]]) -> dict[str, dict[str, Any]]:
  """Per method: per-seed and aggregated speedup, rounds to target, final loss, test accuracy."""
  local = {h["config"]["seed"]: h for h in runs["local_sgd"]}
  table = {}
  for m, hists in runs.items():
    per_seed = []
    for h in hists:
      seed = h["config"]["seed"]
      per_seed.append({
          "seed": seed,
          "speedup": speedup(h, local[seed]),
          "rounds_to_target": trainer.rounds_to_reach(h, cfg.target_loss),
          "final_train_loss": float(h["global_train_loss"][-1]),
          "test_accuracy": h.get("test_accuracy"),
      })
    table[m] = {"per_seed": per_seed, "n": len(per_seed)}
    for key in ("speedup", "rounds_to_target", "final_train_loss", "test_accuracy"):
      table[m][key] = mean_se([s[key] for s in per_seed])
  return table
