"""experiments/gpu_campaign.py: the selection rule, the candidates, and the train stage at tiny
scale on the CPU (the device call's first stage, its packing and summary)."""

import importlib.util
import json
import pathlib
import sys
import tarfile

import pytest

from optax_localsgd import pretrained

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "gpu_campaign.py"


@pytest.fixture(scope="module")
def campaign():
  spec = importlib.util.spec_from_file_location("gpu_campaign", SCRIPT)
  mod = importlib.util.module_from_spec(spec)
  sys.modules["gpu_campaign"] = mod
  spec.loader.exec_module(mod)
  return mod


def _eval_json(path, optimizer, speedup, loss):
  path.write_text(json.dumps({"summary": {optimizer: {"speedup": [speedup, 0.0],
                                                      "final_train_loss": [loss, 0.0]}}}))
  return path


def test_selection_prefers_speedup_then_final_loss(campaign, tmp_path):
  a = campaign.score(_eval_json(tmp_path / "a.json", "lopt_a", 3.0, 0.12), "lopt_a")
  b = campaign.score(_eval_json(tmp_path / "b.json", "lopt_a", 3.0, 0.10), "lopt_a")
  c = campaign.score(_eval_json(tmp_path / "c.json", "lopt_a", 3.2, 0.50), "lopt_a")
  never = campaign.score(_eval_json(tmp_path / "d.json", "lopt_a", None, 0.01), "lopt_a")
  nan = campaign.score(_eval_json(tmp_path / "e.json", "lopt_a", 3.0, float("nan")), "lopt_a")
  assert sorted([a, b, c, never, nan]) == [c, b, a, nan, never]


def test_candidates_are_the_final_weights_and_spread_snapshots(campaign, tmp_path):
  run = tmp_path / "run"
  (run / "snapshots").mkdir(parents=True)
  snaps = [run / "snapshots" / f"weights_step{s:06d}.safetensors" for s in range(100, 1100, 100)]
  for p in snaps:
    p.write_text("")
  assert campaign.candidates(run, 4) == [snaps[1], snaps[4], snaps[6], snaps[9]]  # no final yet
  (run / "weights.safetensors").write_text("")
  # The last snapshot is a few steps before the final weights: not a candidate of its own.
  assert campaign.candidates(run, 4) == [run / "weights.safetensors", snaps[2], snaps[5],
                                         snaps[8]]
  assert campaign.candidates(run, 1) == [run / "weights.safetensors"]


def test_each_optimizer_and_h_is_selected_and_evaluated_at_its_own_h(campaign):
  # The selection picks one weight file per optimizer and H; H = 16 weights are evaluated at 16.
  assert campaign.group_of(campaign.VARIANTS["lagg_h16"]) == "lagg_a_h16"
  assert campaign.group_of(campaign.VARIANTS["lagg_cont64"]) == "lagg_a_h4"
  assert campaign.group_of("--optimizer lopt_a --task fmnist_mlp") == "lopt_a_h4"
  assert campaign.setting_of("--optimizer lagg_a --task t -H 4 --local-steps 8") == ("lagg_a", 8)
  assert campaign.setting_of(campaign.VARIANTS["lagg_nom64"]) == ("lagg_a", 4)
  assert campaign.setting_of(campaign.VARIANTS["lopt_paper"]) == ("lopt_a", 4)
  for name in campaign.ROUND7.split(",") + campaign.ROUND8.split(","):
    assert name in campaign.VARIANTS


def test_train_stage_packs_weights_logs_and_summary(campaign, tmp_path):
  out = tmp_path / "out"
  assert campaign.main(["--out", str(out), "--work", str(tmp_path / "work"), "--scale", "tiny",
                        "--train-s", "0", "--stages", "train", "--variants", "lagg_out64"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  run = summary["stages"]["train"]["runs"]["lagg_out64"]
  assert run["rc"] == 0 and run["steps"] == 1
  with tarfile.open(out / "campaign.tar.gz") as tar:
    names = set(tar.getnames())
  assert {"runs/lagg_out64/weights.safetensors", "runs/lagg_out64/log.json",
          "runs/lagg_out64/snapshots/weights_step000001.safetensors"} <= names
  assert not any(n.endswith(".npz") or "jax_cache" in n for n in names)
  # The weights say where they were meta-trained (a model card names it).
  info = pretrained.metadata(tmp_path / "work" / "runs" / "lagg_out64" / "weights.safetensors")
  assert info["info"]["device"] == "cpu" and info["info"]["outer_steps"] == 1
