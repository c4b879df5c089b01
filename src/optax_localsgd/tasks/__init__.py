"""Optimizee tasks of the paper (section 5.1) and a registry: ``get_task(name, **overrides)``.

Names are ``<dataset>_<architecture>``:

* ``fmnist_mlp`` (the paper's main task: 2 x 128 ReLU MLP on Fashion-MNIST), ``fmnist_mlp3``
  (3 x 128), ``fmnist_cnn``; ``cifar10_mlp``, ``cifar10_mlp3``, ``cifar10_cnn``,
  ``cifar10_resnet_small``, ``cifar10_vit_tiny``;
* ``imagenet32_mlp`` (3 x 128, the paper's meta-training task for the large-scale experiments),
  ``imagenet32_cnn``, ``imagenet32_resnet50``, ``imagenet32_vit_tiny`` and the same on 64 x 64
  images ("ImageNet+"): ``imagenet64_mlp``, ``imagenet64_resnet50``, ``imagenet64_vit_tiny``;
* ``text_lm``: decoder-only byte-level transformer LM (hidden 192, 12 heads, 12 layers).

Overrides replace a builder's keyword defaults, e.g. ``get_task("imagenet32_mlp",
num_classes=200)``, ``get_task("text_lm", seq_len=64)``, ``get_task("fmnist_mlp",
hidden=(32,))``, ``get_task("cifar10_cnn", standardize=False)`` (pixels / 255 only, as in
learned_optimization). An override a task does not take raises ``UsageError`` (a
``ValueError``).

Where a task is named by a string (the CLI's ``--task``, ``MetaTrainConfig.tasks``), the same
overrides can be written after a colon: ``fmnist_mlp:standardize=false`` or
``fmnist_mlp:hidden=512x512,standardize=false`` (:func:`from_spec`).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from optax_localsgd.errors import UsageError
from optax_localsgd.tasks.models import CNN, DATASETS, MLP, DatasetInfo, standardize
from optax_localsgd.tasks.resnet import ResNet
from optax_localsgd.tasks.splits import load_split, num_items
from optax_localsgd.tasks.task import Task, num_params
from optax_localsgd.tasks.transformer import DecoderLM, ViT


def _image_task(name: str, dataset: str, num_classes: int | None, standardize: bool,
                model_cls: type, **model_kwargs: Any) -> Task:
  info = DATASETS[dataset]
  n = info.num_classes if num_classes is None else int(num_classes)
  if n < 1:
    raise ValueError(f"num_classes must be >= 1, got {n}")
  mean, std = (info.mean, info.std) if standardize else (None, None)
  model = model_cls(num_classes=n, mean=mean, std=std, **model_kwargs)
  return Task(name=name, model=model, input_shape=info.input_shape, num_classes=n,
              dataset=dataset, kind="classification")


def _tuple(x: Any) -> tuple:
  return tuple(x) if isinstance(x, (list, tuple)) else (x,)


def _mlp(name: str, *, dataset: str, hidden: tuple[int, ...] = (128, 128),
         num_classes: int | None = None, standardize: bool = True,
         compute_dtype: str | None = None) -> Task:
  if compute_dtype not in (None, "float32", "bfloat16"):
    raise UsageError(f"compute_dtype must be float32 or bfloat16, got {compute_dtype!r}")
  return _image_task(name, dataset, num_classes, standardize, MLP, hidden=_tuple(hidden),
                     compute_dtype=None if compute_dtype == "float32" else compute_dtype)


def _cnn(name: str, *, dataset: str, features: tuple[int, ...] = (32, 64, 64),
         strides: tuple[int, ...] = (2, 1, 1), num_classes: int | None = None,
         standardize: bool = True) -> Task:
  return _image_task(name, dataset, num_classes, standardize, CNN, features=_tuple(features),
                     strides=_tuple(strides))


def _resnet(name: str, *, dataset: str, stage_sizes: tuple[int, ...] = (3, 4, 6, 3),
            widths: tuple[int, ...] = (64, 128, 256, 512), block: str = "bottleneck",
            stem: str = "small", stem_stride: int = 1, norm_groups: int = 32,
            num_classes: int | None = None, standardize: bool = True) -> Task:
  return _image_task(name, dataset, num_classes, standardize, ResNet,
                     stage_sizes=_tuple(stage_sizes), widths=_tuple(widths), block=block,
                     stem=stem, stem_stride=int(stem_stride), norm_groups=int(norm_groups))


def _vit(name: str, *, dataset: str, patch_size: int, width: int = 192, depth: int = 12,
         num_heads: int = 3, mlp_dim: int = 768, num_classes: int | None = None,
         standardize: bool = True) -> Task:
  h, w, _ = DATASETS[dataset].input_shape
  if h % patch_size or w % patch_size:
    raise ValueError(f"patch_size {patch_size} does not divide the {h}x{w} images")
  return _image_task(name, dataset, num_classes, standardize, ViT, patch_size=int(patch_size),
                     width=int(width), depth=int(depth), num_heads=int(num_heads),
                     mlp_dim=int(mlp_dim))


def _lm(name: str, *, seq_len: int = 128, width: int = 192, depth: int = 12,
        num_heads: int = 12, mlp_dim: int = 768) -> Task:
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  model = DecoderLM(vocab_size=256, max_len=int(seq_len), width=int(width), depth=int(depth),
                    num_heads=int(num_heads), mlp_dim=int(mlp_dim))
  return Task(name=name, model=model, input_shape=(int(seq_len),), num_classes=256,
              dataset="text", kind="language_model")


# name -> (builder, fixed keyword arguments). Anything else in the builder's signature may be
# overridden by get_task.
_REGISTRY: dict[str, tuple[Callable[..., Task], dict[str, Any]]] = {
    "fmnist_mlp": (_mlp, dict(dataset="fashion_mnist", hidden=(128, 128))),
    "fmnist_mlp3": (_mlp, dict(dataset="fashion_mnist", hidden=(128, 128, 128))),
    "fmnist_cnn": (_cnn, dict(dataset="fashion_mnist")),
    "cifar10_mlp": (_mlp, dict(dataset="cifar10", hidden=(128, 128))),
    "cifar10_mlp3": (_mlp, dict(dataset="cifar10", hidden=(128, 128, 128))),
    "cifar10_cnn": (_cnn, dict(dataset="cifar10")),
    # ResNet-18-style basic blocks at a quarter of ResNet-18's widths (~0.7M parameters).
    "cifar10_resnet_small": (_resnet, dict(dataset="cifar10", stage_sizes=(2, 2, 2, 2),
                                           widths=(16, 32, 64, 128), block="basic",
                                           norm_groups=8)),
    "cifar10_vit_tiny": (_vit, dict(dataset="cifar10", patch_size=4)),
    "imagenet32_mlp": (_mlp, dict(dataset="imagenet32", hidden=(128, 128, 128))),
    "imagenet32_cnn": (_cnn, dict(dataset="imagenet32")),
    "imagenet32_resnet50": (_resnet, dict(dataset="imagenet32")),
    "imagenet32_vit_tiny": (_vit, dict(dataset="imagenet32", patch_size=4)),
    "imagenet64_mlp": (_mlp, dict(dataset="imagenet64", hidden=(128, 128, 128))),
    "imagenet64_resnet50": (_resnet, dict(dataset="imagenet64")),
    "imagenet64_vit_tiny": (_vit, dict(dataset="imagenet64", patch_size=8)),
    "text_lm": (_lm, {}),
}


def available_tasks() -> list[str]:
  """Sorted names accepted by :func:`get_task`."""
  return sorted(_REGISTRY)


def task_overrides(name: str) -> list[str]:
  """The keyword overrides :func:`get_task` accepts for task ``name``."""
  builder, fixed = _lookup(name)
  params = inspect.signature(builder).parameters
  return sorted(k for k, p in params.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "dataset")


def _lookup(name: str) -> tuple[Callable[..., Task], dict[str, Any]]:
  if name not in _REGISTRY:
    raise UsageError(f"unknown task {name!r}; available tasks: {', '.join(available_tasks())}")
  return _REGISTRY[name]


def get_task(name: str, **overrides: Any) -> Task:
  """The registered task ``name``, with builder defaults replaced by ``overrides``.

  Raises ``ValueError`` for an unknown name (listing the available ones) or an override the task
  does not accept (listing the accepted ones).
  """
  builder, fixed = _lookup(name)
  allowed = task_overrides(name)
  bad = sorted(set(overrides) - set(allowed))
  if bad:
    raise UsageError(f"task {name!r} does not take override(s) {bad}; accepted: {allowed}")
  return builder(name, **{**fixed, **overrides})


def _parse_value(text: str) -> Any:
  low = text.lower()
  if low in ("true", "false"):
    return low == "true"
  if "x" in low and all(part.isdigit() for part in low.split("x")):
    return tuple(int(part) for part in low.split("x"))  # 512x512 -> (512, 512)
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
  """``"NAME[:key=value,...]"`` -> ``(NAME, overrides)``; values are parsed as bools
  (``true``/``false``), tuples of ints (``512x512``), ints, floats, else strings.

  Examples:
    >>> from optax_localsgd.tasks import parse_spec
    >>> parse_spec("fmnist_mlp:hidden=512x512,standardize=false")
    ('fmnist_mlp', {'hidden': (512, 512), 'standardize': False})
  """
  name, _, rest = spec.partition(":")
  overrides: dict[str, Any] = {}
  for item in filter(None, rest.split(",")):
    key, eq, value = item.partition("=")
    if not eq or not key:
      raise UsageError(f"task spec {spec!r}: expected NAME:key=value,..., got {item!r}")
    overrides[key.strip()] = _parse_value(value.strip())
  _lookup(name)  # unknown names fail here, listing the known ones
  return name, overrides


def from_spec(spec: str) -> Task:
  """The task a spec string names (:func:`parse_spec`), e.g. ``"fmnist_mlp:standardize=false"``."""
  name, overrides = parse_spec(spec)
  return get_task(name, **overrides)


__all__ = [
    "CNN", "DATASETS", "DatasetInfo", "DecoderLM", "MLP", "ResNet", "Task", "ViT",
    "available_tasks", "from_spec", "get_task", "load_split", "num_items", "num_params",
    "parse_spec", "standardize", "task_overrides",
]
