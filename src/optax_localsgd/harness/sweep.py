"""Hyperparameter sweeps of the baselines over the paper's grids (appendix D).

The grids:

* SGD and Adam (data-parallel): learning rate in :data:`LR_GRID`;
* local SGD: the workers' learning rate gamma in :data:`GAMMA_GRID` (server: plain averaging);
* SlowMo: gamma in :data:`GAMMA_GRID`, slow learning rate alpha = c / gamma with c in
  :data:`LR_GRID`, momentum beta in :data:`BETA_GRID` (484 points);
* DiLoCo (not in the paper; its own defaults are Nesterov 0.9 and outer lr 0.7): gamma in
  :data:`GAMMA_GRID`, outer learning rate in :data:`DILOCO_LR_GRID`, momentum in
  :data:`DILOCO_MOMENTUM_GRID`.

The ``"reduced"`` grids keep every gamma and the paper's useful decades of alpha and beta, for
machines where the full SlowMo grid is too slow; the JSON records which grid was used.

Search: successive halving. Every candidate trains ``min_rounds`` rounds on :data:`SWEEP_SEED`;
the best ``1/eta`` by the global model's training loss at the end (the paper tunes for training
loss) go on for ``eta`` times more rounds, until a rung reaches ``rounds``. Diverged runs
(non-finite loss) rank last. All candidates of a rung share the initialisation, the worker split
and the minibatches (common random numbers), and run as one ``vmap`` over their
hyperparameters, so a rung compiles once however many candidates it has.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_localsgd import data, engine, tasks
from optax_localsgd.errors import UsageError
from optax_localsgd.harness import servers, trainer

SWEEP_SEED = 1000  # not an evaluation seed (evaluation.DEFAULT_SEEDS) nor a meta-training one
LR_GRID = (1.0, 5e-1, 1e-1, 5e-2, 1e-2, 5e-3, 1e-3, 5e-4, 1e-4, 5e-5, 1e-5)
GAMMA_GRID = (1.0, 0.5, 0.3, 0.1)
BETA_GRID = (0.99, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)
# Outer learning rates of 1 and above and momentum 0.95 too: with Nesterov momentum the best
# outer step of local SGD can exceed plain averaging.
DILOCO_LR_GRID = (2.0, 1.4, 1.0, 0.7, 0.5, 0.3, 0.1)
DILOCO_MOMENTUM_GRID = (0.95, 0.9, 0.8)
REDUCED = {"lr": (1.0, 5e-1, 1e-1, 5e-2, 1e-2, 5e-3, 1e-3), "c": (1.0, 5e-1, 1e-1, 5e-2, 1e-2),
           "beta": (0.95, 0.9, 0.8, 0.7, 0.5)}
SWEPT = ("local_sgd", "slowmo", "diloco", "sgd", "adam")


def grid(method: str, which: str = "paper") -> list[dict[str, float]]:
  """Candidate hyperparameters (``local_lr`` / ``server_lr`` / ``momentum``) for ``method``."""
  if which not in ("paper", "reduced"):
    raise UsageError(f"grid must be 'paper' or 'reduced', got {which!r}.")
  lrs = LR_GRID if which == "paper" else REDUCED["lr"]
  cs = LR_GRID if which == "paper" else REDUCED["c"]
  betas = BETA_GRID if which == "paper" else REDUCED["beta"]
  if method in ("sgd", "adam"):
    return [{"server_lr": a} for a in lrs]
  if method == "local_sgd":
    return [{"local_lr": g, "server_lr": 1.0} for g in GAMMA_GRID]
  if method == "slowmo":
    return [{"local_lr": g, "server_lr": c / g, "momentum": b}
            for g, c, b in itertools.product(GAMMA_GRID, cs, betas)]
  if method == "diloco":
    return [{"local_lr": g, "server_lr": a, "momentum": b}
            for g, a, b in itertools.product(GAMMA_GRID, DILOCO_LR_GRID, DILOCO_MOMENTUM_GRID)]
  raise UsageError(f"No sweep grid for {method!r}; sweepable: {SWEPT}.")


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """One sweep: task, (K, H, B), the final horizon and the halving schedule."""
  task: str = "fmnist_mlp"
  workers: int = 8
  local_steps: int = 4
  batch_size: int = 128
  rounds: int = 1000
  min_rounds: int = 37
  eta: int = 3
  grid: str = "paper"
  eval_examples: int = 10_000
  data_dir: str | None = None

  def key(self) -> str:
    """The entry name in the hyperparameter file, e.g. ``fmnist_mlp/K8/H4/B128``."""
    return f"{self.task}/K{self.workers}/H{self.local_steps}/B{self.batch_size}"

  def rungs(self) -> list[int]:
    """Rounds of each halving rung, ending at ``rounds``."""
    if self.min_rounds < 1 or self.eta < 2 or self.rounds < self.min_rounds:
      raise UsageError("Need 1 <= min_rounds <= rounds and eta >= 2.")
    r, out = self.min_rounds, []
    while r * self.eta <= self.rounds:
      out.append(r)
      r *= self.eta
    return out + [self.rounds]


@functools.lru_cache(maxsize=2)
def _sweep_data(task_name: str, data_dir: str | None, workers: int, eval_examples: int):
  """(task, data on the device, eval batches, their sizes): loaded once per setting, not once
  per rung and method."""
  task = tasks.from_spec(task_name)
  arrays = tasks.load_split(task, "train", data_dir)
  dev_data = jax.device_put(engine.DeviceData(
      arrays, data.split_homogeneous(tasks.num_items(task, arrays), workers, SWEEP_SEED)))
  batches = engine.eval_batches(task, arrays, eval_examples)
  sizes = jnp.asarray([len(b["x"]) for b in batches], jnp.float32)
  return task, dev_data, batches, sizes


def final_losses(cfg: SweepConfig, method: str, candidates: list[dict[str, float]],
                 rounds: int) -> list[float]:
  """Global training loss after ``rounds`` rounds for each candidate (one vmapped program)."""
  task, dev_data, batches, sizes = _sweep_data(cfg.task, cfg.data_dir, cfg.workers,
                                               cfg.eval_examples)
  key = jax.random.PRNGKey(SWEEP_SEED)
  hp_names = sorted(candidates[0])

  def run(hp: dict[str, jax.Array]) -> jax.Array:
    # Hyperparameters are traced values here, so every candidate shares one compilation.
    server = servers.make_server(
        method, num_workers=cfg.workers, local_learning_rate=hp.get("local_lr", 0.1),
        server_learning_rate=hp.get("server_lr"), momentum=hp.get("momentum"))
    round_fn = trainer.round_fn_for(task, server, cfg.workers, cfg.local_steps,
                                    cfg.batch_size, hp.get("local_lr", 0.1))
    params = task.init(jax.random.fold_in(key, 0))
    params, _, _ = engine.make_multi_round_fn(round_fn)(
        params, server.tx.init(params), jax.random.fold_in(key, 1), 0, jnp.arange(rounds),
        dev_data)
    losses = jnp.stack([task.loss(params, b) for b in batches])
    return (losses * sizes).sum() / sizes.sum()

  stacked = {n: jnp.asarray([c[n] for c in candidates], jnp.float32) for n in hp_names}
  out = np.asarray(jax.device_get(jax.jit(jax.vmap(run))(stacked)), np.float64)
  return [float(v) if math.isfinite(v) else math.inf for v in out]


def sweep_method(cfg: SweepConfig, method: str, *,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
  """Successive halving over ``grid(method)``; returns the winner and every rung's scores."""
  candidates = grid(method, cfg.grid)
  rungs = []
  for i, rounds in enumerate(cfg.rungs()):
    losses = final_losses(cfg, method, candidates, rounds)
    scored = sorted(zip(losses, range(len(candidates))), key=lambda t: t[0])
    scored = [(loss, candidates[j]) for loss, j in scored]
    rungs.append({"rounds": rounds, "scores": [{"loss": s, **hp} for s, hp in scored]})
    log(f"{method}: rung {i} ({rounds} rounds, {len(scored)} candidates) best "
        f"{scored[0][0]:.4f} at {scored[0][1]}")
    candidates = [hp for _, hp in scored[:max(1, math.ceil(len(scored) / cfg.eta))]]
  return {"best": rungs[-1]["scores"][0], "rungs": rungs}


