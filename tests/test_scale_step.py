"""experiments/scale_step.py: the scaled weights' update is the original update times the scale,
and the CLI writes a loadable weight file that records what it is."""

import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import optax_localsgd as ol

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "experiments"
sys.path.insert(0, str(TOOLS))
import scale_step  # noqa: E402


def test_the_update_is_scaled_exactly():
  meta = ol.pretrained.load("lopt_a/fmnist_mlp_k8_h4")
  params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.zeros(4)}
  delta = jax.tree.map(lambda p: 1e-3 * jnp.cos(7.0 * p + 1.0), params)
  updates = []
  for m in (meta, scale_step.scaled(meta, 1.25)):
    tx = ol.lopt_a(m)
    state = tx.init(params)
    for _ in range(2):  # the second step also sees the accumulators of the first
      u, state = tx.update(delta, state, params)
    updates.append(u)
  for a, b in zip(jax.tree.leaves(updates[0]), jax.tree.leaves(updates[1])):
    assert np.abs(np.asarray(a)).max() > 0
    np.testing.assert_allclose(np.asarray(b), 1.25 * np.asarray(a), rtol=1e-5, atol=1e-12)


def test_the_command_line_writes_a_weight_file(tmp_path):
  out = tmp_path / "s.safetensors"
  proc = subprocess.run([sys.executable, str(TOOLS / "scale_step.py"), "--weights",
                         "lopt_a/fmnist_mlp_k8_h4", "--scale", "0.8", "--out", str(out)],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  info = ol.pretrained.metadata(out)["info"]
  assert info["diagnostic"] == "lopt_a/fmnist_mlp_k8_h4 with its step scaled by 0.8"
  w2 = ol.pretrained.load(out).mlp["w2"]
  w2_0 = ol.pretrained.load("lopt_a/fmnist_mlp_k8_h4").mlp["w2"]
  np.testing.assert_allclose(w2[:, 0], 0.8 * w2_0[:, 0], rtol=1e-6)
  bad = subprocess.run([sys.executable, str(TOOLS / "scale_step.py"), "--weights",
                        "lopt_a/fmnist_mlp_k8_h4", "--scale", "0", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "--scale must be > 0" in bad.stderr
