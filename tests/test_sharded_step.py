"""LOpt-A's sharded (ZeRO-1) server step equals the replicated one (engine/zero.py,
transforms/learned/sharded.py): 8 virtual CPU devices, tensors of rank 0 to 4 whose sizes are
not multiples of 8, both feature sets, three rounds of state."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import cpu_devices_env

SCRIPT = pathlib.Path(__file__).with_name("sharded_step_script.py")


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharded") / "r.npz"
  proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out)], env=cpu_devices_env(8),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
  r = np.load(out)
  assert int(r["n_devices"]) == 8
  return r


SHAPES = ("scalar", "bias", "dense", "conv", "rank3", "wide")


@pytest.mark.parametrize("fset", ["ada-v2", "ada-v1"])
@pytest.mark.parametrize("name", SHAPES)
def test_sharded_updates_equal_replicated_updates(result, fset, name):
  p0 = result[f"params0/{name}"]
  moved = result[f"{fset}/replicated/{name}"] - p0
  assert np.abs(moved).max() > 1e-4  # the three steps really moved the weights
  np.testing.assert_allclose(result[f"{fset}/sharded/{name}"] - p0, moved, rtol=2e-4,
                             atol=2e-4 * np.abs(moved).max())


@pytest.mark.parametrize("name", SHAPES)
def test_the_sharded_step_runs_its_mlp_in_the_requested_dtype(result, name):
  """mlp_dtype="bfloat16" reaches the sharded step: its result is the replicated bfloat16
  step's (up to operands that round differently after the normaliser's reordered sums), much
  closer to it than to the float32 step's."""
  p0 = result[f"params0/{name}"]
  f32 = result[f"ada-v2/replicated/{name}"] - p0
  bf16 = result[f"ada-v2-bf16/replicated/{name}"] - p0
  sharded = result[f"ada-v2-bf16/sharded/{name}"] - p0
  gap = np.abs(bf16 - f32).max()
  assert gap > 1e-6 * np.abs(f32).max()  # bfloat16 operands change the update
  assert np.abs(sharded - bf16).max() <= 0.1 * gap


@pytest.mark.parametrize("fset", ["ada-v2", "ada-v1"])
@pytest.mark.parametrize("name", SHAPES)
def test_sharded_state_is_the_replicated_state_sliced(result, fset, name):
  # The momenta live in slices on the devices; gathered, they are the replicated ones. The
  # factored statistics are reduced over the devices and kept whole.
  for what in ("m", "row"):
    np.testing.assert_allclose(result[f"{fset}/sharded_{what}/{name}"],
                               result[f"{fset}/replicated_{what}/{name}"], rtol=1e-5, atol=1e-9)


def test_train_over_devices_shards_the_server_step_and_matches_one_device(tmp_path):
  """``optax-localsgd train --devices 8``: the workers over 8 devices and the learned server step
  sharded over them (ZeRO-1), the same history as on one device to float tolerance."""
  hists = {}
  for devices in (1, 8):
    out = tmp_path / f"d{devices}"
    proc = subprocess.run(
        [sys.executable, "-m", "optax_localsgd.cli", "train", "--task", "fmnist_mlp",
         "--server", "lopt_a", "--weights", "lopt_a/fmnist_mlp_k8_h4", "-K", "8", "-H", "2",
         "-B", "16", "--rounds", "4", "--eval-every", "2", "--devices", str(devices), "--quiet",
         "--out", str(out)], env=cpu_devices_env(8), capture_output=True, text=True,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (hists[devices],) = json.loads((out / "metrics.json").read_text())
  assert hists[8]["sharded_server"] and not hists[1]["sharded_server"]
  one, eight = (np.asarray(hists[d]["global_train_loss"]) for d in (1, 8))
  assert one[-1] < one[0] - 0.05  # it trains
  np.testing.assert_allclose(eight, one, rtol=1e-4)
