"""The four server transforms over several rounds, against the NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_localsgd as ol
import reference as ref
from conftest import make_params, random_meta

ROUNDS = 5


def _deltas(params, rounds, k=None, seed=1, scale=0.05):
  rng = np.random.default_rng(seed)
  lead = () if k is None else (k,)
  return [jax.tree.map(
      lambda p: jnp.asarray(rng.normal(scale=scale, size=lead + p.shape), p.dtype), params)
          for _ in range(rounds)]


def _leaves(tree):
  return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def _run(tx, params, deltas, jit=True):
  """Apply tx for len(deltas) rounds, params evolving; returns the list of updates."""
  state = tx.init(params)
  update = jax.jit(tx.update) if jit else tx.update
  outs = []
  for d in deltas:
    u, state = update(d, state, params)
    outs.append(u)
    params = optax.apply_updates(params, u)
  return outs, state


def _run_reference(step, params, deltas):
  outs = []
  p = _leaves(params)
  for d in deltas:
    u = step(p, _leaves(d))
    outs.append(u)
    p = [a + b for a, b in zip(p, u)]
  return outs


def _assert_rounds_close(got, want, rtol, atol):
  for t, (g, w) in enumerate(zip(got, want)):
    for a, b in zip(_leaves(g), w):
      np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"round {t}")


# Schedules as Optax builds them, and the same functions of the round t written out for the
# float64 reference: the transform must call them with t = 0 at the first update.
DECAY = (optax.exponential_decay(0.9, transition_steps=1, decay_rate=0.5), lambda t: 0.9 * 0.5**t)
STEP_DOWN = (optax.piecewise_constant_schedule(0.3, {2: 1 / 3}), lambda t: 0.3 if t < 2 else 0.1)
WARMUP = (optax.linear_schedule(0.5, 2.0, transition_steps=4), lambda t: 0.5 + 1.5 * min(t, 4) / 4)


@pytest.mark.parametrize("lr, ref_lr", [(1.0, 1.0), (0.7, 0.7), DECAY, WARMUP])
def test_local_sgd_matches_reference(lr, ref_lr):
  params = make_params()
  deltas = _deltas(params, ROUNDS)
  got, state = _run(ol.local_sgd(lr), params, deltas)
  lrs = iter([ref_lr(t) if callable(ref_lr) else ref_lr for t in range(ROUNDS)])
  want = _run_reference(lambda p, d: ref.local_sgd_update(d, next(lrs)), params, deltas)
  _assert_rounds_close(got, want, 1e-6, 1e-8)
  assert state.count == ROUNDS and state.count.dtype == jnp.int32


@pytest.mark.parametrize("alpha, beta, gamma", [
    (1.0, 0.95, 0.1), (1.66, 0.9, 0.3),
    (WARMUP, 0.9, 0.3),  # a schedule of the slow learning rate
    (1.0, 0.9, STEP_DOWN),  # of the local one: each delta is divided by its round's gamma
    (DECAY, 0.5, STEP_DOWN),
])
def test_slowmo_matches_reference(alpha, beta, gamma):
  ours = lambda x: x[0] if isinstance(x, tuple) else x
  theirs = lambda x: x[1] if isinstance(x, tuple) else x
  params = make_params()
  deltas = _deltas(params, ROUNDS)
  got, state = _run(ol.slowmo(ours(alpha), beta, ours(gamma)), params, deltas)
  r = ref.SlowMo(theirs(alpha), beta, theirs(gamma), [p.shape for p in jax.tree.leaves(params)])
  want = _run_reference(lambda p, d: r.step(d), params, deltas)
  _assert_rounds_close(got, want, 1e-5, 1e-7)
  assert state.count == ROUNDS


def _ref_learned(meta, params, k=None):
  return ref.Learned({n: np.asarray(v) for n, v in meta.mlp.items()},
                     np.asarray(meta.decay_offsets),
                     [p.shape for p in jax.tree.leaves(params)], k=k,
                     feature_set=meta.config.feature_set)


# ada-v2's decay offsets act on log(1 - beta) / 10, ten times more sensitively than ada-v1's
# logits, so its random offsets are ten times smaller.
FEATURE_SETS = [("ada-v2", 0.05), ("ada-v1", 0.5)]


@pytest.mark.parametrize("feature_set, offset_scale", FEATURE_SETS)
@pytest.mark.parametrize("jit", [True, False])
def test_lopt_a_matches_reference(jit, feature_set, offset_scale):
  meta = random_meta(ol.init_lopt_a(jax.random.PRNGKey(3), feature_set=feature_set),
                     offset_scale=offset_scale)
  params = make_params()
  deltas = _deltas(params, ROUNDS)
  got, state = _run(ol.lopt_a(meta), params, deltas, jit=jit)
  r = _ref_learned(meta, params)
  want = _run_reference(r.step, params, deltas)
  _assert_rounds_close(got, want, 1e-3, 1e-8)
  assert state.count == ROUNDS


@pytest.mark.parametrize("feature_set, offset_scale", FEATURE_SETS)
@pytest.mark.parametrize("k", [1, 8])
def test_lagg_a_matches_reference(k, feature_set, offset_scale):
  meta = random_meta(ol.init_lagg_a(jax.random.PRNGKey(4), k, feature_set=feature_set),
                     offset_scale=offset_scale)
  params = make_params()
  deltas = _deltas(params, ROUNDS, k=k)
  got, _ = _run(ol.lagg_a(meta, k), params, deltas)
  want = _run_reference(_ref_learned(meta, params, k).step, params, deltas)
  _assert_rounds_close(got, want, 1e-3, 1e-8)


def test_learned_update_depends_on_every_input_group():
  """Guards the comparison above against a reference and implementation that both ignore input."""
  meta = random_meta(ol.init_lopt_a(jax.random.PRNGKey(5), feature_set="ada-v1"))
  params = make_params()
  (d,) = _deltas(params, 1)
  tx = ol.lopt_a(meta)
  base, _ = tx.update(d, tx.init(params), params)
  # Not a rescaling: ada-v1 normalises every feature per tensor, so scale alone is invisible.
  for changed in ({"params": make_params(seed=9), "d": d},
                  {"params": params, "d": jax.tree.map(lambda x: x[::-1] if x.ndim else -x, d)}):
    u, _ = tx.update(changed["d"], tx.init(params), changed["params"])
    assert not np.allclose(_leaves(u)[2], _leaves(base)[2])
