"""The optax-localsgd command as a user runs it."""

import json
import pathlib
import subprocess
import sys

import pytest

from optax_localsgd import cli
from optax_localsgd.harness import demo


def _cli(*args, cwd=None):
  return subprocess.run([sys.executable, "-m", "optax_localsgd.cli", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=900)


def test_train_writes_json_log_and_png(tmp_path):
  r = _cli("train", "--task", "fmnist_mlp", "--server", "slowmo", "--local-lr", "0.1",
           "--rounds", "6", "--eval-every", "3", "-K", "4", "-H", "2", "--out", str(tmp_path))
  assert r.returncode == 0, r.stderr[-2000:]
  (hist,) = json.loads((tmp_path / "metrics.json").read_text())
  assert hist["eval_rounds"] == [0, 3, 6] and len(hist["train_loss"]) == 6
  assert hist["global_train_loss"][-1] < hist["global_train_loss"][0]
  assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "6/6 [" in r.stderr and "local_loss=" in r.stderr  # the progress bar


def test_demo_prints_a_comparison_table(tmp_path):
  from optax_localsgd import pretrained
  from optax_localsgd.harness import sweep
  r = _cli("demo", "--rounds", "4", "--eval-every", "2", "--out", str(tmp_path), "--quiet")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "| local SGD |" in r.stdout and "| SlowMo |" in r.stdout and "| DiLoCo |" in r.stdout
  if "lopt_a/fmnist_mlp_k8_h4" in pretrained.available():
    assert "| LOpt-A (lopt_a/fmnist_mlp_k8_h4) |" in r.stdout
  assert (tmp_path / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # DiLoCo trains with the shipped sweep's values for this setting, not the server defaults.
  runs = {h["label"]: h["config"] for h in json.loads((tmp_path / "demo.json").read_text())}
  tuned = sweep.tuned_hparams("fmnist_mlp/K8/H4/B128")["diloco"]
  assert {k: runs["DiLoCo"][k] for k in tuned} == tuned and runs["DiLoCo"]["server"] == "diloco"


def _without_matplotlib(monkeypatch):
  """Make every ``import matplotlib...`` fail, as on an install without the plot extra."""
  for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
    monkeypatch.setitem(sys.modules, name, None)
  monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_demo_without_matplotlib_says_how_to_get_the_plot(tmp_path, monkeypatch, capsys):
  _without_matplotlib(monkeypatch)
  assert cli.main(["demo", "--rounds", "2", "--eval-every", "1", "--out", str(tmp_path),
                   "--quiet"]) == 0
  out, err = capsys.readouterr()
  assert "| DiLoCo |" in out
  assert [l for l in err.splitlines() if l.startswith("note: no")] == [
      f"note: no {tmp_path / 'demo.png'}: matplotlib is not installed "
      '(pip install "optax-localsgd[plot]").']
  assert len(json.loads((tmp_path / "demo.json").read_text())) >= 3
  assert not (tmp_path / "demo.png").exists()


def test_demo_and_train_use_bundled_learned_weights(tmp_path, monkeypatch):
  import jax
  from optax_localsgd import init_lagg_a, pretrained
  from optax_localsgd.io import locate
  monkeypatch.chdir(pathlib.Path(__file__).resolve().parents[1])  # publish: maintainer tooling
  publish = cli.maintainer_tool("model_card").publish
  run = tmp_path / "run"
  run.mkdir()
  pretrained.save(run / "weights.safetensors", init_lagg_a(jax.random.PRNGKey(0), 8),
                  {"local_lr": 0.25, "command": "optax-localsgd meta-train ..."})
  publish(run / "weights.safetensors", "lagg_a/fmnist_mlp_k8_h4", tmp_path / "bundle")
  monkeypatch.setattr(locate, "bundled_dirs", lambda: [tmp_path / "bundle"])
  label, kw, meta = [r for r in demo.runs() if r[1]["server"] == "lagg_a"][0]
  assert label == "LAgg-A (lagg_a/fmnist_mlp_k8_h4)" and kw["local_lr"] == 0.25
  assert meta.config.num_workers == 8
  # train: the bundled default for this task/K/H, and a clear error for another K.
  assert cli._learned_weights("lagg_a", "fmnist_mlp", 8, 4, None)[1] == "lagg_a/fmnist_mlp_k8_h4"
  with pytest.raises(ValueError, match="for K=8 workers, but you asked for K=4"):
    cli._learned_weights("lagg_a", "fmnist_mlp", 4, 4, str(run / "weights.safetensors"))


@pytest.mark.parametrize("args, msg", [
    (["train", "--workers", "0"], "--workers must be >= 1"),
    (["train", "--task", "fmnist_mlp", "--data-dir", "/nonexistent/dir", "--rounds", "1"],
     "/nonexistent/dir"),
    (["train", "--server", "lagg_a", "-K", "8", "--devices", "64", "--rounds", "1"],
     "--devices 64 but JAX sees"),
    (["train", "--server", "lopt_a", "--weights", "/nonexistent/run", "--rounds", "1"],
     "Unknown pretrained weights '/nonexistent/run'"),
    (["evaluate", "--seeds", "100-1o9"], "--seeds expects e.g. 100-109"),
    (["evaluate", "--weights", "lopt_a"], "--weights expects METHOD=NAME_OR_PATH"),
    (["evaluate", "--task", "nope", "--methods", "local_sgd"],
     "has no tuned hyperparameters for nope/K8/H4/B128"),
    (["sweep", "--rounds", "2", "--min-rounds", "5"], "Need 1 <= min_rounds <= rounds"),
])
def test_bad_flags_give_clear_errors(args, msg, capsys):
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith("optax-localsgd: error: ") and msg in err, err


def test_meta_train_refuses_to_overwrite_a_run(tmp_path, capsys):
  (tmp_path / "checkpoint.npz").write_bytes(b"")
  assert cli.main(["meta-train", "--optimizer", "lopt_a", "--task", "fmnist_mlp", "--out",
                   str(tmp_path)]) == 2
  assert "checkpoint.npz exists: pass --resume" in capsys.readouterr().err


def test_internal_errors_keep_their_traceback(monkeypatch):
  # A ValueError that is not a UsageError is a bug: it must not be shortened to one line.
  def broken(args):
    raise ValueError("an internal bug")
  monkeypatch.setattr(cli, "cmd_train", broken)
  with pytest.raises(ValueError, match="an internal bug"):
    cli.main(["train"])


def test_unknown_task_lists_the_choices():
  r = _cli("train", "--task", "nope")
  assert r.returncode == 2 and "fmnist_mlp" in r.stderr
