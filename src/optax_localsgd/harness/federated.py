"""Federated training and its evaluation (paper appendix E.6): ``optax-localsgd train
--federated`` and ``optax-localsgd evaluate --federated``.

The training split is cut among N clients by :func:`optax_localsgd.data.dirichlet_partition`
(label skew alpha, seeded by the run's seed); every round the engine's
:func:`~optax_localsgd.engine.make_federated_round_fn` samples K of them, each runs E local
epochs of SGD on minibatches of B examples, and the server optimizer steps on the mean of
their deltas. As in :func:`optax_localsgd.harness.trainer.train`, rounds run in chunks of
``eval_every``, each one ``lax.scan``-ned in a single jitted call
(:func:`~optax_localsgd.engine.make_multi_round_fn`), and the global model is evaluated after
every chunk on the fixed 10,000-example training subset; the final model on the full test
split.

Methods: every server of :mod:`optax_localsgd.harness.servers` that steps on the clients'
deltas, plus ``"fedavg"`` (``local_sgd`` at server learning rate 1: the new weights are the
clients' mean) and ``"scaffold"`` (``local_sgd(lr_g)`` and SCAFFOLD's control variates on the
clients, :func:`optax_localsgd.baselines.scaffold`). The data-parallel ``sgd`` / ``adam``
send gradients, not deltas, and have no federated form here. The adaptive servers take the
paper's Table 7 constants (beta1 0.9, beta2 0.99, tau 1e-3). Where the paper's Table 7 has the
setting (:func:`table_hparams`: FMNIST MLP and CIFAR-10 CNN, N 400, K 10, B 20, E 1, alpha 100
or 0.1), the baselines take its client and server learning rates; elsewhere the registry's
server learning rates and ``local_lr`` (untuned). A learned optimizer's clients use the learning
rate it was meta-trained with (its weight file's ``info.local_lr``), as in
:mod:`optax_localsgd.harness.evaluation`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import pathlib
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from optax_localsgd import compression, data, engine, pretrained, tasks
from optax_localsgd.errors import UsageError
from optax_localsgd.harness import evaluation, servers, sweep, trainer
from optax_localsgd.transforms import baselines
from optax_localsgd.transforms.learned.params import MetaParams
from optax_localsgd.util.progress import Progress

# The registry's servers that read client deltas, and the two federated-only names.
FEDERATED_ONLY = ("fedavg", "scaffold")
METHODS = tuple(sorted(set(servers.available_servers()) - set(evaluation.DATA_PARALLEL)
                       | set(FEDERATED_ONLY)))
LEARNED = evaluation.LEARNED
DEFAULT_METHODS = ("fedavg", "fedadam", "fedyogi", "fedadagrad", "scaffold", "lopt_a")
LABELS = {**evaluation.LABELS, "fedavg": "FedAvg", "fedadam": "FedAdam", "fedyogi": "FedYogi",
          "fedadagrad": "FedAdagrad", "scaffold": "SCAFFOLD"}


def _positive_int(name: str, value: Any) -> None:
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
    raise UsageError(f"{name} must be an integer >= 1, got {value!r}.")


def _positive_float(name: str, value: Any) -> None:
  if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
    raise UsageError(f"{name} must be a finite number > 0, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class FederatedTrainConfig:
  """One federated training run.

  Attributes:
    task: a classification task spec (:func:`optax_localsgd.tasks.from_spec`); the Dirichlet
      split needs labels, so not ``text_lm``.
    server: a name of :data:`METHODS`: ``"fedavg"``, ``"scaffold"``, or a registry server
      (``fedadam``, ``fedyogi``, ``fedadagrad``, ``local_sgd``, ``slowmo``, ``diloco``,
      ``lopt_a``, ``lagg_a``).
    num_clients: N, clients the training split is cut into.
    clients_per_round: K, clients sampled (without replacement) every round, ``K <= N``.
    alpha: the Dirichlet concentration of the label skew, ``> 0`` (paper: 0.1 and 100).
    local_epochs: E, passes a sampled client makes over its data per round (may be
      fractional); client i takes ``ceil(E * n_i / B)`` steps.
    batch_size: B_loc, examples per local step.
    rounds: communication rounds.
    seed: seed of the partition, the model init, the client sampling and the minibatches.
    local_lr: the clients' SGD learning rate.
    server_lr: the server's learning rate (``None``: the optimizer's default; FedAvg has none,
      SCAFFOLD's is lr_g, default 1).
    momentum: SlowMo's beta / DiLoCo's momentum (``None``: the default); only for those.
    eval_every: rounds between evaluations of the global model (also the scan chunk).
    eval_examples: size of the fixed training subset for the global loss.
    data_dir: where the dataset is (``None``: the loader's search paths).
  """
  task: str = "fmnist_mlp"
  server: str = "fedavg"
  num_clients: int = 400
  clients_per_round: int = 10
  alpha: float = 0.1
  local_epochs: float = 1.0
  batch_size: int = 20
  rounds: int = 100
  seed: int = 0
  local_lr: float = 0.1
  server_lr: float | None = None
  momentum: float | None = None
  eval_every: int = 10
  eval_examples: int = 10_000
  data_dir: str | None = None

  def __post_init__(self):
    if self.server not in METHODS:
      hint = (" It is a data-parallel baseline: it sends gradients, not client deltas."
              if self.server in evaluation.DATA_PARALLEL else "")
      raise UsageError(f"Unknown federated server {self.server!r}.{hint} Choose from: "
                       f"{', '.join(METHODS)}.")
    for name in ("num_clients", "clients_per_round", "batch_size", "rounds", "eval_every",
                 "eval_examples"):
      _positive_int(name, getattr(self, name))
    if self.clients_per_round > self.num_clients:
      raise UsageError(f"clients_per_round K={self.clients_per_round} exceeds num_clients "
                       f"N={self.num_clients} (--clients-per-round, --clients): the K clients "
                       f"of a round are sampled without replacement, so K <= N.")
    _positive_float("alpha (the Dirichlet concentration)", self.alpha)
    _positive_float("local_epochs", self.local_epochs)
    _positive_float("local_lr", self.local_lr)
    if self.server_lr is not None:
      if self.server == "fedavg":
        raise UsageError("fedavg has no server learning rate (the new weights are the clients' "
                         "mean); use server local_sgd for one.")
      if self.server in LEARNED:
        raise UsageError(f"{self.server} has no server learning rate; its step is learned.")
      _positive_float("server_lr", self.server_lr)
    if self.momentum is not None and self.server not in ("slowmo", "diloco"):
      raise UsageError(f"momentum applies to slowmo and diloco only, not {self.server}.")
    task = tasks.from_spec(self.task)  # an unknown task or override fails here, before any data
    if task.kind != "classification":
      raise UsageError(f"Federated training splits the data by label: {self.task} is a "
                       f"{task.kind} task, not a classification one.")

  def hparams_key(self) -> str:
    """This setting's entry in the hyperparameter file, e.g.
    ``fmnist_mlp/fed/N400/K10/B20/E1/a0.1`` (:func:`table_hparams`)."""
    return (f"{self.task}/fed/N{self.num_clients}/K{self.clients_per_round}/B{self.batch_size}"
            f"/E{self.local_epochs:g}/a{self.alpha:g}")

  def server_hparams(self) -> dict[str, float | None]:
    """The server's effective ``{"server_lr", "momentum"}`` (defaults filled in)."""
    if self.server == "fedavg":
      return {"server_lr": 1.0, "momentum": None}
    if self.server == "scaffold":
      return {"server_lr": 1.0 if self.server_lr is None else self.server_lr, "momentum": None}
    lr, mom = servers.defaults(self.server)
    return {"server_lr": lr if self.server_lr is None else self.server_lr,
            "momentum": mom if self.momentum is None else self.momentum}


def table_hparams(setting: FederatedTrainConfig, path: pathlib.Path | None = None, *,
                  overridden: Sequence[str] = ()
                  ) -> tuple[str | None, dict[str, dict[str, float]]]:
  """``(key, method -> {"local_lr", "server_lr"})`` of the paper's Table 7 for ``setting`` (the
  entries ``TASK/fed/...`` of ``tuned_hparams.json``), or ``(None, {})`` where the table does not
  have this task, N, K, B, E and alpha. ``overridden``: the hyperparameters the user set with
  flags, left out of every entry so that the flags win."""
  key = setting.hparams_key()
  try:
    table = sweep.tuned_hparams(key, path)
  except UsageError:
    return None, {}
  return key, {m: {k: v for k, v in hp.items() if k not in overridden}
               for m, hp in table.items()}


def with_hparams(cfg: FederatedTrainConfig, hparams: Mapping[str, float]
                 ) -> FederatedTrainConfig:
  """``cfg`` with a method's tabled ``local_lr`` / ``server_lr`` (:func:`table_hparams`)."""
  return dataclasses.replace(cfg, **{k: float(v) for k, v in hparams.items()
                                     if k in ("local_lr", "server_lr")})


def build_server(cfg: FederatedTrainConfig, meta_params: MetaParams | None = None):
  """``(server_tx, client_hook or None, per_worker_deltas)`` for ``cfg.server``."""
  hp = cfg.server_hparams()
  if cfg.server == "scaffold":
    tx, hook = baselines.scaffold(cfg.local_lr, hp["server_lr"])
    return tx, hook, False
  name = "local_sgd" if cfg.server == "fedavg" else cfg.server
  server = servers.make_server(
      name, num_workers=cfg.clients_per_round, local_learning_rate=cfg.local_lr,
      server_learning_rate=hp["server_lr"], momentum=hp["momentum"], meta_params=meta_params,
      seed=cfg.seed)
  return server.tx, None, server.per_worker_deltas


def train_federated(cfg: FederatedTrainConfig, meta_params: MetaParams | None = None,
                    progress: bool = True, label: str | None = None) -> dict[str, Any]:
  """Run ``cfg`` and return its history, in the layout of :func:`trainer.train`.

  Returns:
    ``{"config", "label", "rounds", "train_loss", "eval_rounds", "global_train_loss",
    "global_train_accuracy", "bits_per_round", "server_hparams", "clients", "test_loss",
    "test_accuracy", "eval_test_accuracy", "wall_s"}``: ``train_loss`` is each round's mean
    over the K sampled clients of their mean local loss; ``global_*`` the global model on the
    fixed training subset after rounds ``eval_rounds``; ``eval_test_accuracy`` the global model's
    accuracy on the full test split after the same rounds (the paper's Figure 17 curve) and
    ``test_*`` the final model's (all absent when there is no test split on disk). ``bits_per_round`` is what the K clients upload per
    round, uncompressed (SCAFFOLD's clients also send their control-variate change: twice as
    much). ``clients`` describes the partition: ``sizes`` (min, median, max examples) and
    ``local_steps`` (the loop length every client runs, the largest client's step count).
  """
  task = tasks.from_spec(cfg.task)
  train_arrays = tasks.load_split(task, "train", cfg.data_dir)
  cdata = engine.dirichlet_client_data(task, train_arrays, cfg.num_clients, cfg.alpha,
                                       cfg.seed)
  server_tx, hook, per_worker = build_server(cfg, meta_params)
  fcfg = engine.federated_config(cdata.sizes, cfg.clients_per_round, cfg.batch_size,
                                 cfg.local_epochs, per_worker)
  round_fn = engine.make_federated_round_fn(
      task.loss, engine.batch_fn_for(task), baselines.worker_sgd(cfg.local_lr), server_tx, fcfg,
      client_hook=hook)

  key = jax.random.PRNGKey(cfg.seed)
  params = task.init(jax.random.fold_in(key, 0))
  state = engine.init_federated_state(server_tx, fcfg, params, hook)
  dev_data = jax.device_put(cdata)
  round_key = jax.random.fold_in(key, 1)
  run_chunk = jax.jit(engine.make_multi_round_fn(round_fn))

  evaluate = trainer.make_evaluator(task, engine.eval_batches(task, train_arrays,
                                                              cfg.eval_examples))
  try:
    test_arrays = tasks.load_split(task, "test", cfg.data_dir)
  except data.DatasetNotFoundError:
    test_arrays = None  # no held-out split on disk: report the training metrics only.
  evaluate_test = None if test_arrays is None else trainer.make_evaluator(
      task, engine.eval_batches(task, test_arrays, 10**9))
  sizes = np.asarray(cdata.sizes)
  bits = compression.round_bits(None, params, cfg.clients_per_round)
  hist: dict[str, Any] = {
      "config": dataclasses.asdict(cfg), "label": label or cfg.server, "rounds": [],
      "train_loss": [], "eval_rounds": [], "global_train_loss": [], "global_train_accuracy": [],
      "bits_per_round": bits * (2 if cfg.server == "scaffold" else 1),
      "server_hparams": cfg.server_hparams(),
      "clients": {"sizes": [int(sizes.min()), float(np.median(sizes)), int(sizes.max())],
                  "local_steps": fcfg.local_steps}}
  if evaluate_test is not None:
    hist["eval_test_accuracy"] = []

  def record_eval(r):
    loss, acc = evaluate(params)
    hist["eval_rounds"].append(r)
    hist["global_train_loss"].append(loss)
    hist["global_train_accuracy"].append(acc)
    if evaluate_test is not None:
      hist["test_loss"], hist["test_accuracy"] = evaluate_test(params)
      hist["eval_test_accuracy"].append(hist["test_accuracy"])
    return loss

  t0 = time.perf_counter()
  bar = Progress(cfg.rounds, desc=label or cfg.server, enabled=progress)
  record_eval(0)
  done = 0
  while done < cfg.rounds:
    n_chunk = min(cfg.eval_every, cfg.rounds - done)
    params, state, losses = run_chunk(params, state, round_key, done, jnp.arange(n_chunk),
                                      dev_data)
    losses = np.asarray(jax.device_get(losses), np.float64)
    hist["rounds"].extend(range(done + 1, done + n_chunk + 1))
    hist["train_loss"].extend(losses.tolist())
    done += n_chunk
    last = record_eval(done)
    bar.update(n_chunk, local_loss=float(losses[-1]), global_loss=last)
    if not math.isfinite(last):
      bar.write(f"{label or cfg.server}: global loss is {last} at round {done}; stopping.")
      break
  bar.close()
  hist["wall_s"] = time.perf_counter() - t0
  return hist


# --------------------------------------------------------------------------------------------
# Learned weights.


def default_weights(method: str, task: str, clients_per_round: int,
                    alpha: float | None = None) -> str | None:
  """The bundled weights a learned method uses when none are named.

  FedLOpt weights meta-trained in this very setting, ``METHOD/fedTASK_kK_aALPHA`` (``meta-train
  --federated``), come first. Otherwise LOpt-A's main-setting weights ``lopt_a/TASK_k8_h4``
  (LOpt-A does not depend on K), and LAgg-A's ``lagg_a/TASK_kK_h4``, built for K = the clients
  per round. ``None`` if none ship.
  """
  if method not in LEARNED:
    return None
  if alpha is not None:
    fed = f"{method}/fed{task}_k{clients_per_round}_a{alpha:g}"
    if fed in pretrained.available():
      return fed
  if method == "lopt_a":
    return pretrained.default_name("lopt_a", task, 8, 4)
  return pretrained.default_name("lagg_a", task, clients_per_round, 4)


def load_learned(method: str, name: str, clients_per_round: int) -> tuple[MetaParams, float]:
  """``(MetaParams, the local learning rate it was meta-trained with)`` of weights ``name``."""
  meta = pretrained.load(name, num_workers=clients_per_round)
  if meta.config.kind != method:
    raise UsageError(f"weights {name} hold {meta.config.kind} weights, not {method}.")
  info = pretrained.metadata(name).get("info", {})
  return meta, float(info.get("local_lr", 0.3))


# --------------------------------------------------------------------------------------------
# Evaluation: every method on the same seeds (one partition and init per seed).


def _fingerprint(cfg: FederatedTrainConfig, weights_sha: str | None) -> str:
  d = dataclasses.asdict(cfg)
  d.pop("data_dir")  # where the data lives does not change the run
  return hashlib.sha256(json.dumps([d, weights_sha], sort_keys=True).encode()).hexdigest()[:16]


def run_all(setting: FederatedTrainConfig, methods: Sequence[str], seeds: Sequence[int],
            weights: Mapping[str, str], cache_dir: pathlib.Path, *,
            hparams: Mapping[str, Mapping[str, float]] | None = None, progress: bool = True,
            log: Callable[[str], None] = print) -> dict[str, list[dict]]:
  """Train (or load from ``cache_dir``) every method x seed of ``setting``.

  Each run is ``setting`` with its ``server`` and ``seed`` replaced, and a baseline's
  ``local_lr`` / ``server_lr`` from ``hparams[method]`` where given (:func:`table_hparams`);
  a learned method's clients train with its weights' ``local_lr`` instead of
  ``setting.local_lr``. A cached run is reused only if its configuration and weight file
  (sha256) are unchanged.

  Raises:
    UsageError: an unknown method, no seed, or a learned method without ``weights``.
  """
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise UsageError(f"Unknown federated methods {unknown}; choose from {', '.join(METHODS)}.")
  if not methods or not seeds:
    raise UsageError("Need at least one method and one seed.")
  missing = [m for m in methods if m in LEARNED and m not in weights]
  if missing:
    raise UsageError(f"No weights for {missing} (none bundled for this setting); pass "
                     f"--weights METHOD=NAME_OR_PATH.")
  cache_dir.mkdir(parents=True, exist_ok=True)
  out: dict[str, list[dict]] = {m: [] for m in methods}
  for m in methods:
    meta, sha = None, None
    base = with_hparams(dataclasses.replace(setting, server=m), (hparams or {}).get(m, {}))
    if m in LEARNED:
      meta, lr = load_learned(m, weights[m], setting.clients_per_round)
      sha = pretrained.file_sha256(pretrained.resolve(weights[m]))
      base = dataclasses.replace(base, local_lr=lr)
    for seed in seeds:
      cfg = dataclasses.replace(base, seed=int(seed))
      out[m].append(evaluation.cached_run(
          cache_dir / f"{m}_seed{seed}.json", _fingerprint(cfg, sha),
          lambda: train_federated(cfg, meta, progress=progress,
                                  label=f"{LABELS[m]} seed {seed}"),
          weights=weights.get(m), log=log))
  return out


def diverged_at(hist: Mapping[str, Any]) -> int | None:
  """The first eval round at which a run's global training loss is not finite, else None."""
  for r, loss in zip(hist["eval_rounds"], hist["global_train_loss"]):
    if loss is None or not math.isfinite(loss):
      return int(r)
  return None


def summarize(runs: Mapping[str, list[dict]]) -> dict[str, dict[str, Any]]:
  """Per method: per-seed and mean ± SE (:func:`evaluation.mean_se`) final test accuracy and
  final global training loss over the seeds that did not diverge, the round at which each
  diverged one stopped (``diverged_at_round``), and the hyperparameters of its runs."""
  table = {}
  for m, hists in runs.items():
    per_seed = []
    for h in hists:
      diverged = diverged_at(h)
      # A diverged run stopped with non-finite weights: its "final" accuracy is chance level
      # and says nothing, so it is left out of the means and counted apart.
      ok = diverged is None  # round 0 (a non-finite init) is a divergence too
      per_seed.append({"seed": h["config"]["seed"], "diverged_at_round": diverged,
                       "test_accuracy": h.get("test_accuracy") if ok else None,
                       "final_train_loss": float(h["global_train_loss"][-1]) if ok else None})
    h0 = hists[0]
    hp = {"local_lr": h0["config"]["local_lr"], **h0["server_hparams"]}
    if h0.get("weights"):
      hp["weights"] = h0["weights"]
    table[m] = {"per_seed": per_seed, "n": len(per_seed),
                "hparams": {k: v for k, v in hp.items() if v is not None},
                "test_accuracy": evaluation.mean_se([s["test_accuracy"] for s in per_seed]),
                "final_train_loss": evaluation.mean_se([s["final_train_loss"]
                                                        for s in per_seed])}
  return table
