"""Exceptions raised by the dataset loaders.

Both subclass a builtin, so callers that already catch ``FileNotFoundError`` or ``ValueError``
keep working; their messages name the file and say what is wrong or how to get the data.
"""

from __future__ import annotations


class DatasetNotFoundError(FileNotFoundError):
  """No copy of the dataset was found in any searched place (and none could be downloaded).

  The message lists every path searched, the files expected there, and how to get them.
  """


class CorruptDatasetError(ValueError):
  """A dataset file exists but does not hold what its format promises.

  Truncated or malformed files, wrong shapes or dtypes, out-of-range labels, disallowed pickle
  contents. The message names the file and the problem. Nothing is returned half-loaded.
  """
