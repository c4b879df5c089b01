"""Optimizee tasks (paper 5.1): registry, parameter counts, losses, gradients, vmap, causality."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optax_localsgd import tasks
from optax_localsgd.tasks import DATASETS, Task, available_tasks, get_task, num_params

EXPECTED_TASKS = {
    "fmnist_mlp", "fmnist_mlp3", "fmnist_cnn", "cifar10_mlp", "cifar10_mlp3", "cifar10_cnn",
    "cifar10_resnet_small", "cifar10_vit_tiny", "imagenet32_mlp", "imagenet32_cnn",
    "imagenet32_resnet50", "imagenet32_vit_tiny", "imagenet64_mlp", "imagenet64_resnet50",
    "imagenet64_vit_tiny", "text_lm",
}

# Shrunk versions of the big models for the compiled tests (same code paths, CPU-friendly);
# the full-size models are checked by parameter count and abstract forward shapes below.
SMALL = {
    "cifar10_resnet_small": dict(stage_sizes=(1, 1), widths=(8, 16), norm_groups=4),
    "imagenet32_resnet50": dict(stage_sizes=(1, 1), widths=(8, 16), norm_groups=4),
    "imagenet64_resnet50": dict(stage_sizes=(1,), widths=(8,), norm_groups=4, stem="imagenet"),
    "cifar10_vit_tiny": dict(depth=1, width=24, mlp_dim=48),
    "imagenet32_vit_tiny": dict(depth=1, width=24, mlp_dim=48),
    "imagenet64_vit_tiny": dict(depth=1, width=24, mlp_dim=48),
    "text_lm": dict(depth=1, width=24, num_heads=4, mlp_dim=48, seq_len=16),
}


def small_task(name: str) -> Task:
  return get_task(name, **SMALL.get(name, {}))


def random_batch(task: Task, batch_size: int, seed: int = 0) -> dict:
  """Uniformly random bytes/pixels and labels of the task's dtypes and shapes."""
  rng = np.random.default_rng(seed)
  batch = {"x": rng.integers(0, 256, task.dummy_batch(batch_size)["x"].shape, dtype=np.uint8)}
  if task.kind == "classification":
    batch["y"] = rng.integers(0, task.num_classes, (batch_size,)).astype(np.int32)
  return batch


def natural_batch(task: Task, batch_size: int, seed: int = 0) -> dict:
  """Images whose standardised pixels are roughly N(0, 1), like real data, with random labels."""
  rng = np.random.default_rng(seed)
  info = DATASETS[task.dataset]
  z = rng.normal(size=(batch_size, *task.input_shape))
  x = np.clip(np.round(255 * (np.asarray(info.mean) + np.asarray(info.std) * z)), 0, 255)
  y = rng.integers(0, task.num_classes, (batch_size,)).astype(np.int32)
  return {"x": x.astype(np.uint8), "y": y}


def learnable_batch(task: Task, batch_size: int, seed: int = 0) -> dict:
  """Noisy images whose mean brightness encodes the label (one of the first 10 classes)."""
  rng = np.random.default_rng(seed)
  y = (np.arange(batch_size) % min(10, task.num_classes)).astype(np.int32)
  level = 40.0 + 18.0 * y.reshape(-1, *[1] * len(task.input_shape))
  x = np.clip(level + 25.0 * rng.normal(size=(batch_size, *task.input_shape)), 0, 255)
  return {"x": x.astype(np.uint8), "y": y}


@functools.lru_cache(maxsize=None)
def param_shapes(task: Task):
  return jax.eval_shape(task.init, jax.random.PRNGKey(0))


# The tests compile ~40 small programs; XLA:CPU's backend optimisations (LLVM -O2) dominate their
# compile time, especially for the threefry random draws of ``init`` (a shrunk ResNet's init
# compiles in ~12 s at the default level, ~1.5 s at level 0). Level 0 changes speed, not results
# beyond float rounding; the package itself never sets it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit(fun):
  return jax.jit(fun, compiler_options=FAST_COMPILE)


def init_params(task: Task, seed: int = 0):
  return jitted(task, "init")(jax.random.PRNGKey(seed))


@functools.lru_cache(maxsize=None)
def jitted(task: Task, what: str):
  """Compiled functions of a task, shared between tests (tasks are hashable)."""
  if what == "grad":
    return jit(jax.value_and_grad(task.loss))
  if what == "init_and_grad":  # one compile instead of two, for tasks used in one test only
    def init_and_grad(key, batch):
      params = task.init(key)
      return params, jax.value_and_grad(task.loss)(params, batch)
    return jit(init_and_grad)
  return jit(getattr(task, what))


# ---------------------------------------------------------------------------------- registry


