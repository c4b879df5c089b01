"""How much signal is in one PES estimate? Independent estimates at the same meta-parameters.

For a meta-training configuration (the same flags as ``optax-localsgd meta-train``) this draws
``--estimates`` PES estimates at the *same* theta and the same inner states, each with its own
perturbations, and reports

* the mean pairwise cosine similarity between the estimates (about 0 when noise dominates, 1
  when every estimate points the same way);
* ``|mean of the N estimates| / mean |estimate|``: about ``1/sqrt(N)`` for pure noise, 1 for
  pure signal; from it, the fraction of one estimate's squared norm that is signal.

Usage (what ``docs/meta.md`` ran):
  python experiments/pes_snr.py --estimates 6 -- --optimizer lopt_a --task fmnist_mlp \\
      --tasks-per-estimate 4 --truncation 10 --min-inner 50 --max-inner 500 \\
      --init nesterov:1.0,0.95 --local-lr 0.1

Writes a JSON line to stdout (and ``--out`` if given).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import numpy as np
import optax


def _meta_train_config(flags: list[str]):
  """The MetaTrainConfig that ``optax-localsgd meta-train FLAGS --out x`` would build."""
  from optax_localsgd import cli
  return cli.meta_train_config(cli.build_parser().parse_args(["meta-train", *flags, "--out", "x"]))


@dataclasses.dataclass(frozen=True)
class _RawEstimate:
  """A PESConfig whose outer optimizer is SGD at learning rate 1, so that one outer step
  moves theta by exactly minus the estimate (the quantity measured here)."""
  base: object

  def __getattr__(self, name):
    return getattr(self.base, name)

  def optimizer(self):
    return optax.sgd(1.0)

  def schedule(self):
    return optax.constant_schedule(1.0)


def estimates(cfg, n: int) -> np.ndarray:
  from optax_localsgd.meta import problem, train
  groups, datas, state = train._setup(cfg)
  pcfg = _RawEstimate(cfg.pes)
  state = state._replace(opt_state=pcfg.optimizer().init(state.theta))
  step = jax.jit(problem.make_outer_step(groups, pcfg))
  theta0 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(state.theta)])
  out = []
  for i in range(n):
    new, _ = step(state._replace(key=jax.random.PRNGKey(1000 + i)), datas)
    theta1 = np.concatenate([np.ravel(x) for x in jax.tree.leaves(new.theta)])
    out.append(theta0 - theta1)
  return np.stack(out)


def summarize(g: np.ndarray) -> dict:
  n = len(g)
  unit = g / np.linalg.norm(g, axis=1, keepdims=True)
  cos = unit @ unit.T
  pair = cos[np.triu_indices(n, 1)]
  ratio = float(np.linalg.norm(g.mean(0)) / np.mean(np.linalg.norm(g, axis=1)))
  # E|mean|^2 = |s|^2 + E|noise|^2 / n and E|g|^2 = |s|^2 + E|noise|^2: solve for the signal
  # share of one estimate's squared norm.
  m2 = float(np.sum(g.mean(0) ** 2))
  g2 = float(np.mean(np.sum(g ** 2, axis=1)))
  signal = max((n * m2 - g2) / (n - 1), 0.0)
  return {"estimates": n, "mean_pairwise_cosine": float(pair.mean()),
          "min_pairwise_cosine": float(pair.min()), "max_pairwise_cosine": float(pair.max()),
          "norm_of_mean_over_mean_norm": ratio, "pure_noise_would_give": float(1 / np.sqrt(n)),
          "signal_share_of_one_estimate": signal / g2 if g2 > 0 else None,
          "mean_estimate_norm": float(np.mean(np.linalg.norm(g, axis=1)))}


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  flags = argv[argv.index("--") + 1:] if "--" in argv else []
  own = argv[:argv.index("--")] if "--" in argv else argv
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--estimates", type=int, default=6)
  ap.add_argument("--out", default=None, help="also write the JSON here")
  args = ap.parse_args(own)
  if args.estimates < 2:
    ap.error("--estimates must be >= 2")
  cfg = _meta_train_config(flags)
  row = {"flags": " ".join(flags), **summarize(estimates(cfg, args.estimates))}
  text = json.dumps(row)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
