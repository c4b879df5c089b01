"""The package layout of docs/layout.md: every subpackage ships, and imports run one way."""

import ast
import pathlib
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "optax_localsgd"

# Each room may import only the rooms listed for it (and the top-level errors/_version).
# data -> tasks -> engine -> transforms -> meta: the data flows one way; the harness and the
# CLI sit on top. ``pretrained`` (the weights API) is library level; ``compression`` (what a
# worker does to its delta) is library level too, below the engine that applies it.
ALLOWED = {
    "data": set(),
    "tasks": {"data"},
    "transforms": set(),
    "compression": set(),
    "io": {"transforms"},
    "pretrained": {"io", "transforms"},
    "engine": {"tasks", "data", "compression"},
    "meta": {"engine", "tasks", "data", "transforms", "compression", "io", "pretrained", "util"},
    "util": set(),
    "sharding": set(),
}
# ``sharding`` (the slice type the sharded server step hands to transforms) imports nothing.
BASE = {"errors", "_version", "sharding"}


def _room(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else ""


def _imports(path: pathlib.Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      mods = [a.name for a in node.names]
    else:
      continue
    for m in mods:
      if m.startswith("optax_localsgd.") and (m.count(".") == 1 or m.startswith(
          ("optax_localsgd.transforms", "optax_localsgd.io", "optax_localsgd.meta",
           "optax_localsgd.compression"))):
        out.add(_room(m))
  return out


def _files_of(room: str) -> list[pathlib.Path]:
  folder = PKG / room
  return sorted(folder.rglob("*.py")) if folder.is_dir() else [PKG / f"{room}.py"]


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_imports_run_one_way(room):
  for f in _files_of(room):
    wrong = _imports(f) - ALLOWED[room] - BASE - {room}
    assert not wrong, f"{f.relative_to(ROOT)} imports {sorted(wrong)}, above its room"


def test_every_subpackage_is_in_the_wheel():
  listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
               ["packages"])
  on_disk = {".".join(p.parent.relative_to(PKG.parent).parts) for p in PKG.rglob("__init__.py")}
  weights = {f"optax_localsgd._pretrained.{d.name}"
             for d in (ROOT / "pretrained").iterdir() if d.is_dir()}
  assert on_disk | {"optax_localsgd._pretrained"} | weights == listed


def test_the_old_baselines_path_is_the_same_module_contents():
  from optax_localsgd import baselines
  from optax_localsgd.transforms import baselines as moved
  assert all(getattr(baselines, n) is getattr(moved, n) for n in baselines.__all__)


def test_the_bundled_weights_are_package_data():
  import optax_localsgd._pretrained as bundled
  from optax_localsgd.io import locate
  assert locate.bundled_dirs() == [pathlib.Path(bundled.__file__).parent]
