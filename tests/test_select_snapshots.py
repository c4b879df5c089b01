"""experiments/select_snapshots.py: the snapshot selection of docs/meta.md picks, by the rule it
states, between real evaluations of a run's snapshots and its starting weights."""

import dataclasses
import pathlib
import subprocess
import sys

import jax.numpy as jnp

import optax_localsgd as ol

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "select_snapshots.py"


def test_the_lowest_final_loss_wins_and_a_broken_snapshot_loses(tmp_path):
  start = "lopt_a/fmnist_mlp_k8_h4"
  meta = ol.pretrained.load(start)
  info = ol.pretrained.metadata(start)["info"]
  snaps = tmp_path / "run" / "snapshots"
  snaps.mkdir(parents=True)
  ol.pretrained.save(snaps / "weights_step000010.safetensors", meta, info)
  # An output layer of zeros: LOpt-A's step is zero, the model never leaves its init.
  dead = dataclasses.replace(meta, mlp=meta.mlp | {"w2": jnp.zeros_like(meta.mlp["w2"]),
                                                 "b2": jnp.zeros_like(meta.mlp["b2"])})
  ol.pretrained.save(snaps / "weights_step000020.safetensors", dead, info)
  out = tmp_path / "sel"
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--optimizer", "lopt_a", "--run", str(tmp_path / "run"),
       "--start", start, "--seeds", "200", "--rounds", "12", "--target-loss", "0.7",
       "--out", str(out)], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = (out / "lopt_a_selection.md").read_text()
  rows = [line for line in table.splitlines() if line.startswith("| lopt_a_")]
  # The reference and the three candidates, sorted by final loss: the dead snapshot last.
  assert len(rows) == 4 and rows[-1].startswith("| lopt_a_step000020 (lopt_a)")
  assert any(line.startswith("| lopt_a_diloco (diloco)") for line in rows)
  # The snapshot equal to the start ties with it; the tie goes to the start.
  assert "pick: lopt_a_start = lopt_a/fmnist_mlp_k8_h4" in table
  assert "**(pick)**" in next(r for r in rows if r.startswith("| lopt_a_start"))
  # Local SGD (for the speedups) trained once: every candidate's cache holds the same history,
  # down to its wall time.
  local = [f.read_text() for f in sorted((out / "cache").glob("*/local_sgd_seed200.json"))]
  assert len(local) == 4 and len(set(local)) == 1


def test_a_run_without_snapshots_is_refused(tmp_path):
  (tmp_path / "run").mkdir()
  proc = subprocess.run(
      [sys.executable, str(SCRIPT), "--optimizer", "lopt_a", "--run", str(tmp_path / "run"),
       "--out", str(tmp_path / "sel")], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "no snapshots in" in proc.stderr