def test_registry_names():
  assert set(available_tasks()) == EXPECTED_TASKS
  assert available_tasks() == sorted(available_tasks())
  star = {}
  exec("from optax_localsgd.tasks import *", star)  # fails if __all__ names a missing object
  assert {"Task", "get_task", "available_tasks"} <= set(star)


def test_unknown_task_lists_the_available_ones():
  with pytest.raises(ValueError) as info:
    get_task("fmnist_mpl")
  msg = str(info.value)
  assert "fmnist_mpl" in msg
  for name in available_tasks():
    assert name in msg


def test_unknown_override_is_rejected():
  with pytest.raises(ValueError, match="seq_len"):
    get_task("fmnist_mlp", seq_len=3)
  with pytest.raises(ValueError, match="num_classes"):
    get_task("text_lm", num_classes=10)


@pytest.mark.parametrize("name", sorted(EXPECTED_TASKS))
def test_task_metadata(name):
  task = get_task(name)
  assert task.name == name
  assert hash(task) == hash(get_task(name)) and task == get_task(name)
  if name == "text_lm":
    assert (task.kind, task.dataset, task.input_shape, task.num_classes) == (
        "language_model", "text", (128,), 256)
    return
  info = DATASETS[task.dataset]
  assert task.kind == "classification"
  assert task.input_shape == info.input_shape and task.num_classes == info.num_classes
  assert len(info.mean) == len(info.std) == info.input_shape[-1]
  prefix = {"fmnist": "fashion_mnist"}.get(name.split("_")[0], name.split("_")[0])
  assert task.dataset == prefix


def test_overrides():
  task = get_task("imagenet32_mlp", num_classes=202)
  assert task.num_classes == 202 and task.model.num_classes == 202
  assert param_shapes(task)["Dense_3"]["kernel"].shape == (128, 202)
  lm = get_task("text_lm", seq_len=32)
  assert lm.input_shape == (32,) and lm.dummy_batch(3)["x"].shape == (3, 33)
  assert get_task("fmnist_mlp", hidden=[64]).model.hidden == (64,)
  assert get_task("fmnist_mlp", standardize=False).model.mean is None
  with pytest.raises(ValueError):
    get_task("imagenet64_vit_tiny", patch_size=5)


# ------------------------------------------------------------------------- parameter counts


def _vit_count(tokens, patch_dim, width, depth, mlp, classes):
  block = 2 * 2 * width + (width * 3 * width + 3 * width) + (width * width + width) + (
      width * mlp + mlp) + (mlp * width + width)
  return (patch_dim * width + width) + width + tokens * width + depth * block + 2 * width + (
      width * classes + classes)


PARAM_COUNTS = {
    "fmnist_mlp": 784 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10,  # 118282
    "fmnist_mlp3": 784 * 128 + 128 + 2 * (128 * 128 + 128) + 128 * 10 + 10,
    "cifar10_mlp": 3072 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10,
    "imagenet32_mlp": 3072 * 128 + 128 + 2 * (128 * 128 + 128) + 128 * 1000 + 1000,
    "imagenet64_mlp": 12288 * 128 + 128 + 2 * (128 * 128 + 128) + 128 * 1000 + 1000,
    # Conv kernels 3x3xCinxCout + bias: 3x3x1x32, 3x3x32x64, 3x3x64x64, then Dense(64 -> 10).
    "fmnist_cnn": (9 * 1 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 64 + 64) + (64 * 10 + 10),
    "cifar10_cnn": (9 * 3 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 64 + 64) + (64 * 10 + 10),
    "imagenet32_cnn": (9 * 3 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 64 + 64) + (
        64 * 1000 + 1000),
    "imagenet32_vit_tiny": _vit_count(65, 48, 192, 12, 768, 1000),  # 5,553,832
    "cifar10_vit_tiny": _vit_count(65, 48, 192, 12, 768, 10),
    "imagenet64_vit_tiny": _vit_count(65, 192, 192, 12, 768, 1000),
    # Embedding 256x192, positions 128x192, 12 blocks, final LN, untied head 192 -> 256.
    "text_lm": 256 * 192 + 128 * 192 + _vit_count(0, 0, 192, 12, 768, 256) - 192 - 192,
}


@pytest.mark.parametrize("name, count", [
    ("fmnist_mlp", 118282), ("cifar10_cnn", 56970), ("imagenet32_vit_tiny", 5553832)])
def test_models_have_their_hand_counted_sizes(name, count):
  # Counted by hand, so a mistake shared by the models and the formulas above still shows.
  assert num_params(param_shapes(get_task(name))) == count == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_counts(name):
  assert num_params(param_shapes(get_task(name))) == PARAM_COUNTS[name]


