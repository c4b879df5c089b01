"""The examples run as a new user runs them: ``python examples/X.py ...`` from a fresh folder.

The ViT runs use ``--depth 1`` (one transformer block instead of DeiT-tiny's 12): on two busy
CPU cores, compiling the 12-block round with LOpt-A took 40 s, one block 15-20 s. All runs
share one persistent XLA compilation cache, so the ViT runs after the first one reuse the
compiled round (and take about 10 s each, mostly tracing and start-up).
"""

import importlib.util
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import cpu_devices_env

import optax_localsgd as ol

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Smallest ViT run: K=2 workers x H=1 step of B=4 images, one block, evals on 40 images.
VIT_SMALL = ["-K", "2", "-H", "1", "-B", "4", "--depth", "1", "--eval-every", "2",
             "--eval-examples", "40", "--quiet"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """The environment of every example run: one CPU device, cheap compiles, a shared cache.

  XLA's backend optimisation level 0 compiles the ViT round about 40% faster; the programs
  run a little slower, which does not matter for a few rounds, and all runs here use it, so
  runs compared with each other are the same program.
  """
  cache = tmp_path_factory.mktemp("jax_cache")
  return os.environ | {"JAX_COMPILATION_CACHE_DIR": str(cache),
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_backend_optimization_level=0"}


def example(name, *args, cwd, env, timeout=600):
  return subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def lopt_weights(tmp_path_factory):
  """A weight file of fresh LOpt-A meta-parameters (the test must not need bundled ones)."""
  path = tmp_path_factory.mktemp("weights") / "lopt_a.safetensors"
  ol.pretrained.save(path, ol.init_lopt_a(jax.random.PRNGKey(0)), {"made_by": __name__})
  return path


def write_imagenet32(folder, n_train=240, n_val=60, classes=5, seed=0):
  """A tiny set in the published Imagenet32 layout, with learnable classes.

  Each file holds ``data``, uint8 ``(N, 3072)`` channel-major rows (1024 R, 1024 G, 1024 B),
  and ``labels``, a list of 1-based ints; train files also hold ``mean``, float64 ``(3072,)``.
  """
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)

  def rows(n):
    labels = rng.integers(1, classes + 1, n)
    # Class c has mean brightness 40*c in every channel, so the classes are separable.
    data = np.clip(40.0 * labels[:, None] + rng.normal(0, 30, (n, 3072)), 0, 255)
    return data.astype(np.uint8), [int(v) for v in labels]

  data, labels = rows(n_train)
  np.savez(folder / "train_data_batch_1.npz", data=data, labels=labels, mean=data.mean(0))
  data, labels = rows(n_val)
  np.savez(folder / "val_data.npz", data=data, labels=labels)
  return folder


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  return write_imagenet32(tmp_path_factory.mktemp("imagenet32"))


def checkpoint_leaves(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files if k.startswith("leaf_")}


def test_quickstart_prints_results(tmp_path, env):
  r = example("quickstart.py", cwd=tmp_path, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  assert r.stdout.count("loss after 30 rounds") == 3


def test_custom_loop_trains_with_a_weights_file(tmp_path, env, lopt_weights):
  r = example("custom_loop.py", "--weights", lopt_weights, "--rounds", "4", "--print-every",
              "2", "-K", "2", "-H", "2", "-B", "16", cwd=tmp_path, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  assert [l.split()[1] for l in r.stdout.splitlines() if l.startswith("round")] == ["2", "4"]
  assert "test accuracy after 4 rounds" in r.stdout


def test_vit_stops_on_sigterm_and_resumes_exactly(tmp_path, env, lopt_weights, imagenet_dir):
  common = ["--data-dir", imagenet_dir, "--weights", lopt_weights, *VIT_SMALL,
            "--checkpoint-every", 2]
  proc = subprocess.Popen(
      [sys.executable, str(EXAMPLES / "vit_imagenet.py"), *map(str, common), "--rounds",
       "100000", "--out", "a"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  ckpt = tmp_path / "a" / "checkpoint.npz"
  deadline = time.monotonic() + 300
  while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
    time.sleep(0.2)  # the first checkpoint: the training loop and its signal handler run
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
  assert "--resume" in err and "Traceback" not in err
  done = json.loads(out.splitlines()[-1])["round"]
  assert 2 <= done < 100_000 and done % 2 == 0
  log = json.loads((tmp_path / "a" / "log.json").read_text())
  assert log["config"]["num_classes"] == 5  # inferred from the 1-based labels
  assert log["rounds"] == list(range(1, done + 1)) and len(log["train_loss"]) == done
  assert log["eval_rounds"] == list(range(0, done + 1, 2))
  assert all(0 <= a <= 1 for a in log["val_accuracy"])
  assert (tmp_path / "a" / "curve.png").read_bytes()[:8] == PNG_MAGIC

  # Resume to two rounds more, and compare with the same number of rounds in one go.
  total = done + 2
  r = example("vit_imagenet.py", *common, "--rounds", total, "--out", "a", "--resume",
              cwd=tmp_path, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  r = example("vit_imagenet.py", *common, "--rounds", total, "--out", "b", cwd=tmp_path,
              env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  resumed, straight = (json.loads((tmp_path / d / "log.json").read_text()) for d in "ab")
  assert resumed["rounds"] == list(range(1, total + 1))
  for k in ("train_loss", "eval_rounds", "val_loss", "val_accuracy"):
    assert resumed[k] == straight[k], k
  a, b = (checkpoint_leaves(tmp_path / d / "checkpoint.npz") for d in "ab")
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert json.loads(r.stdout.splitlines()[-1])["val_accuracy"] == straight["val_accuracy"][-1]


def test_vit_on_two_devices_shards_the_learned_step_and_resumes(tmp_path, env, lopt_weights,
                                                                imagenet_dir):
  """Two devices: LOpt-A's server step is sharded (ZeRO-1); the losses are those of one device,
  and a resumed run (the sharded state through the checkpoint) equals a straight one."""
  two = cpu_devices_env(2, base=env)
  common = ["--data-dir", imagenet_dir, "--weights", lopt_weights, *VIT_SMALL,
            "--checkpoint-every", 2]
  for out, rounds, extra, e in (("one", 4, [], env), ("a", 2, ["--devices", 2], two),
                                ("a", 4, ["--devices", 2, "--resume"], two),
                                ("b", 4, ["--devices", 2], two)):
    r = example("vit_imagenet.py", *common, *extra, "--rounds", rounds, "--out", out,
                cwd=tmp_path, env=e)
    assert r.returncode == 0, r.stderr[-2000:]
  one, resumed, straight = (json.loads((tmp_path / d / "log.json").read_text())
                            for d in ("one", "a", "b"))
  assert straight["sharded_server"] and straight["devices"] == 2 and not one["sharded_server"]
  assert resumed["val_loss"] == straight["val_loss"]
  np.testing.assert_allclose(straight["val_loss"], one["val_loss"], rtol=1e-4)
  np.testing.assert_allclose(straight["train_loss"], one["train_loss"], rtol=1e-4)


def test_vit_with_slowmo(tmp_path, env, imagenet_dir):
  r = example("vit_imagenet.py", "--data-dir", imagenet_dir, "--server", "slowmo",
              "--server-lr", "1.0", "--momentum", "0.5", *VIT_SMALL, "--rounds", 2,
              "--out", "s", cwd=tmp_path, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  log = json.loads((tmp_path / "s" / "log.json").read_text())
  assert log["config"]["server"] == "slowmo" and len(log["val_accuracy"]) == 2


def load_example(name):
  """The example as a module, to call its ``main(argv)`` in this process (no JAX start-up)."""
  spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_vit_errors_are_one_clear_line(tmp_path, imagenet_dir, capsys, monkeypatch):
  monkeypatch.chdir(tmp_path)
  lagg8 = tmp_path / "lagg_a_k8.safetensors"
  ol.pretrained.save(lagg8, ol.init_lagg_a(jax.random.PRNGKey(0), 8), {})
  main = load_example("vit_imagenet").main
  cases = [
      (["--data-dir", tmp_path / "no_such_dir"], [str(tmp_path / "no_such_dir"),
                                                   "image-net.org"]),
      (["--data-dir", tmp_path], ["train_data_batch", str(tmp_path)]),
      (["--data-dir", imagenet_dir, "--resume", "--out", "nothing_here"],
       ["--resume: no checkpoint", "nothing_here"]),
      (["--data-dir", imagenet_dir, "--server", "lagg_a", "--weights", lagg8, "-K", "2"],
       ["K=8", "k=2"]),
      (["--data-dir", imagenet_dir, "--weights", tmp_path / "missing.safetensors"],
       ["missing.safetensors", "--untrained"]),
  ]
  for args, needles in cases:
    assert main([str(a) for a in args]) == 2, args
    err = capsys.readouterr().err
    assert err.startswith("vit_imagenet.py: error:"), err
    for needle in needles:
      assert needle in err, (needle, err)


@pytest.mark.parametrize("server", ["lopt_a", "lagg_a"])
def test_vit_defaults_to_the_bundled_imagenet_mlp_weights(server, tmp_path):
  """The paper's ViT result uses optimizers meta-trained on the ImageNet MLP; so does ours."""
  vit = load_example("vit_imagenet")
  args = vit.build_parser().parse_args(["--data-dir", str(tmp_path), "--server", server])
  meta, identity = vit.load_meta(args)  # what a run without --weights trains with
  name = f"{server}/tiny_imagenet32_mlp_k8_h4"
  assert identity == f"arrays sha256 {ol.pretrained.metadata(name)['arrays_sha256']}"
  assert meta.config == ol.pretrained.load(name).config
  assert ol.pretrained.metadata(name)["info"]["tasks"] == ["imagenet32_mlp"]


def test_custom_loop_without_weights_says_what_to_do(tmp_path, capsys):
  assert load_example("custom_loop").main(["--weights", str(tmp_path / "missing.safetensors")]) == 2
  err = capsys.readouterr().err
  assert "missing.safetensors" in err and "--untrained" in err


def test_compare_in_your_loop_runs_the_learned_and_tuned_servers(tmp_path, env, lopt_weights):
  """Two rounds of local SGD and LOpt-A in the plain loop; the table and the JSON come out."""
  r = example("compare_in_your_loop.py", "--methods", "local_sgd,diloco,lopt_a", "--weights",
              f"lopt_a={lopt_weights}", "--rounds", "2", "--eval-every", "1", "--seeds", "0",
              "--hidden", "16", "--out", tmp_path / "out", cwd=tmp_path, env=env)
  assert r.returncode == 0, r.stderr[-2000:]
  assert "| lopt_a |" in r.stdout and "| diloco |" in r.stdout
  got = json.loads((tmp_path / "out" / "compare.json").read_text())
  assert set(got["table"]) == {"local_sgd", "diloco", "lopt_a"}
  assert len(got["curves"]["lopt_a"]["0"]["loss"]) == 3  # round 0, 1 and 2
  bad = example("compare_in_your_loop.py", "--methods", "adamw", cwd=tmp_path, env=env)
  assert bad.returncode == 2 and "unknown method 'adamw'" in bad.stderr
