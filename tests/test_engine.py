"""The local-SGD round: same numbers on 1 device, 8 devices and 2 processes; input errors."""

import math
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_localsgd as ol
from optax_localsgd import engine
from conftest import cpu_devices_env

SCRIPT = pathlib.Path(__file__).with_name("engine_script.py")
SERVERS = ("local_sgd", "slowmo", "lopt_a", "lagg_a")


def _run(out, devices, *extra, **popen):
  env = cpu_devices_env(devices)
  return subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), *extra], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _wait(*procs):
  for p in procs:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
  out = tmp_path_factory.mktemp("engine") / "one.npz"
  _wait(_run(out, 1))
  r = np.load(out)
  assert r["n_devices"] == 1
  return r


def _assert_same(a, b, servers=SERVERS):
  for s in servers:
    np.testing.assert_allclose(a[f"{s}/losses"], b[f"{s}/losses"], rtol=1e-5, err_msg=s)
    for k in ("w1", "b1", "w2", "b2"):
      np.testing.assert_allclose(a[f"{s}/{k}"], b[f"{s}/{k}"], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{s}/{k}")
    # The rounds really trained something (guards against comparing two no-ops).
    assert not np.allclose(a[f"{s}/w1"], b["local_sgd/w1"]) or s == "local_sgd"


def test_eight_devices_match_one_device(single_device, tmp_path):
  out = tmp_path / "eight.npz"
  _wait(_run(out, 8, "--mesh"))
  r = np.load(out)
  assert r["n_devices"] == 8
  _assert_same(single_device, r)


def test_two_processes_match_one_process(single_device, tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  out = tmp_path / "two.npz"
  procs = [_run(out, 4, "--mesh", "--num-processes", "2", "--process-id", str(i),
                "--local-devices", "4", "--port", str(port)) for i in range(2)]
  _wait(*procs)
  r = np.load(out)
  assert r["n_devices"] == 8  # 2 processes x 4 CPU devices, one global mesh
  _assert_same(single_device, r)


# The ZeRO-1 server step (engine/zero.py): elementwise server transforms, and LOpt-A and LAgg-A,
# which reduce their tensor-wide statistics over the devices (transforms/learned/sharded.py).
SHARDABLE = ("local_sgd", "slowmo", "diloco", "adam", "lopt_a_trained", "lagg_a_trained")


@pytest.fixture(scope="module")
def single_device_shardable(tmp_path_factory):
  out = tmp_path_factory.mktemp("engine") / "one_shardable.npz"
  _wait(_run(out, 1, "--servers", ",".join(SHARDABLE)))
  return np.load(out)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_sharded_server_step_equals_the_replicated_one(single_device_shardable, tmp_path):
  """8 devices, each owning 1/8 of every tensor's server state and step, give the numbers of
  one device running the whole step; each device keeps only its slice of the state."""
  out = tmp_path / "zero8.npz"
  _wait(_run(out, 8, "--mesh", "--shard-server", "--servers", ",".join(SHARDABLE)))
  r = np.load(out)
  assert r["n_devices"] == 8
  _assert_same(single_device_shardable, r, SHARDABLE)
  # SlowMo's state: per tensor, a momentum slice of ceil(size / 8) entries on each device.
  sizes = sorted({math.ceil(n / 8) for n in (6 * 16, 16, 16 * 3, 3)})
  momenta = [r[f] for f in r.files if f.startswith("slowmo/server") and r[f].ndim == 2]
  assert sorted({m.shape[1] for m in momenta}) == sizes
  assert all(m.shape[0] == 8 for m in momenta)


def test_sharded_server_step_over_two_processes_with_compression(tmp_path):
  """jax.distributed, 2 processes x 4 devices, error-feedback top-k on the workers and the
  sharded server step (LAgg-A's all-to-all crossing the processes): one device's numbers."""
  flags = ("--servers", "local_sgd,slowmo,lagg_a_trained", "--compress", "top_k:0.1:ef")
  one = tmp_path / "one.npz"
  _wait(_run(one, 1, *flags))
  port, out = _free_port(), tmp_path / "two.npz"
  _wait(*[_run(out, 4, *flags, "--mesh", "--shard-server", "--num-processes", "2",
               "--process-id", str(i), "--local-devices", "4", "--port", str(port))
          for i in range(2)])
  a, b = np.load(one), np.load(out)
  assert b["n_devices"] == 8
  _assert_same(a, b, ("local_sgd", "slowmo", "lagg_a_trained"))
  for f in (f for f in a.files if "/workers" in f):  # the residuals stay per worker
    np.testing.assert_allclose(a[f], b[f], rtol=1e-4, atol=1e-6, err_msg=f)


def test_sharded_server_step_refuses_what_it_cannot_shard():
  data, params, loss = _toy()
  mesh = engine.worker_mesh(jax.devices()[:1])
  cfg = engine.RoundConfig(num_workers=4, local_steps=1, batch_size=4)
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="pass mesh=engine.worker_mesh"):
    engine.make_round_fn(loss, engine.classification_batch, sgd, ol.local_sgd(), cfg,
                         shard_server=True)
  # A custom leaf step works on whole tensors: LOpt-A says so instead of ignoring it.
  meta = ol.init_lopt_a(jax.random.PRNGKey(0))
  server = ol.lopt_a(meta, leaf_step=ol.transforms.learned.mlp.reference_leaf_step)
  state = engine.init_round_state(server, cfg, params, mesh, shard_server=True)
  round_fn = engine.make_round_fn(loss, engine.classification_batch, sgd, server, cfg, mesh,
                                  shard_server=True)
  with pytest.raises(ValueError, match="custom leaf_step"):
    round_fn(params, state, jax.random.PRNGKey(0), data)
  # A replicated state handed to the sharded round is named.
  plain = ol.local_sgd()
  round_fn = engine.make_round_fn(loss, engine.classification_batch, sgd, plain, cfg, mesh,
                                  shard_server=True)
  with pytest.raises(ValueError, match="shard_server=True"):
    round_fn(params, plain.init(params), jax.random.PRNGKey(0), data)


def _toy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 3)).astype(np.float32)
  data = engine.DeviceData({"x": x, "y": (x[:, 0] > 0).astype(np.int32)},
                           np.arange(64, dtype=np.int32).reshape(4, 16))
  params = {"w": jnp.zeros((3, 2))}
  loss = lambda p, b: optax.softmax_cross_entropy_with_integer_labels(
      b["x"] @ p["w"], b["y"]).mean()
  return data, params, loss