def test_resnet50_imagenet_stem_matches_torchvision_count():
  # GroupNorm has BatchNorm's per-channel scale and bias, so the count is torchvision's.
  task = get_task("imagenet32_resnet50", stem="imagenet")
  assert num_params(param_shapes(task)) == 25_557_032
  # The small 3x3 stem replaces the 7x7x3x64 stem kernel by a 3x3x3x64 one.
  assert num_params(param_shapes(get_task("imagenet32_resnet50"))) == 25_557_032 - 49 * 192 + (
      9 * 192)
  assert num_params(param_shapes(get_task("imagenet64_resnet50"))) == 25_549_352


def test_small_resnet_count():
  # Stem 3x3x3x16 + GN(16); stage i: 2 basic blocks of two 3x3 convs + GN each, and a 1x1
  # projection + GN on the first block of stages 2-4; Dense(128 -> 10).
  widths, total, cin = (16, 32, 64, 128), 9 * 3 * 16 + 32, 16
  for w in widths:
    for j in range(2):
      total += 9 * cin * w + 2 * w + 9 * w * w + 2 * w
      if cin != w:
        total += cin * w + 2 * w
      cin = w
  total += 128 * 10 + 10
  assert num_params(param_shapes(get_task("cifar10_resnet_small"))) == total


@pytest.mark.parametrize("name", sorted(EXPECTED_TASKS))
def test_full_size_forward_shapes(name):
  """Abstract (traced, not compiled) forward and loss of the full-size model."""
  task = get_task(name)
  params = param_shapes(task)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  batch = task.dummy_batch(2)
  logits = jax.eval_shape(task.apply, params, batch["x"][:, :-1] if task.kind ==
                          "language_model" else batch["x"])
  if task.kind == "language_model":
    assert logits.shape == (2, task.input_shape[0], 256)
  else:
    assert logits.shape == (2, task.num_classes)
  assert logits.dtype == jnp.float32
  loss = jax.eval_shape(task.loss, params, batch)
  assert loss.shape == () and loss.dtype == jnp.float32


# ------------------------------------------------------------------- compiled computations


@pytest.mark.parametrize("name", sorted(EXPECTED_TASKS))
def test_loss_and_grad_are_finite(name):
  task = small_task(name)
  batch = random_batch(task, 2)
  params, (loss, grads) = jitted(task, "init_and_grad")(jax.random.PRNGKey(1), batch)
  # Checks in NumPy: eager jnp ops would compile once per leaf shape.
  assert loss.shape == () and loss.dtype == jnp.float32 and np.isfinite(np.asarray(loss))
  assert jax.tree.structure(grads) == jax.tree.structure(params)
  for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
    assert g.shape == p.shape and g.dtype == jnp.float32 == p.dtype
    assert np.all(np.isfinite(np.asarray(g)))
  assert sum(np.abs(np.asarray(g)).sum() for g in jax.tree.leaves(grads)) > 0


def test_mlp_initial_loss_is_near_log_num_classes():
  for name, classes in [("fmnist_mlp", 10), ("imagenet32_mlp", 1000)]:
    task = get_task(name)
    params = init_params(task)
    loss = jitted(task, "loss")(params, natural_batch(task, 256))
    assert abs(float(loss) - math.log(classes)) < 0.3, (name, float(loss))


def test_lm_initial_loss_is_near_log_256():
  task = small_task("text_lm")
  loss, _ = jitted(task, "grad")(init_params(task), random_batch(task, 2))
  assert abs(float(loss) - math.log(256)) < 0.1


@pytest.mark.parametrize("name", ["fmnist_mlp", "cifar10_cnn"])
def test_sgd_lowers_the_loss_on_a_fixed_batch(name):
  task = get_task(name)
  params = init_params(task)
  batch = learnable_batch(task, 20)
  grad_fn = jitted(task, "grad")
  loss0, _ = grad_fn(params, batch)
  for _ in range(15):
    loss, grads = grad_fn(params, batch)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  final, _ = grad_fn(params, batch)
  assert float(final) < 0.7 * float(loss0), (float(loss0), float(final))


def test_vmap_of_init_matches_separate_inits():
  task = get_task("fmnist_mlp")
  keys = jax.random.split(jax.random.PRNGKey(3), 2)
  stacked = jit(jax.vmap(task.init))(keys)
  init = jitted(task, "init")
  for i in range(2):
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(init(keys[i]))):
      np.testing.assert_allclose(np.asarray(a)[i], b, rtol=1e-6, atol=1e-7)
  kernel = stacked["Dense_0"]["kernel"]
  assert kernel.shape == (2, 784, 128) and not np.allclose(kernel[0], kernel[1])


