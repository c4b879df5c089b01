"""Input checks at the API boundary, raising ``ValueError`` messages that name the problem.

They run on static shapes and on constant hyperparameters at trace time, so they cost nothing
inside ``jax.jit``.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from optax_localsgd.errors import UsageError


def _path_str(path) -> str:
  return jax.tree_util.keystr(path) or "<root>"


def check_same_structure(name: str, tree: Any, ref_name: str, ref: Any) -> None:
  """Raise if ``tree`` and ``ref`` do not have the same pytree structure."""
  s, r = jax.tree.structure(tree), jax.tree.structure(ref)
  if s != r:
    raise ValueError(
        f"{name} do not have the structure of {ref_name}:\n  {name}: {s}\n  {ref_name}: {r}\n"
        f"Pass one delta per parameter tensor, arranged like the params.")


def check_deltas_match(deltas: Any, params: Any, leading: tuple[int, ...] = (),
                       what: str = "deltas") -> None:
  """Raise unless every delta leaf has shape ``leading + param.shape``.

  Args:
    deltas: the pytree given to ``update``.
    params: the parameters.
    leading: expected extra leading axes, e.g. ``(k,)`` for a per-worker stack.
    what: how to call ``deltas`` in the message.
  """
  check_same_structure(what, deltas, "params", params)
  for (path, d), p in zip(jax.tree_util.tree_leaves_with_path(deltas),
                          jax.tree.leaves(params)):
    want = tuple(leading) + tuple(p.shape)
    if tuple(d.shape) != want:
      if leading and tuple(d.shape[1:]) == tuple(p.shape):
        raise ValueError(
            f"{what}{_path_str(path)} has leading axis {d.shape[0]}, expected k={leading[0]} "
            f"(one delta per worker, stacked on axis 0, shape {want}).")
      raise ValueError(
          f"Shape mismatch at {_path_str(path)}: {what} have shape {tuple(d.shape)}, "
          f"params have {tuple(p.shape)} (expected {want}).")


def is_constant(value: Any) -> bool:
  """True for a Python or NumPy number or a concrete scalar array; False for a schedule (a
  callable of the step count) or a traced value, whose range cannot be known at build time
  (sweeps ``vmap`` over candidate hyperparameters, and ``optax.inject_hyperparams`` rebuilds
  the transform from traced ones inside ``jit``)."""
  if callable(value) or isinstance(value, jax.core.Tracer):
    return False
  return np.ndim(value) == 0


def check_hyperparameter(fn_name: str, value: Any, ok: Callable[[float], bool],
                         want: str) -> None:
  """Raise a :class:`~optax_localsgd.UsageError` ``"<fn_name> needs <want>, got <value>."``
  when ``value`` is a constant for which ``ok(float(value))`` is false (NaN always fails a
  comparison). Schedules and traced values pass unchecked (:func:`is_constant`)."""
  if is_constant(value) and not ok(float(value)):
    raise UsageError(f"{fn_name} needs {want}, got {value}.")
