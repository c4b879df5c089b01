"""Where a weight file is: bundled names, run directories and paths.

Bundled weights are package data: the top-level ``pretrained/`` folder of the source tree is
the subpackage ``optax_localsgd._pretrained`` (``pyproject.toml`` maps it), so a wheel and an
editable install find them the same way, through the import system. A bundled name is the
file's path relative to that folder, with ``/`` separators and without the suffix
(``.safetensors``, or ``.npz`` for a legacy file), e.g. ``"lopt_a/fmnist_mlp_k8_h4"``;
``MANIFEST.json`` there records each file's sha256.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import pathlib
import re

from optax_localsgd.errors import UsageError
from optax_localsgd.io.atomic import PathLike
from optax_localsgd.io.weights import LEGACY_SUFFIX, SUFFIX

BUNDLE_PACKAGE = "optax_localsgd._pretrained"
RUN_WEIGHTS = "weights" + SUFFIX  # what `optax-localsgd meta-train --out DIR` writes in DIR
LEGACY_RUN_WEIGHTS = "weights" + LEGACY_SUFFIX  # what it wrote before safetensors
# In the order they are looked for: a folder holding both means the safetensors file.
SUFFIXES = (SUFFIX, LEGACY_SUFFIX)
MANIFEST = "MANIFEST.json"

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def bundled_dirs() -> list[pathlib.Path]:
  """The folder holding the bundled weights (``[]`` if the package ships none)."""
  try:
    resource = importlib.resources.files(BUNDLE_PACKAGE)
  except ModuleNotFoundError:
    return []
  # Only a real folder on disk is usable (not a zipimport); that is how wheels install.
  return [resource] if isinstance(resource, pathlib.Path) and resource.is_dir() else []


def available() -> list[str]:
  """Names of the bundled weight files, sorted (:func:`optax_localsgd.pretrained.available`)."""
  names = set()
  for d in bundled_dirs():
    for suffix in SUFFIXES:
      for f in d.rglob(f"*{suffix}"):
        if f.is_file():
          names.add(f.relative_to(d).with_suffix("").as_posix())
  return sorted(names)


def is_bundled_name(path_or_name: PathLike) -> bool:
  """A ``str`` not ending in ``.safetensors`` / ``.npz`` names bundled weights (or else a run
  directory)."""
  return isinstance(path_or_name, str) and not path_or_name.endswith(SUFFIXES)


def run_weights(directory: pathlib.Path) -> pathlib.Path:
  """``directory/weights.safetensors`` (or a legacy ``weights.npz``), the file
  ``meta-train --out directory`` ends with."""
  for name in (RUN_WEIGHTS, LEGACY_RUN_WEIGHTS):
    if (directory / name).is_file():
      return directory / name
  raise UsageError(
      f"{directory} is a directory without {RUN_WEIGHTS} (looked for {directory / RUN_WEIGHTS} "
      f"and the older {LEGACY_RUN_WEIGHTS}). meta-train writes it when a run finishes; an "
      f"unfinished run exports its checkpoint with "
      f"`optax-localsgd meta-train ... --resume --stop-after 0 --export-partial`.")


def locate(path_or_name: PathLike) -> tuple[pathlib.Path, str | None]:
  """(the weight file, its bundled name or ``None``) for a path, a run directory or a name.

  A ``str`` not ending in ``.safetensors`` / ``.npz`` is first a bundled name and only then a
  directory, so a local folder cannot shadow bundled weights; pass a ``pathlib.Path`` to mean
  the folder.
  """
  if not isinstance(path_or_name, (str, os.PathLike)):
    raise TypeError(f"Expected a path or a bundled name, got {type(path_or_name).__name__}.")
  if not is_bundled_name(path_or_name):
    path = pathlib.Path(path_or_name)
    if path.is_dir():
      return run_weights(path), None
    if not path.is_file():
      raise UsageError(f"Weight file {path} does not exist (or is not a file).")
    return path, None
  name = path_or_name
  if _NAME_RE.match(name) and ".." not in name.split("/"):
    for d in bundled_dirs():
      for suffix in SUFFIXES:
        path = d / f"{name}{suffix}"
        if path.is_file():
          return path, name
  if name and pathlib.Path(name).is_dir():  # "" would be the current folder
    return run_weights(pathlib.Path(name)), None
  raise UsageError(
      f"Unknown pretrained weights {name!r}. Bundled: {available() or 'none'}. To load your "
      f"own, pass a path ending in '{SUFFIX}' (or a legacy '{LEGACY_SUFFIX}') or a run "
      f"directory holding {RUN_WEIGHTS} (meta-train --out DIR).")


def bundled_sha256(name: str) -> str:
  """``name``'s sha256 from ``MANIFEST.json`` (:func:`optax_localsgd.pretrained.bundled_sha256`)."""
  path, bundled = locate(name)
  if bundled is None:
    raise UsageError(f"{name!r} is not a bundled name; only bundled weights have a manifest.")
  root = path.parents[len(pathlib.PurePosixPath(name).parts) - 1]
  manifest = root / MANIFEST
  try:
    entries = json.loads(manifest.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"Bundled weights {name!r}: cannot read {manifest} ({e}); the package "
                     f"install is incomplete.") from None
  if name not in entries or "sha256" not in entries[name]:
    raise ValueError(f"Bundled weights {name!r} have no sha256 entry in {manifest}.")
  return entries[name]["sha256"]
