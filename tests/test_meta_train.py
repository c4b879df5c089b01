"""Meta-training on real Fashion-MNIST: progress, exact resume, NaN guard, bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import SMALL_MLP
from optax_localsgd import cli, pretrained
from optax_localsgd.meta.problem import PESConfig, evaluate_meta_loss, make_outer_step
from optax_localsgd.meta.train import MetaTrainConfig, _setup, meta_train


# Small models (conftest.SMALL_MLP). Most tests share tiny()'s configuration unchanged, so one
# compiled outer step serves them (in-process cache, and JAX's persistent cache in CI).
CNN = "fmnist_cnn:features=8x8,strides=2x2"


def tiny(**kw):
  pes = dict(truncation=3, min_inner=6, max_inner=12, outer_steps=4, warmup_steps=2,
             lr_peak=3e-3)
  pes.update(kw.pop("pes", {}))
  base = dict(optimizer="lopt_a", tasks=(SMALL_MLP,), workers=2, local_steps=2,
              batch_size=16, tasks_per_estimate=2, checkpoint_every=1000, pes=PESConfig(**pes))
  base.update(kw)
  return MetaTrainConfig(**base)


def _theta_leaves(path):
  m = pretrained.load(path)
  return [np.asarray(x) for x in jax.tree.leaves(m)]


def test_resume_is_bit_identical(tmp_path):
  cfg = tiny()
  straight = meta_train(cfg, tmp_path / "a", progress=False)
  first = meta_train(cfg, tmp_path / "b", progress=False, stop_after=2)
  assert first["interrupted"] and first["step"] == 2 and first["weights"] is None
  # The log on disk follows the checkpoint, so an interrupted run's curve can be read.
  assert json.loads((tmp_path / "b" / "log.json").read_text())["step"] == [1, 2]
  second = meta_train(cfg, tmp_path / "b", resume=True, progress=False)
  assert second["step"] == 4
  for x, y in zip(_theta_leaves(straight["weights"]), _theta_leaves(second["weights"])):
    np.testing.assert_array_equal(x, y)
  assert straight["log"]["meta_loss"] == second["log"]["meta_loss"]
  meta = pretrained.metadata(second["weights"])["info"]
  assert meta["outer_steps"] == 4 and meta["optimizer"] == "lopt_a" and meta["K"] == 2


def test_meta_training_lowers_the_meta_loss(tmp_path):
  """From an optimizer that takes no step (zero output layer), 15 PES steps must find progress."""
  # The paper's 2 x 128 MLP here: on tiny()'s 16-unit one these 15 steps do not find progress.
  cfg = tiny(output_init_scale=0.0, tasks=("fmnist_mlp",),
             pes=dict(outer_steps=15, lr_peak=3e-2, truncation=4, min_inner=8, max_inner=30))
  groups, datas, state0 = _setup(cfg)
  res = meta_train(cfg, tmp_path, progress=False)
  trained = pretrained.load(res["weights"])
  ev = jax.jit(lambda th: evaluate_meta_loss(th, groups[0], datas[0], rounds=20))
  before, after = float(ev(state0.theta)), float(ev(trained))
  assert after < before - 0.3, (before, after)  # measured: 2.79 -> 2.08
  assert (tmp_path / "meta_loss.png").exists()
  log = json.loads((tmp_path / "log.json").read_text())
  assert len(log["meta_loss"]) == 15


def test_non_finite_meta_losses_never_reach_theta(tmp_path):
  # A local learning rate this large overflows the optimizees' weights to inf/NaN at once.
  cfg = tiny(local_lr=1e38)
  res = meta_train(cfg, tmp_path, progress=False)
  assert res["log"]["nonfinite_pairs"] == [2, 2, 2, 2]  # both tasks, every step, counted
  for x in _theta_leaves(res["weights"]):
    assert np.all(np.isfinite(x))
  assert pretrained.metadata(res["weights"])["info"]["nonfinite_pairs"] > 0


def test_a_step_without_a_finite_estimate_leaves_theta_and_the_optimizer_untouched():
  """No finite pair: no AdamW step at all (momentum and weight decay would still move θ and the
  schedule would advance on a zeroed estimate); the skip is counted."""
  cfg = tiny(local_lr=1e38)  # overflows every optimizee at once
  groups, datas, state = _setup(cfg)
  step = jax.jit(make_outer_step(groups, cfg.pes))
  # First a normal step on finite data so that Adam's moments are non-zero.
  ok_groups, ok_datas, ok_state = _setup(tiny())
  moved, _ = jax.jit(make_outer_step(ok_groups, cfg.pes))(ok_state, ok_datas)
  state = state._replace(theta=moved.theta, opt_state=moved.opt_state, step=moved.step)
  new, m = step(state, datas)
  assert int(m["nonfinite_pairs"]) == 2 and not bool(m["grad_finite"])
  for a, b in zip(jax.tree.leaves(state.theta), jax.tree.leaves(new.theta)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  inner_old = state.opt_state.inner_state
  inner_new = new.opt_state.inner_state
  for a, b in zip(jax.tree.leaves(inner_old), jax.tree.leaves(inner_new)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(new.nonfinite_grads) == 1
  assert float(m["lr"]) == float(cfg.pes.schedule()(1))  # one step applied so far, not two


def test_one_non_finite_pair_leaves_the_logged_meta_loss_finite():
  cfg = tiny(tasks_per_estimate=3)
  groups, datas, state = _setup(cfg)
  g = state.groups[0]
  nan_first = jax.tree.map(lambda x: x.at[0].set(jnp.nan) if jnp.issubdtype(x.dtype, jnp.floating)
                           else x, g.params)
  state = state._replace(groups=(g._replace(params=nan_first),))
  new, m = jax.jit(make_outer_step(groups, cfg.pes))(state, datas)
  assert int(m["nonfinite_pairs"]) == 1
  assert np.isfinite(float(m["meta_loss"])) and bool(m["grad_finite"])
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))  # the two good pairs still step
             for a, b in zip(jax.tree.leaves(state.theta), jax.tree.leaves(new.theta)))


def test_a_fresh_inner_problem_draws_its_init_and_its_minibatches_from_different_keys():
  """After a reset the new init and the first round's minibatches came from one key."""
  from optax_localsgd.meta import problem
  key = jax.random.PRNGKey(7)
  init_key = problem._init_key(key)
  round_keys = [jax.random.fold_in(problem._round_key_base(key), r) for r in range(50)]
  assert not any(np.array_equal(init_key, rk) for rk in round_keys)