def test_local_sgd_round_equals_mean_of_worker_weights():
  """One round with local_sgd(1) lands exactly on the workers' average (Algorithm 1)."""
  data, params, loss = _toy()
  cfg = engine.RoundConfig(4, 3, 5)
  fn = engine.make_round_fn(loss, engine.classification_batch, optax.sgd(0.5),
                            ol.local_sgd(1.0), cfg)
  key = jax.random.PRNGKey(0)
  new, _, m = jax.jit(fn)(params, ol.local_sgd().init(params), key, data)
  # Re-run the workers by hand with the same keys.
  finals, losses = [], []
  for kk, shard in zip(jax.random.split(key, 4), data.shards):
    idx = engine.sample_indices(kk, jnp.asarray(shard), 15).reshape(3, 5)
    p = params
    for h in range(3):
      b = engine.classification_batch(jax.tree.map(jnp.asarray, data.arrays), idx[h])
      l, g = jax.value_and_grad(loss)(p, b)
      losses.append(l)
      p = jax.tree.map(lambda w, gg: w - 0.5 * gg, p, g)
    finals.append(p["w"])
  np.testing.assert_allclose(new["w"], np.mean(finals, axis=0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m["train_loss"], np.mean(losses), rtol=1e-5)


def test_sample_indices_stay_in_shard_and_do_not_repeat_within_an_epoch():
  shard = jnp.arange(100, 120)
  idx = engine.sample_indices(jax.random.PRNGKey(0), shard, 20)
  assert sorted(np.asarray(idx).tolist()) == list(range(100, 120))
  long = engine.sample_indices(jax.random.PRNGKey(0), shard, 50)
  assert long.shape == (50,) and set(np.asarray(long).tolist()) <= set(range(100, 120))


def test_data_parallel_round_takes_one_step_on_khb_examples():
  data, params, loss = _toy()
  cfg = engine.RoundConfig(4, 2, 8)  # K*H*B = 64 = the whole toy set
  tx = optax.sgd(0.1)
  fn = engine.make_data_parallel_round_fn(loss, engine.classification_batch, tx, cfg)
  new, _, m = fn(params, tx.init(params), jax.random.PRNGKey(0), data)
  full = {k: jnp.asarray(v) for k, v in data.arrays.items()}
  l, g = jax.value_and_grad(loss)(params, full)
  np.testing.assert_allclose(new["w"], params["w"] - 0.1 * g["w"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(m["train_loss"], l, rtol=1e-5)


def test_bad_configurations():
  data, params, loss = _toy()
  with pytest.raises(ValueError, match="local_steps must be an integer >= 1"):
    engine.RoundConfig(4, 0, 5)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  with pytest.raises(ValueError, match="axis named 'workers'"):
    engine.make_round_fn(loss, engine.classification_batch, optax.sgd(0.1), ol.local_sgd(),
                         engine.RoundConfig(4, 1, 5), mesh)
  fn = engine.make_round_fn(loss, engine.classification_batch, optax.sgd(0.1), ol.local_sgd(),
                            engine.RoundConfig(8, 1, 5))
  with pytest.raises(ValueError, match="4 worker shards; K=8"):
    fn(params, ol.local_sgd().init(params), jax.random.PRNGKey(0), data)
