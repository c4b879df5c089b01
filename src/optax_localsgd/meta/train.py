"""The meta-training loop: outer steps, progress, logs, atomic checkpoints, resume, weights file.

``meta_train(cfg, out_dir)`` writes into ``out_dir``:

* ``checkpoint.npz`` every ``checkpoint_every`` outer steps and on SIGINT/SIGTERM (atomic);
* ``log.json``: per outer step meta-loss, learning rate, gradient norm, non-finite counts
  (rewritten with every checkpoint);
* ``meta_loss.png``: the meta-loss curve;
* ``weights.safetensors``: the meta-trained optimizer with its metadata (``pretrained.load``
  reads it).

With ``resume=True`` it continues from ``checkpoint.npz`` exactly where it stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_localsgd import _version, compression, data, engine, pretrained, tasks
from optax_localsgd.errors import UsageError
from optax_localsgd.io import checkpoint as ckpt
from optax_localsgd.io.atomic import atomic_write
from optax_localsgd.meta.problem import (PESConfig, TaskGroup, init_meta_state, initial_loss,
                                         make_outer_step)
from optax_localsgd.transforms.learned import features
from optax_localsgd.transforms.learned.nominal import nesterov_init
from optax_localsgd.transforms.learned.params import MetaParams, init_lagg_a, init_lopt_a
from optax_localsgd.util.progress import Progress
from optax_localsgd.util.signals import StopFlag

# Examples (of the fixed evaluation subset) over which the divergence guard's initial loss is
# measured.
INIT_LOSS_EXAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class FederatedMeta:
  """Meta-train in the federated setting (paper appendix E.6, FedLOpt): the training split is
  cut among ``num_clients`` clients with Dirichlet(``alpha``) label skew, every round samples K
  of them (:attr:`MetaTrainConfig.workers`) and each runs ``local_epochs`` epochs of SGD on
  batches of :attr:`MetaTrainConfig.batch_size` (``engine.make_federated_round_fn``). The
  partition is drawn once per task group, from the run's seed (plus the group's index).
  """
  alpha: float
  num_clients: int = 400
  local_epochs: float = 1.0

  def __post_init__(self):
    if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha)
            and self.alpha > 0):
      raise UsageError(f"--alpha must be a finite number > 0, got {self.alpha!r}.")
    if not isinstance(self.num_clients, int) or self.num_clients < 1:
      raise UsageError(f"--clients must be an integer >= 1, got {self.num_clients!r}.")
    if not (math.isfinite(self.local_epochs) and self.local_epochs > 0):
      raise UsageError(f"--local-epochs must be a finite number > 0, got {self.local_epochs!r}.")


@dataclasses.dataclass(frozen=True)
class MetaTrainConfig:
  """A meta-training run.

  Attributes:
    optimizer: ``"lopt_a"`` or ``"lagg_a"``.
    tasks: task specs (names, optionally with overrides: ``fmnist_mlp:standardize=false``);
      several make a multi-task meta-batch, ``tasks_per_estimate`` split evenly between them.
    workers, local_steps, batch_size: K, H, B of the inner local SGD.
    local_lr: the workers' SGD learning rate (the paper does not state it for meta-training;
      the default is the tuned local-SGD value for Fashion-MNIST, paper Table 5).
    tasks_per_estimate: optimizees per PES estimate (each an antithetic pair).
    pes: PES / outer-optimizer hyperparameters.
    seed: seed of the meta-parameters' init, the tasks and the perturbations.
    checkpoint_every: outer steps between checkpoints.
    data_dir: dataset directory (``None``: the loaders' search paths).
    init_from: start from these weights (a bundled name or a path) instead of a fresh init,
      e.g. to fine-tune H = 4 weights for H = 16; ``None``: fresh init from ``seed``.
    feature_set: feature set of a fresh init (``"ada-v2"``, the authors'; or ``"ada-v1"``).
    output_init_scale: factor on a fresh init's output-layer weights (1: the authors' init;
      0: start from an optimizer that takes no step).
    compress: meta-train for workers that compress their deltas with this spec
      (:func:`optax_localsgd.compression.from_spec`, e.g. ``"top_k:0.01:ef"``); each inner
      problem carries its workers' compressor states. ``None``: uncompressed.
    nominal_init: ``"nesterov:LR,MOMENTUM"`` starts a fresh ada-v2 init as DiLoCo's outer
      Nesterov step with that learning rate and momentum
      (:func:`optax_localsgd.transforms.learned.nominal.nesterov_init`); ``None``: the plain
      init. Not with ``init_from``.
    federated: meta-train in the federated setting (:class:`FederatedMeta`; ``workers`` is
      then K, the clients sampled per round, and ``local_steps`` is unused: each client runs
      its own ``ceil(E * n_i / B)`` steps); ``None``: K workers on homogeneous shards.
  """
  optimizer: str = "lopt_a"
  tasks: tuple[str, ...] = ("fmnist_mlp",)
  workers: int = 8
  local_steps: int = 4
  batch_size: int = 128
  local_lr: float = 0.3
  tasks_per_estimate: int = 8
  pes: PESConfig = PESConfig()
  seed: int = 0
  checkpoint_every: int = 100
  data_dir: str | None = None
  init_from: str | None = None
  feature_set: str = "ada-v2"
  output_init_scale: float = 1.0
  compress: str | None = None
  nominal_init: str | None = None
  federated: FederatedMeta | None = None

  def __post_init__(self):
    self.compressor()  # a bad spec fails here, before any data is loaded
    if self.federated is not None:
      if self.compress is not None:
        raise UsageError("--compress is not supported with --federated: the federated round "
                         "sends its clients' deltas uncompressed.")
      if self.workers > self.federated.num_clients:
        raise UsageError(f"cannot sample K={self.workers} clients per round of "
                         f"N={self.federated.num_clients} without replacement.")
    if self.nominal_init is not None:
      self.nominal()
      if self.init_from is not None:
        raise UsageError("--init nesterov:... shapes a fresh init; it cannot be combined with "
                         "--init-from.")
      if self.feature_set != "ada-v2":
        raise UsageError("--init nesterov:... needs --feature-set ada-v2.")
    if self.optimizer not in ("lopt_a", "lagg_a"):
      raise UsageError(f"--optimizer must be lopt_a or lagg_a, got {self.optimizer!r}.")
    if not self.tasks:
      raise UsageError(f"No task given; available: {', '.join(tasks.available_tasks())}.")
    for spec in self.tasks:
      try:
        tasks.from_spec(spec)
      except ValueError as e:
        raise UsageError(f"Unknown task or bad task spec {spec!r}: {e}") from e
    if self.tasks_per_estimate % len(self.tasks):
      raise UsageError(f"--tasks-per-estimate {self.tasks_per_estimate} must be a multiple "
                       f"of the number of tasks ({len(self.tasks)}).")
    for name in ("workers", "local_steps", "batch_size", "tasks_per_estimate",
                 "checkpoint_every"):
      if getattr(self, name) < 1:
        raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}.")
    features.check_feature_set(self.feature_set)
    if not (math.isfinite(self.output_init_scale) and self.output_init_scale >= 0):
      raise UsageError(f"output_init_scale must be a finite number >= 0, got "
                       f"{self.output_init_scale}.")
    if not (math.isfinite(self.local_lr) and self.local_lr > 0):
      raise UsageError(f"local_lr must be a positive finite number, got {self.local_lr}.")
    p = self.pes
    if p.outer_steps < 1 or p.truncation < 1 or not 1 <= p.min_inner <= p.max_inner:
      raise UsageError("need outer_steps >= 1, truncation >= 1, 1 <= min_inner <= max_inner.")
    if not p.sigma > 0:
      raise UsageError(f"sigma must be > 0, got {p.sigma}.")
    if p.loss_clip is not None and not (math.isfinite(p.loss_clip) and p.loss_clip > 1):
      raise UsageError(f"loss_clip must be a finite number > 1 (a multiple of the loss at "
                       f"initialisation), got {p.loss_clip}.")
    if p.grad_clip is not None and not (math.isfinite(p.grad_clip) and p.grad_clip > 0):
      raise UsageError(f"grad_clip must be a positive finite number, got {p.grad_clip}.")

  def nominal(self) -> tuple[float, float] | None:
    """:attr:`nominal_init` parsed as ``(server_lr, momentum)`` (``None`` when unset)."""
    if self.nominal_init is None:
      return None
    kind, _, rest = self.nominal_init.partition(":")
    try:
      lr, momentum = (float(x) for x in rest.split(","))
    except ValueError:
      lr = momentum = None
    if kind != "nesterov" or lr is None or not (math.isfinite(lr) and lr > 0) or not (
        0 < momentum < 1):
      raise UsageError(f"--init {self.nominal_init!r}: expected nesterov:LR,MOMENTUM with "
                       f"LR > 0 and MOMENTUM in (0, 1), e.g. nesterov:1.0,0.95.")
    return lr, momentum

  def compressor(self) -> compression.Compression | None:
    """:attr:`compress` parsed (a bad spec is a :class:`UsageError`)."""
    return compression.from_flag(self.compress)

  def identity(self) -> dict:
    """What a checkpoint must match to be resumed (everything that shapes the state)."""
    d = dataclasses.asdict(self)
    d.pop("checkpoint_every")
    d.pop("data_dir")
    if self.init_from is None:
      d.pop("init_from")  # runs started before the option existed keep their identity
    if self.pes.loss_clip is None:
      d["pes"].pop("loss_clip")  # likewise
    if self.pes.grad_clip is None:
      d["pes"].pop("grad_clip")  # likewise
    if self.pes.perturb is None:
      d["pes"].pop("perturb")  # likewise
    else:
      d["pes"]["perturb"] = list(self.pes.perturb)
    # Fields added later leave the identity when at the value older runs implicitly had.
    if self.feature_set == "ada-v1":
      d.pop("feature_set")
    if self.output_init_scale == 1.0:
      d.pop("output_init_scale")
    if self.compress is None:
      d.pop("compress")
    if self.nominal_init is None:
      d.pop("nominal_init")
    if self.federated is None:
      d.pop("federated")
    else:
      d.pop("local_steps")  # unused: each client's step count comes from its data
    d["tasks"] = list(self.tasks)
    return d


def initial_theta(cfg: MetaTrainConfig) -> MetaParams:
  """Fresh meta-parameters from ``cfg.seed``, or ``cfg.init_from``'s after checking them."""
  if cfg.init_from is None:
    key = jax.random.PRNGKey(cfg.seed)
    kw = dict(feature_set=cfg.feature_set, output_init_scale=cfg.output_init_scale)
    theta = (init_lopt_a(key, **kw) if cfg.optimizer == "lopt_a"
             else init_lagg_a(key, cfg.workers, **kw))
    nominal = cfg.nominal()
    return theta if nominal is None else nesterov_init(theta, *nominal)
  theta = pretrained.load(cfg.init_from, num_workers=cfg.workers)
  if theta.config.kind != cfg.optimizer:
    raise UsageError(f"--init-from {cfg.init_from} holds {theta.config.kind} weights, but "
                     f"--optimizer is {cfg.optimizer}.")
  return jax.tree.map(jnp.asarray, theta)


def _inner_data(cfg: MetaTrainConfig, task: tasks.Task, arrays, seed: int):
  """``(round config, device data)`` of one task group: K workers on homogeneous shards, or
  with :attr:`MetaTrainConfig.federated` N Dirichlet-skewed clients drawn from ``seed``."""
  per_worker = cfg.optimizer == "lagg_a"
  fed = cfg.federated
  if fed is None:
    round_cfg = engine.RoundConfig(cfg.workers, cfg.local_steps, cfg.batch_size,
                                   per_worker_deltas=per_worker, compression=cfg.compressor())
    n = tasks.num_items(task, arrays)
    return round_cfg, engine.DeviceData(arrays, data.split_homogeneous(n, cfg.workers, seed))
  cdata = engine.dirichlet_client_data(task, arrays, fed.num_clients, fed.alpha, seed)
  return (engine.federated_config(cdata.sizes, cfg.workers, cfg.batch_size, fed.local_epochs,
                                  per_worker), cdata)


def _setup(cfg: MetaTrainConfig):
  per_task = cfg.tasks_per_estimate // len(cfg.tasks)
  groups, datas = [], []
  for i, name in enumerate(cfg.tasks):
    task = tasks.from_spec(name)
    arrays = tasks.load_split(task, "train", cfg.data_dir)
    round_cfg, inner_data = _inner_data(cfg, task, arrays, cfg.seed + i)
    datas.append(jax.device_put(inner_data))
    init_loss = (None if cfg.pes.loss_clip is None else initial_loss(
        task, engine.eval_batches(task, arrays, INIT_LOSS_EXAMPLES), cfg.seed + i))
    groups.append(TaskGroup(task, per_task, round_cfg, cfg.local_lr, init_loss))
  key = jax.random.PRNGKey(cfg.seed)
  state = init_meta_state(initial_theta(cfg), tuple(groups), jax.random.fold_in(key, 1), cfg.pes)
  return tuple(groups), tuple(datas), state


@functools.lru_cache(maxsize=4)
def _jitted_outer_step(groups: tuple[TaskGroup, ...], pes: PESConfig):
  """One compiled outer step per configuration, reused when a run is resumed in-process."""
  return jax.jit(make_outer_step(groups, pes), donate_argnums=(0,))


def meta_train(cfg: MetaTrainConfig, out_dir: str | pathlib.Path, *, resume: bool = False,
               progress: bool = True, command: str | None = None,
               stop_after: int | None = None, export_partial: bool = False,
               time_budget_s: float | None = None,
               snapshot_every: int | None = None) -> dict[str, Any]:
  """Meta-train (or resume) and write the outputs described in the module docstring.

  Args:
    cfg: the run.
    out_dir: output directory.
    resume: continue from ``out_dir/checkpoint.npz`` (an error if there is none, or if it was
      written for another configuration).
    progress: draw a progress bar.
    command: the command line to record in the weights' metadata.
    stop_after: stop (with a checkpoint) after this many outer steps in this call, as an
      interruption would; ``None`` runs to ``cfg.pes.outer_steps``; 0 runs none (with
      ``resume`` and ``export_partial``: export the checkpoint as it is).
    export_partial: also write ``weights.safetensors`` when stopping before ``cfg.pes.outer_steps``;
      its metadata then records the steps done and the steps the schedule planned.
    time_budget_s: stop (with a checkpoint) after the first outer step that ends this many
      seconds after the call started (compilation included), e.g. to fit a device call of
      fixed length; ``None``: no limit.
    snapshot_every: also keep the weights every this many outer steps, as
      ``out_dir/snapshots/weights_step{N:06d}.safetensors``, so that a long run's history can be
      evaluated afterwards (PES runs can get worse as well as better); ``None``: none.

  Returns:
    ``{"log": ..., "weights": path or None, "step": int, "interrupted": bool}``.
  """
  t_call = time.perf_counter()
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  ck_path = out / "checkpoint.npz"
  # Checked before the data are loaded and the tasks set up, so the mistake is reported at once.
  if resume and not ck_path.exists():
    raise UsageError(f"--resume: no checkpoint at {ck_path}.")
  if not resume and ck_path.exists():
    raise UsageError(f"{ck_path} exists: pass --resume to continue that run, or choose "
                     f"another --out.")
  groups, datas, state = _setup(cfg)
  log = {"config": cfg.identity(), "command": command or " ".join(sys.argv), "step": [],
         "meta_loss": [], "lr": [], "grad_norm": [], "nonfinite_pairs": [], "wall_s": []}
  if resume:
    state, meta = ckpt.load_checkpoint(ck_path, state, {"config": cfg.identity()})
    log = meta["log"]

  outer_step = _jitted_outer_step(groups, cfg.pes)
  start = int(state.step)
  total = cfg.pes.outer_steps
  bar = Progress(total, desc=f"meta-train {cfg.optimizer}", enabled=progress, unit="steps",
                 initial=start)

  saved_at = None  # the step of the last checkpoint this call wrote

  def save():
    nonlocal saved_at
    ckpt.save_checkpoint(ck_path, state, {"config": cfg.identity(), "log": log})
    # The log as far as the checkpoint: a long (--quiet, background) run can be watched.
    atomic_write(out / "log.json", lambda f: f.write((json.dumps(log) + "\n").encode()))
    saved_at = int(state.step)

  interrupted = False
  t_prev = time.perf_counter()
  t_start = t_call
  # Every signal only sets the flag: the loop always reaches its checkpoint.
  with StopFlag(second_sigint_raises=False) as stop:
    while int(state.step) < total and not (stop_after is not None and stop_after <= 0):
      state, m = outer_step(state, datas)
      m = jax.device_get(m)
      now = time.perf_counter()
      step = int(state.step)
      log["step"].append(step)
      log["meta_loss"].append(float(m["meta_loss"]))
      log["lr"].append(float(m["lr"]))
      log["grad_norm"].append(float(m["grad_norm"]))
      log["nonfinite_pairs"].append(int(m["nonfinite_pairs"]))
      # Pairs restarted by the divergence guard (key absent in logs of older runs).
      log.setdefault("capped_pairs", []).append(int(m["capped_pairs"]))
      log["wall_s"].append(now - t_prev)
      t_prev = now
      if int(m["nonfinite_pairs"]) or not bool(m["grad_finite"]):
        bar.write(f"step {step}: {int(m['nonfinite_pairs'])} non-finite pair(s) ignored"
                  + ("" if bool(m["grad_finite"]) else "; non-finite gradient, step skipped"))
      bar.update(1, meta_loss=float(m["meta_loss"]))
      reached_stop = ((stop_after is not None and step - start >= stop_after) or
                      (time_budget_s is not None and now - t_start >= time_budget_s))
      if snapshot_every and step % snapshot_every == 0:
        (out / "snapshots").mkdir(exist_ok=True)
        _export(out / "snapshots" / f"weights_step{step:06d}{pretrained.SUFFIX}", state, cfg,
                log, command)
      if step % cfg.checkpoint_every == 0 or stop.signum is not None or reached_stop:
        save()
      if stop.signum is not None or reached_stop:
        interrupted = step < total
        if stop.signum is not None:
          bar.write(f"signal {stop.signum}: checkpoint written to {ck_path}; "
                    f"resume with --resume.")
        break
  bar.close()
  if saved_at != int(state.step):  # the end of the schedule, unless the loop just saved it
    save()
  _plot(log, out / "meta_loss.png", cfg)
  weights = None
  if int(state.step) >= total or export_partial:
    weights = _export(out / pretrained.RUN_WEIGHTS, state, cfg, log, command)
  return {"log": log, "weights": weights, "step": int(state.step), "interrupted": interrupted}


def _export(path: pathlib.Path, state, cfg: MetaTrainConfig, log: dict,
            command: str | None) -> pathlib.Path:
  """Write θ as a weight file with the run's metadata (``pretrained.load`` reads it)."""
  final = [x for x in log["meta_loss"][-50:] if math.isfinite(x)]
  pretrained.save(path, jax.device_get(state.theta), {
      "optimizer": cfg.optimizer, "K": cfg.workers,
      # Federated: each client runs ceil(E * n_i / B) steps, so there is no single H.
      "H": None if cfg.federated else cfg.local_steps,
      "federated": None if cfg.federated is None else dataclasses.asdict(cfg.federated),
      "batch_size": cfg.batch_size, "local_lr": cfg.local_lr, "tasks": list(cfg.tasks),
      "outer_steps": int(state.step), "outer_steps_planned": cfg.pes.outer_steps,
      "pes": dataclasses.asdict(cfg.pes),
      "tasks_per_estimate": cfg.tasks_per_estimate, "seed": cfg.seed,
      "output_init_scale": cfg.output_init_scale, "nominal_init": cfg.nominal_init,
      # The workers' compression the weights were meta-trained for (None: uncompressed).
      "compress": (None if cfg.compressor() is None else cfg.compressor().spec()),
      "init_from": cfg.init_from,
      "init_from_sha256": (pretrained.file_sha256(pretrained.resolve(cfg.init_from))
                           if cfg.init_from else None),
      "final_meta_loss_mean_last_50": float(np.mean(final)) if final else None,
      "nonfinite_pairs": int(state.nonfinite_pairs),
      "capped_pairs": sum(log.get("capped_pairs", [])),
      "nonfinite_grads": int(state.nonfinite_grads),
      "package_version": _version.__version__,
      # Where the outer steps ran (the last call's device, e.g. "NVIDIA H200" or "cpu").
      "device": jax.devices()[0].device_kind,
      # The command that started the run (a resumed or exported run keeps it).
      "command": log.get("command") or command or " ".join(sys.argv)})
  return path


def _plot(log: dict, path: pathlib.Path, cfg: MetaTrainConfig) -> None:
  from optax_localsgd.util import plotting
  try:
    fig = plotting.figure(figsize=(6, 4), layout="constrained")
  except plotting.PlotsUnavailable:
    return  # the JSON log has the same numbers; plots need the 'plot' extra.
  ax = fig.subplots()
  y = np.asarray(log["meta_loss"], float)
  ax.plot(log["step"], y, alpha=0.35, linewidth=0.8, label="per step")
  if len(y) >= 20:
    w = max(len(y) // 50, 5)
    ax.plot(log["step"][w - 1:], np.convolve(y, np.ones(w) / w, "valid"), label=f"mean of {w}")
  ax.set(xlabel="outer step", ylabel="meta-loss (mean local training loss)",
         title=f"{cfg.optimizer} on {'+'.join(cfg.tasks)}, K={cfg.workers}, H={cfg.local_steps}")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.savefig(path, dpi=110)