def test_weight_decay_leaves_the_decay_offsets_alone():
  """AdamW's weight decay would pull the offsets (hence the decays) back to their initial values;
  with a zero gradient it shrinks the MLP weights and leaves the offsets where they are."""
  import optax_localsgd as ol
  meta = ol.init_lopt_a(jax.random.PRNGKey(0))
  meta = type(meta)(meta.mlp, jnp.full((7,), 0.05), meta.config)
  pcfg = PESConfig(weight_decay=0.1, lr_init=1.0, lr_peak=1.0, lr_end=1.0, warmup_steps=1)
  opt = pcfg.optimizer()
  zero = jax.tree.map(jnp.zeros_like, meta)
  upd, _ = opt.update(zero, opt.init(meta), meta)
  np.testing.assert_array_equal(np.asarray(upd.decay_offsets), 0.0)
  np.testing.assert_allclose(np.asarray(upd.mlp["w0"]), -0.1 * np.asarray(meta.mlp["w0"]),
                             rtol=1e-6)


def test_perturb_meta_trains_only_the_named_leaves():
  """--perturb w2,b2,decay_offsets: the other leaves get no perturbation, no estimate and no step
  (not even AdamW's weight decay); the named ones move."""
  cfg = tiny(pes=dict(perturb=("w2", "b2", "decay_offsets"), weight_decay=0.1, lr_init=1e-2,
                      lr_peak=1e-2))
  groups, datas, state = _setup(cfg)
  step = jax.jit(make_outer_step(groups, cfg.pes))
  new, metrics = step(state, datas)
  new, metrics = step(new, datas)
  assert bool(metrics["grad_finite"])
  for k in ("w0", "b0", "w1", "b1"):
    np.testing.assert_array_equal(np.asarray(new.theta.mlp[k]), np.asarray(state.theta.mlp[k]))
  for k in ("w2", "b2"):
    assert np.abs(np.asarray(new.theta.mlp[k]) - np.asarray(state.theta.mlp[k])).max() > 1e-4
  assert np.abs(np.asarray(new.theta.decay_offsets - state.theta.decay_offsets)).max() > 1e-4
  with pytest.raises(ValueError, match="unknown leaves"):
    PESConfig(perturb=("w3",))


