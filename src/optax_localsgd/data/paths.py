"""Where the loaders look for dataset files, in order.

Without an explicit ``data_dir`` the places are, for a dataset's ``subdir``:

1. ``$OPTAX_LOCALSGD_DATA/<subdir>``, when that environment variable is set;
2. the user cache, ``${XDG_CACHE_HOME:-~/.cache}/optax_localsgd/<subdir>`` (downloads go here);
3. ``/usr/share/datasets/<subdir>``, where Debian's ``dataset-*`` packages install.
"""

from __future__ import annotations

import os
import pathlib

DATA_ENV = "OPTAX_LOCALSGD_DATA"
SYSTEM_DATA_DIR = pathlib.Path("/usr/share/datasets")


def user_cache_dir(subdir: str) -> pathlib.Path:
  """The per-user cache directory for ``subdir`` (it need not exist)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "optax_localsgd" / subdir


def search_paths(subdir: str, data_dir: str | os.PathLike[str] | None = None
                 ) -> list[pathlib.Path]:
  """Directories to search for a dataset, first match wins.

  Args:
    subdir: the dataset's directory name, e.g. ``"fashion-mnist"``.
    data_dir: if given, the only directory searched (used as is, ``subdir`` is not appended).

  Returns:
    The candidate directories in search order; they need not exist.
  """
  if data_dir is not None:
    return [pathlib.Path(data_dir).expanduser()]
  paths = []
  env = os.environ.get(DATA_ENV)
  if env:
    paths.append(pathlib.Path(env).expanduser() / subdir)
  paths.append(user_cache_dir(subdir))
  paths.append(SYSTEM_DATA_DIR / subdir)
  return paths
