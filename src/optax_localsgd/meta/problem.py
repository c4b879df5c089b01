"""Local SGD as a PES inner problem, and the whole outer step of meta-training as one program.

An inner state is one optimizee being trained by local SGD with a learned server: its params,
the server's state and the round count. :func:`make_outer_step` returns
``outer_step(state, datas) -> (state, metrics)``: for every task group, an antithetic PES
truncation of ``truncation`` rounds (``lax.scan`` over rounds inside, ``vmap`` over tasks and
signs), resets of finished inner problems, NaN and divergence guards, and one AdamW step on the
meta-parameters.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_localsgd import engine, tasks
from optax_localsgd.transforms import baselines
from optax_localsgd.meta import pes
from optax_localsgd.transforms.learned.params import MetaParams
from optax_localsgd.transforms import lagg_a, lopt_a


# The leaves of θ by name: the MLP's weights and biases, and the decay offsets.
LEAVES = ("w0", "b0", "w1", "b1", "w2", "b2", "decay_offsets")


@dataclasses.dataclass(frozen=True)
class PESConfig:
  """Meta-training hyperparameters (paper appendix B defaults).

  Attributes:
    sigma: perturbation standard deviation.
    truncation: rounds per truncated unroll (T_r).
    min_inner, max_inner: inner-problem lengths are log-uniform in [min, max] rounds.
    outer_steps: number of meta-gradient steps (sets the cosine schedule's length).
    lr_init, lr_peak, lr_end, warmup_steps: AdamW learning rate, linear warm-up from
      ``lr_init`` to ``lr_peak`` over ``warmup_steps``, then cosine decay to ``lr_end``.
    weight_decay: AdamW weight decay, on the MLP weights only: the decay offsets are
      excluded, so that it does not pull the decays back towards their initial values.
    grad_clip: clip the PES estimate to this global norm before AdamW (not in the paper;
      ``None``: off). Bounds the step one outlier estimate can cause through Adam's moments.
    loss_clip: divergence guard (not in the paper; ``None``: off). Each round's meta-loss is
      clipped at ``loss_clip`` times the task's loss at initialisation
      (:attr:`TaskGroup.init_loss`), so one runaway particle cannot dominate the estimate,
      and a pair restarts when either particle sat at that cap for the whole truncation.
    perturb: meta-train only these leaves of θ (names from :data:`LEAVES`); the others are
      neither perturbed nor stepped (not in the paper; ``None``: all of θ, the paper). An
      antithetic ES estimate's noise grows with the number of perturbed coordinates, so a
      subset, e.g. the output layer around a nominal init, gets more signal per estimate
      (``docs/meta.md``, round 4).
  """
  sigma: float = 0.01
  truncation: int = 50
  min_inner: int = 100
  max_inner: int = 1000
  outer_steps: int = 5000
  lr_init: float = 3e-10
  lr_peak: float = 3e-3
  lr_end: float = 1e-3
  warmup_steps: int = 100
  weight_decay: float = 1e-4
  loss_clip: float | None = None
  grad_clip: float | None = None
  perturb: tuple[str, ...] | None = None

  def __post_init__(self):
    if self.perturb is not None:
      bad = [x for x in self.perturb if x not in LEAVES]
      if bad or not self.perturb:
        raise ValueError(f"perturb: unknown leaves {bad or '(none given)'}; choose from "
                         f"{', '.join(LEAVES)}.")

  def trainable(self, theta: MetaParams) -> MetaParams:
    """A θ-shaped tree of bools: the leaves this configuration meta-trains."""
    keep = LEAVES if self.perturb is None else self.perturb
    return dataclasses.replace(
        theta, mlp={k: k in keep for k in theta.mlp}, decay_offsets="decay_offsets" in keep)

  def optimizer(self) -> optax.GradientTransformation:
    """The outer optimizer: [clip] + AdamW (decay offsets excluded from weight decay), wrapped
    so that a step whose estimate is not finite leaves θ and the optimizer state untouched."""
    # The mask is a MetaParams-shaped tree of bools, built from whatever θ it is applied to.
    mask = lambda theta: dataclasses.replace(
        jax.tree.map(lambda _: True, theta),
        decay_offsets=False)
    adamw = optax.adamw(self.schedule(), weight_decay=self.weight_decay, mask=mask)
    inner = adamw if self.grad_clip is None else optax.chain(
        optax.clip_by_global_norm(self.grad_clip), adamw)
    if self.perturb is not None:
      # Frozen leaves get no step at all (no weight decay either), whatever their estimate.
      labels = lambda theta: jax.tree.map(lambda m: "train" if m else "freeze",
                                          self.trainable(theta))
      inner = optax.multi_transform({"train": inner, "freeze": optax.set_to_zero()}, labels)
    # Large max_consecutive_errors: never give up and step with a non-finite estimate.
    return optax.apply_if_finite(inner, max_consecutive_errors=2**30)

  def schedule(self) -> optax.Schedule:
    warmup = min(self.warmup_steps, self.outer_steps)
    # optax needs at least one cosine step, also for runs no longer than the warm-up.
    return optax.warmup_cosine_decay_schedule(
        self.lr_init, self.lr_peak, warmup, max(self.outer_steps, warmup + 1), self.lr_end)


@dataclasses.dataclass(frozen=True)
class TaskGroup:
  """``num_tasks`` optimizees of one task (same data and architecture, different inits).

  ``round_cfg``: a :class:`engine.RoundConfig` (K workers on homogeneous shards, data an
  :class:`engine.DeviceData`) or a :class:`engine.FederatedConfig` (K of N clients sampled
  every round, paper appendix E.6; data an :class:`engine.ClientData`).
  ``init_loss``: the task's training loss at initialisation (nats), the scale of
  :attr:`PESConfig.loss_clip`; needed only when that guard is on (:func:`initial_loss`).
  """
  task: tasks.Task
  num_tasks: int
  round_cfg: engine.RoundConfig | engine.FederatedConfig
  local_lr: float
  init_loss: float | None = None

  @property
  def federated(self) -> bool:
    return isinstance(self.round_cfg, engine.FederatedConfig)

  def round_fn(self, server: optax.GradientTransformation):
    """``round_fn(params, state, key, data)`` of local SGD (or a federated round) under
    ``server``, the workers (clients) running SGD at :attr:`local_lr`."""
    make = engine.make_federated_round_fn if self.federated else engine.make_round_fn
    return make(self.task.loss, engine.batch_fn_for(self.task),
                baselines.worker_sgd(self.local_lr), server, self.round_cfg)

  def init_state(self, server: optax.GradientTransformation, params):
    """The round state an inner problem starts from."""
    if self.federated:
      return engine.init_federated_state(server, self.round_cfg, params)
    return engine.init_round_state(server, self.round_cfg, params)

  def loss_cap(self, pcfg: PESConfig) -> float | None:
    """The per-round meta-loss cap, or ``None`` when the divergence guard is off."""
    if pcfg.loss_clip is None:
      return None
    if self.init_loss is None or not math.isfinite(self.init_loss):
      raise ValueError(f"loss_clip needs the finite initial loss of task {self.task.name!r}; "
                       f"got init_loss={self.init_loss}.")
    return pcfg.loss_clip * self.init_loss


def initial_loss(task: tasks.Task, batches: list, seed: int, inits: int = 4) -> float:
  """Mean loss of ``inits`` fresh initialisations of ``task`` over ``batches`` (nats)."""
  keys = jax.random.split(jax.random.PRNGKey(seed), inits)
  loss = jax.jit(task.loss)
  return float(np.mean([[loss(task.init(k), b) for b in batches] for k in keys]))


class GroupState(NamedTuple):
  """Inner problems of one task group; ``params``/``server_state`` have axes ``(n, 2)``.

  ``server_state`` is the round state of ``engine.init_round_state``: with compression it also
  holds the workers' compressor states (axes ``(n, 2, K, ...)``), reset with the problem.
  """
  params: Any
  server_state: Any
  xi: Any
  rounds_done: jax.Array  # (n,) int32
  length: jax.Array  # (n,) int32
  key: jax.Array  # (n, 2) uint32, this inner problem's data/init key


class MetaState(NamedTuple):
  theta: MetaParams
  opt_state: Any
  groups: tuple[GroupState, ...]
  key: jax.Array
  step: jax.Array  # int32
  nonfinite_pairs: jax.Array  # int32, pairs whose meta-loss was NaN/Inf (ignored)
  nonfinite_grads: jax.Array  # int32, steps whose whole estimate was non-finite (skipped)


def _server(theta: MetaParams):
  cfg = theta.config
  return lopt_a(theta) if cfg.kind == "lopt_a" else lagg_a(theta, cfg.num_workers)


def _log_uniform_int(key, n, lo, hi):
  u = jax.random.uniform(key, (n,), minval=math.log(lo), maxval=math.log(hi))
  return jnp.round(jnp.exp(u)).astype(jnp.int32)


def _init_key(key):
  """The key of an inner problem's initial params: a stream of its own, apart from the
  per-round keys ``fold_in(_round_key_base(key), r)`` that draw the minibatches."""
  return jax.random.fold_in(key, 0)


def _round_key_base(key):
  return jax.random.fold_in(key, 1)


def _fresh(group: TaskGroup, theta: MetaParams, key):
  """A new inner problem: the same fresh params for both signs, zero server state (and fresh
  worker compressor states, when the round compresses)."""
  params = group.task.init(_init_key(key))
  state = group.init_state(_server(theta), params)
  two = lambda t: jax.tree.map(lambda x: jnp.stack([x, x]), t)
  return two(params), two(state)


def init_group(group: TaskGroup, theta: MetaParams, key, pcfg: PESConfig) -> GroupState:
  k_len, k_off, k_tasks = jax.random.split(key, 3)
  n = group.num_tasks
  keys = jax.random.split(k_tasks, n)
  params, sstate = jax.vmap(lambda k: _fresh(group, theta, k))(keys)
  length = _log_uniform_int(k_len, n, pcfg.min_inner, pcfg.max_inner)
  # Random start offsets, so the tasks' inner problems do not all reset at the same step.
  offset = jax.random.randint(k_off, (n,), 0, length)
  zeros_xi = jax.tree.map(lambda x: jnp.zeros((n,) + x.shape, x.dtype), theta)
  return GroupState(params, sstate, zeros_xi, offset.astype(jnp.int32), length, keys)


def init_meta_state(theta: MetaParams, groups: tuple[TaskGroup, ...], key,
                    pcfg: PESConfig) -> MetaState:
  opt = pcfg.optimizer()
  keys = jax.random.split(key, len(groups) + 1)
  return MetaState(
      theta=theta, opt_state=opt.init(theta),
      groups=tuple(init_group(g, theta, k, pcfg) for g, k in zip(groups, keys[1:])),
      key=keys[0], step=jnp.zeros([], jnp.int32),
      nonfinite_pairs=jnp.zeros([], jnp.int32), nonfinite_grads=jnp.zeros([], jnp.int32))


def _unroll_fn(group: TaskGroup, truncation: int, data: engine.DeviceData,
               cap: float | None = None):
  def unroll(theta, inner, key_and_start):
    key, start = key_and_start
    params, sstate = inner
    round_fn = group.round_fn(_server(theta))

    def body(carry, r):
      p, s = carry
      p, s, m = round_fn(p, s, jax.random.fold_in(_round_key_base(key), start + r), data)
      loss = m["train_loss"]
      # NaN stays NaN (minimum propagates it), so the non-finite guard still sees it.
      return (p, s), loss if cap is None else jnp.minimum(loss, cap)

    (params, sstate), losses = jax.lax.scan(body, (params, sstate), jnp.arange(truncation))
    return (params, sstate), jnp.mean(losses)  # paper eq. 3: mean over the truncation

  return unroll


def make_outer_step(groups: tuple[TaskGroup, ...], pcfg: PESConfig):
  """``outer_step(state: MetaState, datas: tuple[DeviceData]) -> (state, metrics)``."""
  opt = pcfg.optimizer()

  def outer_step(state: MetaState, datas):
    key, k_step = jax.random.split(state.key)
    theta = state.theta
    new_groups, ests = [], []
    n_bad = n_capped = jnp.zeros([], jnp.int32)
    for gi, (group, gs, data) in enumerate(zip(groups, state.groups, datas)):
      k_eps, k_reset = jax.random.split(jax.random.fold_in(k_step, gi))
      eps = pes.sample_perturbation(k_eps, theta, group.num_tasks, pcfg.sigma)
      if pcfg.perturb is not None:
        eps = jax.tree.map(lambda e, m: e if m else jnp.zeros_like(e), eps,
                           pcfg.trainable(theta))
      cap = group.loss_cap(pcfg)
      unroll = _unroll_fn(group, pcfg.truncation, data, cap)
      est = pes.antithetic_pes(
          lambda th, inner, ks: unroll(th, inner, ks), theta,
          (gs.params, gs.server_state), gs.xi, (gs.key, gs.rounds_done), eps, pcfg.sigma)
      ests.append(est)
      n_bad = n_bad + jnp.sum(~est.finite)
      capped = jnp.zeros_like(est.finite) if cap is None else diverged(est.losses, cap)
      n_capped = n_capped + jnp.sum(capped)
      new_groups.append(_advance(group, gs, est, capped, theta, k_reset, pcfg))
    # Each group's estimate is the mean over its finite pairs; weight it by its share of all the
    # finite pairs. With none at all the estimate is NaN and the outer optimizer skips the step.
    n_ok = [jnp.sum(e.finite) for e in ests]
    total_ok = sum(n_ok)
    grad = jax.tree.map(jnp.zeros_like, theta)
    for e, k in zip(ests, n_ok):
      w = k / jnp.maximum(total_ok, 1)
      grad = jax.tree.map(lambda a, b: a + jnp.where(k > 0, w * b, 0.0), grad, e.grad)
    grad = jax.tree.map(lambda g: jnp.where(total_ok > 0, g, jnp.nan), grad)
    # Mean over the finite pairs only: one NaN pair (already ignored by the estimate) must not
    # turn the logged meta-loss into NaN. NaN only when no pair is finite.
    flat = jnp.concatenate([e.losses.reshape(-1) for e in ests])
    ok = jnp.isfinite(flat)
    mean_loss = jnp.where(jnp.any(ok), jnp.sum(jnp.where(ok, flat, 0.0)) /
                          jnp.maximum(jnp.sum(ok), 1), jnp.nan)
    grad_ok = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(grad)]))
    # apply_if_finite returns zero updates and the previous inner state for such a step.
    updates, opt_state = opt.update(grad, state.opt_state, theta)
    new_theta = optax.apply_updates(theta, updates)
    new_state = MetaState(
        theta=new_theta, opt_state=opt_state, groups=tuple(new_groups), key=key,
        step=state.step + 1, nonfinite_pairs=state.nonfinite_pairs + n_bad,
        nonfinite_grads=state.nonfinite_grads + (~grad_ok).astype(jnp.int32))
    # The schedule counts applied steps only (apply_if_finite does not advance it on a skip).
    applied = state.step - state.nonfinite_grads
    metrics = {"meta_loss": mean_loss, "lr": pcfg.schedule()(applied),
               "nonfinite_pairs": n_bad, "capped_pairs": n_capped, "grad_finite": grad_ok,
               "grad_norm": optax.tree.norm(grad)}
    return new_state, metrics

  return outer_step


def _advance(group: TaskGroup, gs: GroupState, est: pes.PESEstimate, capped: jax.Array, theta,
             key, pcfg: PESConfig) -> GroupState:
  """Count the rounds; restart inner problems that finished, produced non-finite losses or are
  ``capped`` (``(n,)`` bool: the divergence guard's :func:`diverged`, all False when it is off)."""
  params, sstate = est.inner_states
  done = gs.rounds_done + pcfg.truncation
  reset = (done >= gs.length) | ~est.finite | capped
  n = group.num_tasks
  k_len = jax.random.split(key)[0]
  new_keys = jax.vmap(jax.random.fold_in)(gs.key, done.astype(jnp.uint32) + 1)
  fresh_p, fresh_s = jax.vmap(lambda k: _fresh(group, theta, k))(new_keys)
  new_len = _log_uniform_int(k_len, n, pcfg.min_inner, pcfg.max_inner)

  def pick(new, old):
    return jax.tree.map(
        lambda a, b: jnp.where(reset.reshape((n,) + (1,) * (a.ndim - 1)), a, b), new, old)

  return GroupState(
      params=pick(fresh_p, params), server_state=pick(fresh_s, sstate),
      xi=pick(jax.tree.map(jnp.zeros_like, est.xi), est.xi),
      rounds_done=jnp.where(reset, 0, done).astype(jnp.int32),
      length=jnp.where(reset, new_len, gs.length), key=pick(new_keys, gs.key))


def diverged(losses: jax.Array, cap: float) -> jax.Array:
  """``(n,)``: a particle of the pair has truncation-mean loss at ``cap``, i.e. every round of the
  truncation was clipped (to float32 rounding of the mean)."""
  return jnp.any(losses >= cap * (1 - 1e-4), axis=1)


def evaluate_meta_loss(theta: MetaParams, group: TaskGroup, data: engine.DeviceData,
                       rounds: int, seeds: tuple[int, ...] = (0, 1, 2)) -> jax.Array:
  """The meta-objective of ``theta`` without perturbation or persistence: the mean local
  training loss over ``rounds`` rounds from fresh inits, averaged over ``seeds`` (same inits and
  minibatches for any ``theta``, so two values are directly comparable)."""
  unroll = _unroll_fn(group, rounds, data)

  def one(seed):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 12345)
    params = group.task.init(_init_key(key))
    state = group.init_state(_server(theta), params)
    return unroll(theta, (params, state), (key, jnp.int32(0)))[1]

  return jnp.mean(jnp.stack([one(s) for s in seeds]))