def test_divergence_guard_clips_round_losses_and_restarts_pairs_at_the_cap():
  """A cap below every loss the task reaches: each round is clipped, so the meta-loss is the
  cap, the antithetic differences (and the gradient) are zero, and every pair restarts."""
  cfg = tiny(pes=dict(loss_clip=1.5))
  groups, datas, state = _setup(cfg)
  assert 2.0 < groups[0].init_loss < 2.8  # ~log(10) for a fresh 10-way classifier (here 2.61)
  low = (dataclasses.replace(groups[0], init_loss=0.1),)  # cap 0.15, far below any loss
  state = state._replace(groups=tuple(
      g._replace(rounds_done=jnp.zeros_like(g.rounds_done), length=g.length + 100)
      for g in state.groups))
  new, m = jax.jit(make_outer_step(low, cfg.pes))(state, datas)
  np.testing.assert_allclose(float(m["meta_loss"]), 0.15, rtol=1e-6)
  assert int(m["capped_pairs"]) == 2  # both tasks' pairs, counted for the log
  g = new.groups[0]
  np.testing.assert_array_equal(np.asarray(g.rounds_done), 0)  # restarted, not at 3 rounds
  for x in jax.tree.leaves(g.xi):
    np.testing.assert_array_equal(np.asarray(x), 0.0)
  # The same step with the real initial loss (cap ~3.5) clips nothing and restarts nothing.
  _, m_real = jax.jit(make_outer_step(groups, cfg.pes))(state, datas)
  assert float(m_real["meta_loss"]) < groups[0].loss_cap(cfg.pes)
  assert int(m_real["capped_pairs"]) == 0
  # Only float32 rounding of the clipped means is left of the antithetic differences.
  assert float(m["grad_norm"]) < 1e-3 * float(m_real["grad_norm"])


def test_divergence_guard_is_neutral_until_it_triggers(tmp_path):
  """While no round reaches the cap the guard changes nothing: same meta-losses, same weights.
  (At 1.5 it would clip here: this tiny run's fourth step averages 4.45, above 1.5 x 2.61.)"""
  plain = meta_train(tiny(), tmp_path / "a", progress=False)
  guarded = meta_train(tiny(pes=dict(loss_clip=3.0)), tmp_path / "b", progress=False)
  assert plain["log"]["meta_loss"] == guarded["log"]["meta_loss"]
  for x, y in zip(_theta_leaves(plain["weights"]), _theta_leaves(guarded["weights"])):
    np.testing.assert_array_equal(x, y)
  assert "loss_clip" not in plain["log"]["config"]["pes"]  # old checkpoints keep resuming
  assert guarded["log"]["config"]["pes"]["loss_clip"] == 3.0
  assert guarded["log"]["capped_pairs"] == [0, 0, 0, 0]
  with pytest.raises(ValueError, match="loss_clip"):  # a checkpoint of another guard
    meta_train(tiny(pes=dict(loss_clip=2.5)), tmp_path / "b", resume=True, progress=False)


def test_time_budget_stops_with_a_checkpoint_and_partial_weights(tmp_path):
  """A budget shorter than compilation: one outer step, a checkpoint, exported weights that
  say how far the schedule got, and a resume that goes on from there."""
  res = meta_train(tiny(), tmp_path, progress=False, time_budget_s=1e-3, export_partial=True)
  assert res["interrupted"] and res["step"] == 1 and res["weights"] is not None
  info = pretrained.metadata(res["weights"])["info"]
  assert info["outer_steps"] == 1 and info["outer_steps_planned"] == 4
  again = meta_train(tiny(), tmp_path, resume=True, progress=False, stop_after=1)
  assert again["step"] == 2


def test_snapshots_keep_the_weights_along_the_way(tmp_path):
  res = meta_train(tiny(), tmp_path, progress=False, snapshot_every=2)
  snaps = sorted((tmp_path / "snapshots").iterdir())
  assert [p.name for p in snaps] == ["weights_step000002.safetensors",
                                  "weights_step000004.safetensors"]
  assert pretrained.metadata(snaps[0])["info"]["outer_steps"] == 2
  for x, y in zip(_theta_leaves(snaps[1]), _theta_leaves(res["weights"])):  # the last = final
    np.testing.assert_array_equal(x, y)


