"""Compressed deltas in the engine, the trainer, the CLI and the meta-trainer (issue 15).

The round with a compressor equals a plain loop that runs the workers, compresses each delta
with its own persistent state and averages; the sharded round equals the vmapped one; the bits
are counted; meta-training through a compressor runs.
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_localsgd as ol
from optax_localsgd import cli, compression, engine, pretrained
from optax_localsgd.harness import trainer
from conftest import SMALL_MLP, cpu_devices_env

SCRIPT = pathlib.Path(__file__).with_name("engine_script.py")
K, H, B = 4, 3, 5


def _toy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 3)).astype(np.float32)
  data = engine.DeviceData({"x": x, "y": (x[:, 0] > 0).astype(np.int32)},
                           np.arange(64, dtype=np.int32).reshape(K, 16))
  params = {"w": jnp.asarray(rng.normal(size=(3, 2)) * 0.1, jnp.float32), "b": jnp.zeros(2)}
  loss = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
      b["x"] @ p["w"] + p["b"], b["y"]).mean()
  return data, params, loss


def _reference_deltas(params, key, data, loss, lr=0.5):
  """The K workers' deltas of one round, by hand (the keys and minibatches of the engine)."""
  arrays = jax.tree.map(jnp.asarray, data.arrays)
  deltas = []
  for kk, shard in zip(jax.random.split(key, K), data.shards):
    idx = engine.sample_indices(kk, jnp.asarray(shard), H * B).reshape(H, B)
    p = params
    for h in range(H):
      g = jax.grad(loss)(p, engine.classification_batch(arrays, idx[h]))
      p = jax.tree.map(lambda w, gg: w - lr * gg, p, g)
    deltas.append(jax.tree.map(jnp.subtract, params, p))
  return deltas


def _reference_states(comp, params):
  """Worker k's compressor state as a user would build it: its own init (and for stochastic
  quantisation the seed's key folded with k, the documented per-worker stream)."""
  states = [comp.transform().init(params) for _ in range(K)]
  if isinstance(comp, compression.Quantize):
    states = [compression.QuantizeState(jax.random.fold_in(s.key, k))
              for k, s in enumerate(states)]
  return states


@pytest.mark.parametrize("comp", [compression.TopK(0.34, error_feedback=True),
                                  compression.TopK(0.5), compression.Quantize(4),
                                  compression.Quantize(2)], ids=lambda c: c.spec())
@pytest.mark.parametrize("server_name", ["local_sgd", "lagg_a"])
def test_round_with_a_compressor_equals_a_plain_loop(comp, server_name):
  data, params, loss = _toy()
  per_worker = server_name == "lagg_a"
  server = ol.local_sgd(1.0) if not per_worker else ol.lagg_a(
      ol.init_lagg_a(jax.random.PRNGKey(3), K), K)
  cfg = engine.RoundConfig(K, H, B, per_worker_deltas=per_worker, compression=comp)
  fn = jax.jit(engine.make_round_fn(loss, engine.classification_batch, optax.sgd(0.5), server,
                                    cfg))
  state = engine.init_round_state(server, cfg, params)
  assert isinstance(state, engine.CompressedState)

  ref_p, ref_server, ref_states = params, server.init(params), _reference_states(comp, params)
  tx = comp.transform()
  p = params
  for r in range(3):
    key = jax.random.PRNGKey(10 + r)
    p, state, m = fn(p, state, key, data)
    sent = []
    for k, d in enumerate(_reference_deltas(ref_p, key, data, loss)):
      s, ref_states[k] = tx.update(d, ref_states[k])
      sent.append(s)
    stack = jax.tree.map(lambda *xs: jnp.stack(xs), *sent)
    server_in = stack if per_worker else jax.tree.map(lambda x: x.mean(0), stack)
    upd, ref_server = server.update(server_in, ref_server, ref_p)
    ref_p = optax.apply_updates(ref_p, upd)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(ref_p)):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6, err_msg=f"round {r}")
    # Every worker's compressor state persists, worker by worker.
    for k in range(K):
      for a, b in zip(jax.tree.leaves(state.workers), jax.tree.leaves(ref_states[k])):
        np.testing.assert_allclose(a[k], b, rtol=2e-5, atol=1e-6, err_msg=f"worker {k}")
    assert float(m["bits"]) == compression.round_bits(comp, params, K)
  assert not np.allclose(p["w"], params["w"])


