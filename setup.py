"""Ships the top-level ``pretrained/`` folder inside the wheel as ``optax_localsgd/_pretrained``.

All other metadata is in pyproject.toml. The weights stay at the top level of the source tree
(where people look for them and where editable installs read them); this build step copies
them into the package so `pip install optax-localsgd` gets them too.
"""
import pathlib
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED_SUFFIXES = {".npz", ".md", ".json", ".png"}


class BuildPyWithWeights(build_py):
  def run(self):
    super().run()
    src = pathlib.Path(__file__).resolve().parent / "pretrained"
    dst = pathlib.Path(self.build_lib) / "optax_localsgd" / "_pretrained"
    for f in sorted(src.rglob("*")):
      if f.is_file() and f.suffix in SHIPPED_SUFFIXES:
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, target)


setup(cmdclass={"build_py": BuildPyWithWeights})
