"""experiments/gpu_full_recipe.sh, the one-command GPU recipe, at tiny scale on the CPU."""

import json
import os
import pathlib
import subprocess

from conftest import SMALL_MLP
from optax_localsgd import pretrained

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "gpu_full_recipe.sh"
TINY = ["-K", "2", "-H", "2", "-B", "16", "--tasks-per-estimate", "2", "--truncation", "2",
        "--min-inner", "4", "--max-inner", "8", "--warmup-steps", "1"]


def test_gpu_recipe_writes_weights_within_its_time_budget_and_resumes(tmp_path):
  # The recipe's mechanics (budget, export, resume) on the small MLP.
  env = os.environ | {"OUT": str(tmp_path), "TIME_BUDGET": "0", "TASK": SMALL_MLP}
  run = lambda *extra: subprocess.run(["bash", str(SCRIPT), "lagg_a", *TINY, *extra], env=env,
                                      capture_output=True, text=True, timeout=900)
  first = run()
  assert first.returncode == 0, first.stderr[-2000:]
  summary = json.loads(first.stdout.strip().splitlines()[-1])
  assert summary["interrupted"] and summary["step"] == 1
  info = pretrained.metadata(tmp_path / "lagg_a" / "weights.safetensors")["info"]
  assert info["optimizer"] == "lagg_a" and info["outer_steps"] == 1
  assert info["outer_steps_planned"] == 5000 and info["pes"]["truncation"] == 2
  assert info["tasks"] == [SMALL_MLP]
  second = run("--resume")
  assert second.returncode == 0, second.stderr[-2000:]
  assert json.loads(second.stdout.strip().splitlines()[-1])["step"] == 2