def test_error_feedback_state_is_per_worker_and_carried_over():
  data, params, loss = _toy()
  cfg = engine.RoundConfig(K, H, B, compression=compression.TopK(0.2, error_feedback=True))
  server = ol.local_sgd()
  fn = jax.jit(engine.make_round_fn(loss, engine.classification_batch, optax.sgd(0.5), server,
                                    cfg))
  state0 = engine.init_round_state(server, cfg, params)
  p1, state1, _ = fn(params, state0, jax.random.PRNGKey(0), data)
  res = np.asarray(state1.workers.residual["w"])
  assert res.shape == (K, 3, 2) and np.all(np.any(res != 0, axis=(1, 2)))
  assert len({r.tobytes() for r in res}) == K  # each worker its own residual
  # Carried residuals are sent eventually; forgetting them each round ends elsewhere.
  carried, forgot, s_c, s_f = p1, p1, state1, state1
  for r in range(1, 6):
    carried, s_c, _ = fn(carried, s_c, jax.random.PRNGKey(r), data)
    forgot, s_f, _ = fn(forgot, state0._replace(server=s_f.server), jax.random.PRNGKey(r), data)
  assert not np.allclose(carried["w"], forgot["w"], atol=1e-4)


def test_without_compression_the_state_and_bits_are_as_before():
  data, params, loss = _toy()
  cfg = engine.RoundConfig(K, H, B)
  server = ol.local_sgd()
  state = engine.init_round_state(server, cfg, params)
  assert isinstance(state, type(server.init(params)))
  fn = engine.make_round_fn(loss, engine.classification_batch, optax.sgd(0.5), server, cfg)
  _, _, m = fn(params, state, jax.random.PRNGKey(0), data)
  assert float(m["bits"]) == K * 32 * 8 == compression.round_bits(None, params, K)


def test_state_mix_ups_are_clear_errors():
  data, params, loss = _toy()
  server = ol.local_sgd()
  comp_cfg = engine.RoundConfig(K, H, B, compression=compression.Quantize(8))
  fn = engine.make_round_fn(loss, engine.classification_batch, optax.sgd(0.5), server, comp_cfg)
  with pytest.raises(ValueError, match="must be a CompressedState, from engine.init_round_state"):
    fn(params, server.init(params), jax.random.PRNGKey(0), data)
  wrong_k = engine.init_round_state(server, engine.RoundConfig(
      2, H, B, compression=compression.Quantize(8)), params)
  with pytest.raises(ValueError, match="K=4 stacked worker states"):
    fn(params, wrong_k, jax.random.PRNGKey(0), data)
  plain = engine.make_round_fn(loss, engine.classification_batch, optax.sgd(0.5), server,
                               engine.RoundConfig(K, H, B))
  with pytest.raises(ValueError, match="RoundConfig.compression is None"):
    plain(params, engine.init_round_state(server, comp_cfg, params), jax.random.PRNGKey(0), data)
  with pytest.raises(ValueError, match="must be an optax_localsgd.compression.Compression"):
    engine.RoundConfig(K, H, B, compression=compression.top_k(0.1))
  with pytest.raises(ValueError, match="data-parallel baselines send no deltas"):
    engine.make_data_parallel_round_fn(loss, engine.classification_batch, optax.sgd(0.1),
                                       comp_cfg)


def _script(out, devices, compress, servers, *extra):
  env = cpu_devices_env(devices)
  r = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--compress", compress,
                      "--servers", servers, *extra], env=env, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  return np.load(out)


# One server per compressor (each pair is two XLA compiles in each of two processes): the
# error-feedback residuals with the per-worker stack LAgg-A reads, the quantiser's per-worker
# random streams with the averaged delta.
@pytest.mark.parametrize("compress, server", [("top_k:0.1:ef", "lagg_a"),
                                              ("quantize:4", "local_sgd")])
def test_eight_devices_match_one_device_with_compression(tmp_path, compress, server):
  """shard_map over 8 CPU devices, one worker each: the same numbers as vmap on one device,
  the compressor states included (they stay with their workers' devices between rounds)."""
  one = _script(tmp_path / "one.npz", 1, compress, server)
  eight = _script(tmp_path / "eight.npz", 8, compress, server, "--mesh")
  assert int(one["n_devices"]) == 1 and int(eight["n_devices"]) == 8
  assert set(one.files) == set(eight.files)
  workers = [f for f in one.files if "/workers" in f]
  assert workers
  for f in sorted(set(one.files) - {"n_devices"}):
    np.testing.assert_allclose(one[f], eight[f], rtol=1e-4, atol=1e-6, err_msg=f)
  assert float(one[f"{server}/bits"]) < 8 * 32 * (6 * 16 + 16 + 16 * 3 + 3)


