"""The checks Optax runs on its own optimizers, over every server transform the package exports.

Each server must: take extra keyword arguments in ``update``; work under
``optax.inject_hyperparams`` with its numeric hyperparameters moved into the state (and read
them from there); keep its state's tree structure, shapes, dtypes and weak types across jitted
steps; give the same updates with and without ``jax.jit``; and compose inside ``optax.chain``.
LAgg-A reads the per-worker stack, so its deltas carry a leading axis of K workers.
"""

import dataclasses
import inspect
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_localsgd as ol
from conftest import random_meta
from optax_localsgd import baselines

K = 2  # LAgg-A's workers: small, to keep the checks fast
STEPS = 3
KEY = jax.random.PRNGKey(0)


@dataclasses.dataclass(frozen=True)
class Case:
  factory: Callable[..., optax.GradientTransformation]
  kwargs: dict
  lr_name: str | None = None  # the hyperparameter that scales the update linearly, if any
  k: int | None = None  # LAgg-A: the updates are (K,) + param.shape stacks
  static_args: tuple[str, ...] = ()


CASES = {
    "local_sgd": Case(ol.local_sgd, dict(learning_rate=0.7), "learning_rate"),
    "slowmo": Case(ol.slowmo, dict(slow_learning_rate=1.2, momentum=0.9, local_learning_rate=0.1),
                   "slow_learning_rate"),
    "diloco": Case(baselines.diloco, dict(learning_rate=0.7, momentum=0.9), "learning_rate"),
    "fedadam": Case(baselines.fedadam, dict(learning_rate=1e-2), "learning_rate"),
    "fedyogi": Case(baselines.fedyogi, dict(learning_rate=1e-2), "learning_rate"),
    "fedadagrad": Case(baselines.fedadagrad, dict(learning_rate=1e-1), "learning_rate"),
    # Non-zero biases and decay offsets, so the learned step is not a near-constant.
    "lopt_a": Case(ol.lopt_a, dict(meta_params=random_meta(ol.init_lopt_a(KEY)))),
    "lagg_a": Case(ol.lagg_a, dict(meta_params=random_meta(ol.init_lagg_a(KEY, K), seed=1), k=K),
                   k=K, static_args=("k",)),
}
NAMES = sorted(CASES)


def test_every_exported_server_transform_is_checked():
  exported = {n for n in ol.transforms.__all__ if n[0].islower()}
  # worker_sgd is the workers' optimizer, not a server; scaffold returns (local_sgd, client
  # hook), whose server half is local_sgd, checked here.
  exported |= set(baselines.__all__) - {"worker_sgd", "scaffold"}
  assert exported == set(CASES)


def _params(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  return {"w": jnp.asarray(rng.normal(size=(4, 3)), dtype),
          "b": jnp.asarray(rng.normal(size=(3,)), dtype)}


def _deltas(case, params, steps=STEPS, seed=1):
  rng = np.random.default_rng(seed)
  lead = () if case.k is None else (case.k,)
  return [jax.tree.map(
      lambda p: jnp.asarray(rng.normal(scale=0.05, size=lead + p.shape), p.dtype), params)
          for _ in range(steps)]


def _run(tx, params, deltas, jit=True, **extra):
  """Updates and states of ``len(deltas)`` rounds, the params moving by each update."""
  update = jax.jit(tx.update) if jit else tx.update
  state, updates, states = tx.init(params), [], []
  for d in deltas:
    u, state = update(d, state, params, **extra)
    params = optax.apply_updates(params, u)
    updates.append(u)
    states.append(state)
  return updates, states


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-8):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol)


def _signature(tree):
  return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x), getattr(x, "weak_type", None)),
                      tree)


def _build(name):
  c = CASES[name]
  return c, c.factory(**c.kwargs)


