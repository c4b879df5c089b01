"""Plots leave the caller's matplotlib alone: no backend switch, no pyplot figures."""

import subprocess
import sys
import textwrap

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_keep_the_users_backend_and_pyplot_state(tmp_path):
  # A fresh interpreter, so the check sees only what the package itself imports and sets.
  script = textwrap.dedent(f"""
      import pathlib, sys
      import matplotlib
      matplotlib.use("svg")  # the user's choice, e.g. a notebook's inline backend
      from optax_localsgd.harness import evaluation, report
      from optax_localsgd.util import plotting
      out = pathlib.Path({str(tmp_path)!r})
      h = {{"label": "a", "eval_rounds": [0, 2], "global_train_loss": [1.0, 0.5],
            "rounds": [1, 2], "train_loss": [0.9, 0.6]}}
      plotting.plot_histories([h], out / "h.png", "title")
      cfg = evaluation.EvalConfig(methods=("local_sgd",), seeds=(1,), rounds=2)
      report.plot_curves(cfg, {{"local_sgd": [h]}}, out / "c.png")
      from optax_localsgd.meta import train
      log = {{"step": list(range(1, 31)), "meta_loss": [1.0 / s for s in range(1, 31)]}}
      train._plot(log, out / "s.png", train.MetaTrainConfig())
      assert matplotlib.get_backend() == "svg", matplotlib.get_backend()
      assert "matplotlib.pyplot" not in sys.modules
  """)
  r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-2000:]
  for name in ("h.png", "c.png", "s.png"):
    assert (tmp_path / name).read_bytes()[:8] == PNG