# ------------------------------------------------------------------------------------------
# The harness, the CLI and the meta-trainer.


def test_train_with_compress_counts_the_bits(tmp_path):
  assert cli.main(["train", "--task", "fmnist_mlp", "--server", "slowmo", "--local-lr", "0.1",
                   "-K", "4", "-H", "2", "-B", "16", "--rounds", "3", "--eval-every", "3",
                   "--compress", "top_k:0.01:ef", "--quiet", "--out", str(tmp_path)]) == 0
  (hist,) = json.loads((tmp_path / "metrics.json").read_text())
  assert hist["config"]["compress"] == "top_k:0.01:ef"
  # fmnist_mlp: 784-128-128-10, kernels and biases.
  sizes = (784 * 128, 128, 128 * 128, 128, 128 * 10, 10)
  per_worker = sum(-(-n // 100) * (32 + int(np.ceil(np.log2(n)))) for n in sizes)
  assert hist["bits_per_round"] == 4 * per_worker
  assert np.isfinite(hist["global_train_loss"][-1])


@pytest.mark.parametrize("args, msg", [
    (["train", "--compress", "top_k:0", "--rounds", "1"], "--compress: Bad compression spec"),
    (["train", "--compress", "quantize:3", "--rounds", "1"], "bits must be one of (2, 4, 8)"),
    (["train", "--server", "adam", "--compress", "quantize:4", "--rounds", "1"],
     "adam is a data-parallel baseline"),
    (["evaluate", "--compress", "top_k:0.1"], "drop the data-parallel ['sgd', 'adam']"),
    (["meta-train", "--optimizer", "lopt_a", "--task", "fmnist_mlp", "--compress", "gzip",
      "--out", "/nonexistent/never-written"], "--compress: Bad compression spec 'gzip'"),
])
def test_bad_compress_flags_give_clear_errors(args, msg, capsys):
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("optax-localsgd: error: ") and msg in err, err


@pytest.mark.parametrize("optimizer,compress", [("lopt_a", "top_k:0.1:ef"),
                                                ("lagg_a", "quantize:2")])
def test_meta_training_through_a_compressor(tmp_path, optimizer, compress):
  from optax_localsgd.meta.problem import PESConfig
  from optax_localsgd.meta.train import MetaTrainConfig, _setup, meta_train
  cfg = MetaTrainConfig(
      optimizer=optimizer, tasks=(SMALL_MLP,), workers=2, local_steps=2, batch_size=16,
      tasks_per_estimate=2, checkpoint_every=1000, compress=compress,
      pes=PESConfig(truncation=3, min_inner=6, max_inner=12, outer_steps=3, warmup_steps=1))
  _, _, state = _setup(cfg)
  workers = state.groups[0].server_state.workers
  assert all(x.shape[:3] == (2, 2, 2) for x in jax.tree.leaves(workers))  # (n, +/-, K)
  first = meta_train(cfg, tmp_path, progress=False, stop_after=2)
  assert all(np.isfinite(first["log"]["meta_loss"]))
  res = meta_train(cfg, tmp_path, resume=True, progress=False)
  assert res["step"] == 3
  info = pretrained.metadata(res["weights"])["info"]
  assert info["compress"] == compress
  # A checkpoint of a compressed run is not resumed uncompressed.
  with pytest.raises(ValueError, match="compress"):
    meta_train(MetaTrainConfig(**{**cfg.__dict__, "compress": None}), tmp_path, resume=True,
               progress=False)


def test_the_evaluation_passes_compress_to_every_run():
  from optax_localsgd.harness import evaluation
  cfg = evaluation.EvalConfig(methods=("local_sgd", "slowmo"), compress="top_k:0.01")
  tc = evaluation.run_config(cfg, "slowmo", 100, {"slowmo": {"local_lr": 0.1}})
  assert tc.compress == "top_k:0.01"
  plain = evaluation.run_config(evaluation.EvalConfig(methods=("local_sgd",)), "local_sgd", 100,
                                {"local_sgd": {"local_lr": 0.1}})
  # Uncompressed runs keep the fingerprint they had before the field existed.
  d = {k: v for k, v in plain.__dict__.items() if k not in ("data_dir", "compress")}
  import hashlib
  assert evaluation._fingerprint(plain, None) == hashlib.sha256(
      json.dumps([d, None], sort_keys=True).encode()).hexdigest()[:16]
  with pytest.raises(ValueError, match="Bad compression spec"):
    trainer.TrainConfig(compress="top_k")
