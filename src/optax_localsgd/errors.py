"""The exception for mistakes in what a user asked for.

:class:`UsageError` marks an error the user can fix from its message alone: a flag or config
field out of range, an unknown name, a weight file that is not what it should be. The
``optax-localsgd`` command prints it (and the dataset errors of
:mod:`optax_localsgd.data.errors`) as one line and exits with status 2; any other exception
is a bug and keeps its traceback.

It subclasses ``ValueError``, so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class UsageError(ValueError):
  """Invalid input from the user (flag, config, name or file); the message says how to fix it."""