def test_resume_refuses_another_configuration(tmp_path):
  meta_train(tiny(), tmp_path, progress=False, stop_after=1)
  with pytest.raises(ValueError, match="workers"):
    meta_train(tiny(workers=4), tmp_path, resume=True, progress=False)
  with pytest.raises(ValueError, match="exists: pass --resume"):
    meta_train(tiny(), tmp_path, progress=False)


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
  meta_train(tiny(), tmp_path, progress=False, stop_after=1)
  ck = tmp_path / "checkpoint.npz"
  ck.write_bytes(ck.read_bytes()[: len(ck.read_bytes()) // 2])
  with pytest.raises(ValueError, match="corrupt"):
    meta_train(tiny(), tmp_path, resume=True, progress=False)


def test_init_from_starts_at_the_given_weights(tmp_path):
  """Fine-tuning (e.g. H = 4 weights for H = 16) starts from those weights, bit for bit."""
  src = meta_train(tiny(optimizer="lagg_a", pes=dict(outer_steps=2)), tmp_path / "src",
                   progress=False)["weights"]
  cfg = tiny(optimizer="lagg_a", local_steps=3, init_from=str(src), pes=dict(outer_steps=1))
  _, _, state = _setup(cfg)
  for x, y in zip(jax.tree.leaves(state.theta), _theta_leaves(src)):
    np.testing.assert_array_equal(np.asarray(x), y)
  res = meta_train(cfg, tmp_path / "ft", progress=False)
  info = pretrained.metadata(res["weights"])["info"]
  assert info["init_from"] == str(src) and info["H"] == 3
  assert info["init_from_sha256"] == pretrained.file_sha256(src)
  with pytest.raises(ValueError, match="LAgg-A weights for K=2 workers, but you asked for K=4"):
    _setup(tiny(optimizer="lagg_a", workers=4, init_from=str(src)))
  with pytest.raises(ValueError, match="holds lagg_a weights, but --optimizer is lopt_a"):
    _setup(tiny(init_from=str(src)))


@pytest.mark.parametrize("args, msg", [
    (["--optimizer", "lopt_a", "--task", "nope"], "Unknown task"),
    (["--optimizer", "lopt_a", "--task", "fmnist_mlp", "--task", "fmnist_cnn",
      "--tasks-per-estimate", "3"], "multiple of the number of tasks"),
    (["--optimizer", "lopt_a", "--task", "fmnist_mlp", "--outer-steps", "0"],
     "--outer-steps must be >= 1"),
    (["--optimizer", "lopt_a", "--task", "fmnist_mlp", "--resume"], "no checkpoint"),
    (["--optimizer", "lopt_a", "--task", "fmnist_mlp", "--min-inner", "50",
      "--max-inner", "10"], "min_inner <= max_inner"),
    (["--optimizer", "lopt_a", "--task", "fmnist_mlp", "--loss-clip", "0.5"],
     "loss_clip must be a finite number > 1"),
    (["--optimizer", "lopt_a", "--task", "fmnist_mlp", "--grad-clip", "0"],
     "grad_clip must be a positive finite number"),
    (["--optimizer", "lopt_a", "--task", "fmnist_mlp", "--output-init-scale", "-1"],
     "output_init_scale must be a finite number >= 0"),
    (["--optimizer", "lopt_a", "--task", "fmnist_mlp", "--perturb", "w2,w9"],
     "--perturb 'w2,w9': unknown leaves ['w9']"),
])
def test_bad_flags(args, msg, tmp_path, capsys):
  assert cli.main(["meta-train", *args, "--out", str(tmp_path / "o")]) == 2
  assert msg in capsys.readouterr().err


def test_multi_task_meta_batch(tmp_path):
  """One estimate over two architectures (MLP and CNN on the same data)."""
  cfg = tiny(tasks=(SMALL_MLP, CNN), pes=dict(outer_steps=2))
  res = meta_train(cfg, tmp_path, progress=False)
  assert res["step"] == 2 and all(np.isfinite(res["log"]["meta_loss"]))
  assert pretrained.metadata(res["weights"])["info"]["tasks"] == [SMALL_MLP, CNN]


def test_sigint_writes_a_checkpoint_that_resumes(tmp_path):
  import signal
  import subprocess
  import sys
  import time
  args = [sys.executable, "-m", "optax_localsgd.cli", "meta-train", "--optimizer", "lopt_a",
          "--task", SMALL_MLP, "-K", "2", "-H", "2", "-B", "16", "--tasks-per-estimate", "2",
          "--truncation", "3", "--min-inner", "6", "--max-inner", "12", "--outer-steps", "100000",
          "--checkpoint-every", "100000", "--out", str(tmp_path)]
  proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  line = ""
  while "steps" not in line and time.time() < deadline:  # the progress bar's first line
    line = proc.stderr.readline()
  time.sleep(2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  summary = json.loads(out.strip().splitlines()[-1])
  assert summary["interrupted"] and 0 < summary["step"] < 100000 and summary["weights"] is None
  assert "resume with --resume" in err
  # The checkpoint is complete: resuming (same configuration as the command) continues.
  same = tiny(pes=dict(outer_steps=100000, warmup_steps=100))
  res = meta_train(same, tmp_path, resume=True, progress=False, stop_after=1)
  assert res["step"] == summary["step"] + 1