@pytest.mark.parametrize("name", ["fmnist_mlp", "cifar10_cnn", "text_lm"])
def test_vmap_over_workers_matches_separate_calls(name):
  task = small_task(name)
  separate_params = [init_params(task, seed) for seed in (3, 4)]
  stacked_params = jax.tree.map(lambda *p: np.stack(p), *separate_params)
  batches = [random_batch(task, 2, seed=s) for s in range(2)]
  stacked_batch = jax.tree.map(lambda *b: np.stack(b), *batches)
  grad_fn = jitted(task, "grad")
  losses, grads = jit(jax.vmap(jax.value_and_grad(task.loss)))(stacked_params, stacked_batch)
  for i in range(2):
    loss_i, grads_i = grad_fn(separate_params[i], batches[i])
    np.testing.assert_allclose(np.asarray(losses)[i], loss_i, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_i)):
      np.testing.assert_allclose(np.asarray(a)[i], b, rtol=1e-4, atol=1e-6)
  assert not np.allclose(losses[0], losses[1])


def test_lm_is_causal_and_scores_next_bytes():
  task = small_task("text_lm")
  params = init_params(task)
  x = random_batch(task, 1)["x"]
  y = x.copy()
  y[0, 9] ^= 0x55  # change input position 9
  apply = jitted(task, "apply")
  lx, ly = np.asarray(apply(params, x[:, :-1])), np.asarray(apply(params, y[:, :-1]))
  np.testing.assert_allclose(lx[0, :9], ly[0, :9], rtol=1e-5, atol=1e-6)
  assert not np.allclose(lx[0, 9:], ly[0, 9:])
  # The loss is the mean over positions of -log softmax(logits[t])[x[t + 1]].
  l0 = lx[0].astype(np.float64)
  logp = l0 - l0.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  manual = -np.mean([logp[t, x[0, t + 1]] for t in range(task.input_shape[0])])
  np.testing.assert_allclose(jitted(task, "loss")(params, {"x": x}), manual, rtol=1e-5)


def test_accuracy_counts_argmax_hits():
  task = get_task("fmnist_mlp")
  params = init_params(task)
  last = params["Dense_2"]
  bias = np.zeros(last["bias"].shape, np.float32)
  bias[3] = 1.0
  params["Dense_2"] = {"kernel": np.zeros(last["kernel"].shape, np.float32), "bias": bias}
  batch = natural_batch(task, 40)
  batch["y"][:10] = 3
  batch["y"][10:] = 7
  assert float(jitted(task, "accuracy")(params, batch)) == pytest.approx(0.25)


def test_standardization_constants():
  x = np.array([[[[0, 128, 255]]]], np.uint8)
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.125)
  want = (x / 255.0 - np.asarray(mean)) / np.asarray(std)
  np.testing.assert_allclose(tasks.standardize(x, mean, std), want, rtol=1e-6)
  np.testing.assert_allclose(tasks.standardize(x, None, None), x / 255.0, rtol=1e-6)
  # The model's input really goes through the dataset constants: the mean image is the zero
  # input for the MLP, so the logits equal those of a zero float input through the raw layers.
  task = get_task("fmnist_mlp")
  params = init_params(task)
  mean_img = np.full((1, 28, 28, 1), 255 * DATASETS["fashion_mnist"].mean[0])
  h = np.zeros((1, 784))
  for i in range(3):
    h = h @ np.asarray(params[f"Dense_{i}"]["kernel"]) + np.asarray(params[f"Dense_{i}"]["bias"])
    h = np.maximum(h, 0) if i < 2 else h
  np.testing.assert_allclose(jitted(task, "apply")(params, mean_img), h, rtol=1e-5, atol=1e-5)


def test_task_specs_carry_overrides():
  t = tasks.from_spec("fmnist_mlp:hidden=64x32,standardize=false")
  assert t.model.hidden == (64, 32) and t.model.mean is None
  assert tasks.parse_spec("fmnist_mlp") == ("fmnist_mlp", {})
  with pytest.raises(ValueError, match="does not take override"):
    tasks.from_spec("fmnist_mlp:bogus=1")
  with pytest.raises(ValueError, match="expected NAME:key=value"):
    tasks.from_spec("fmnist_mlp:standardize")
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    tasks.from_spec("nope:hidden=3")


def test_bfloat16_mlp_keeps_float32_params_and_is_close_to_float32():
  f32 = tasks.from_spec("fmnist_mlp")
  bf16 = tasks.from_spec("fmnist_mlp:compute_dtype=bfloat16")
  params = f32.init(jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(bf16.init(jax.random.PRNGKey(0))))
  rng = np.random.default_rng(0)
  batch = {"x": rng.integers(0, 256, (64, 28, 28, 1)).astype(np.uint8),
           "y": rng.integers(0, 10, 64).astype(np.int32)}
  lf, lb = float(f32.loss(params, batch)), float(bf16.loss(params, batch))
  assert lf != lb and abs(lf - lb) < 2e-2 * lf  # a different computation, a close answer
  with pytest.raises(ValueError, match="compute_dtype must be float32 or bfloat16"):
    tasks.from_spec("fmnist_mlp:compute_dtype=float16")