def update_file(path: pathlib.Path, cfg: SweepConfig, method: str, result: Mapping[str, Any],
                command: str) -> None:
  """Stores one method's sweep result under ``cfg.key()`` in the JSON file at ``path``.

  Other entries of an existing file are kept; a missing file is created with its folders.
  """
  data = json.loads(path.read_text()) if path.is_file() else {}
  path.parent.mkdir(parents=True, exist_ok=True)
  entry = data.setdefault(cfg.key(), {})
  best = {k: v for k, v in result["best"].items() if k != "loss"}
  entry[method] = {"hparams": best, "train_loss": result["best"]["loss"],
                   "sweep": {"command": command, "seed": SWEEP_SEED, "grid": cfg.grid,
                             "rungs": result["rungs"]}}
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
  tmp.replace(path)


def tuned_hparams(key: str, path: pathlib.Path | None = None) -> dict[str, dict[str, float]]:
  """Method -> best hyperparameters for ``key`` (e.g. ``fmnist_mlp/K8/H4/B128``).

  Reads ``path`` or else the file shipped with the package (``tuned_hparams.json``).
  """
  if path is None:
    path = pathlib.Path(__file__).with_name("tuned_hparams.json")
  if not path.is_file():
    raise UsageError(f"No hyperparameter file at {path}; run `optax-localsgd sweep`.")
  data = json.loads(path.read_text())
  if key not in data:
    raise UsageError(f"{path} has no tuned hyperparameters for {key}; it has "
                     f"{sorted(data) or 'none'}. Run `optax-localsgd sweep` for it.")
  return {m: e["hparams"] for m, e in data[key].items()}