@pytest.mark.parametrize("name", NAMES)
def test_update_takes_extra_args(name):
  """Optax passes extra keyword arguments (e.g. ``value=loss``) to every transform of a chain
  built from GradientTransformationExtraArgs; the servers must accept and ignore them."""
  case, tx = _build(name)
  tx = optax.with_extra_args_support(tx)
  assert isinstance(tx, optax.GradientTransformationExtraArgs)
  params = _params()
  deltas = _deltas(case, params)
  plain, _ = _run(tx, params, deltas)
  extra, _ = _run(tx, params, deltas, extra=jnp.ones(()), value=jnp.float32(0.5))
  _assert_trees_close(extra, plain, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_state_signature_is_stable_under_jit(name, dtype):
  """Init state and the state after each jitted step: same tree, shapes, dtypes, weak types (a
  change recompiles a jitted training loop, or fails a lax.scan over rounds); the updates have
  the params' shapes and dtype."""
  case, tx = _build(name)
  params = _params(dtype)
  updates, states = _run(tx, params, _deltas(case, params))
  want = _signature(tx.init(params))
  for s in states:
    assert _signature(s) == want
  for u in updates:
    assert _signature(u) == _signature(params)


@pytest.mark.parametrize("name", NAMES)
def test_state_is_a_lax_scan_carry(name):
  """The stricter form of the previous check: rounds as a lax.scan, which refuses a carry whose
  dtype or weak type changes."""
  case, tx = _build(name)
  params = _params()
  deltas = jax.tree.map(lambda *xs: jnp.stack(xs), *_deltas(case, params))

  def body(carry, d):
    p, s = carry
    u, s = tx.update(d, s, p)
    return (optax.apply_updates(p, u), s), u

  (_, _), scanned = jax.jit(lambda p, s, d: jax.lax.scan(body, (p, s), d))(
      params, tx.init(params), deltas)
  looped, _ = _run(tx, params, _deltas(case, params))
  _assert_trees_close(jax.tree.map(lambda x: x[-1], scanned), looped[-1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_jit_gives_the_updates_of_eager_execution(name):
  case, tx = _build(name)
  params = _params()
  deltas = _deltas(case, params)
  eager, _ = _run(tx, params, deltas, jit=False)
  jitted, _ = _run(tx, params, deltas, jit=True)
  for a, b in zip(eager, jitted):
    _assert_trees_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_works_under_inject_hyperparams(name):
  """``inject_hyperparams`` moves the numeric hyperparameters into the state and rebuilds the
  transform from them at every (jitted) step: the updates must be the plain ones, the state's
  signature stable, and the transform must read the value from the state (doubling the
  learning rate there doubles the first update)."""
  case, tx = _build(name)
  injected = optax.inject_hyperparams(case.factory, static_args=case.static_args)(**case.kwargs)
  params = _params()
  deltas = _deltas(case, params)
  plain, _ = _run(tx, params, deltas)
  got, states = _run(injected, params, deltas)
  for a, b in zip(got, plain):
    _assert_trees_close(a, b, rtol=1e-5, atol=1e-7)
  want = _signature(injected.init(params))
  assert all(_signature(s) == want for s in states)
  bound = inspect.signature(case.factory).bind(**case.kwargs)
  bound.apply_defaults()
  numeric = {k for k, v in bound.arguments.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)
             and k not in case.static_args}
  assert set(states[-1].hyperparams) == numeric  # e.g. slowmo: alpha, beta, gamma

  if case.lr_name is not None:
    state = injected.init(params)
    state.hyperparams[case.lr_name] = 2 * state.hyperparams[case.lr_name]
    doubled, _ = jax.jit(injected.update)(deltas[0], state, params)
    _assert_trees_close(doubled, jax.tree.map(lambda u: 2 * u, plain[0]), rtol=1e-6)


@pytest.mark.parametrize("name", [n for n in NAMES if CASES[n].lr_name is not None])
def test_inject_hyperparams_with_a_schedule_matches_passing_the_schedule(name):
  """A schedule given to inject_hyperparams is evaluated there, at the wrapper's count, and the
  constant handed to the transform; given to the transform itself it is evaluated at the
  transform's count. Both counts start at 0, so the updates agree."""
  case = CASES[name]
  kwargs = dict(case.kwargs)
  kwargs[case.lr_name] = optax.linear_schedule(0.2 * kwargs[case.lr_name],
                                               kwargs[case.lr_name], transition_steps=2)
  params = _params()
  deltas = _deltas(case, params)
  direct, _ = _run(case.factory(**kwargs), params, deltas)
  injected, _ = _run(optax.inject_hyperparams(case.factory)(**kwargs), params, deltas)
  for a, b in zip(injected, direct):
    _assert_trees_close(a, b, rtol=1e-5, atol=1e-7)


def test_lagg_a_under_inject_hyperparams_needs_k_static():
  case = CASES["lagg_a"]
  with pytest.raises(ValueError, match=r"static_args=\('k',\)"):
    optax.inject_hyperparams(ol.lagg_a)(**case.kwargs).init(_params())


@pytest.mark.parametrize("name", NAMES)
def test_composes_inside_chain(name):
  """``chain(clip, server, scale(0.5))``: extra args pass through to the server, whose updates
  are the standalone ones halved, and whose state sits unchanged in the chain's tuple. (The
  clip threshold is above any of these deltas' norms, so it leaves them unchanged.)"""
  case, tx = _build(name)
  chained = optax.chain(optax.clip_by_global_norm(1e6), tx, optax.scale(0.5))
  params = _params()
  # Step both from the same params (the chain's own would move by half the step).
  state = chained.init(params)
  assert _signature(state[1]) == _signature(tx.init(params))
  p, s_alone = params, tx.init(params)
  for d in _deltas(case, params):
    u_chain, state = jax.jit(chained.update)(d, state, p, value=jnp.float32(1.0))
    u_alone, s_alone = jax.jit(tx.update)(d, s_alone, p)
    _assert_trees_close(u_chain, jax.tree.map(lambda u: 0.5 * u, u_alone), rtol=1e-6)
    _assert_trees_close(state[1], s_alone, rtol=1e-6, atol=0)
    p = optax.apply_updates(p, u_alone)
