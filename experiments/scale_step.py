"""A learned optimizer's weights with its step scaled by a constant (docs/meta.md, round 8 on the
CPU): the direction output of the MLP (``w2[:, 0]``, ``b2[0]``) times ``--scale``, so that from
any state the update is ``--scale`` times the original one (the magnitude output is kept).
A diagnostic, not a recipe: is the gap to a baseline a matter of one global step size?

  python experiments/scale_step.py --weights lopt_a/fmnist_mlp_k8_h4 --scale 1.25 \
      --out runs/scale/lopt_s1.25.safetensors
  optax-localsgd evaluate --seeds 200-201 --rounds 1000 --methods local_sgd,lopt_a \
      --weights lopt_a=runs/scale/lopt_s1.25.safetensors --target-loss 0.2
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

from optax_localsgd import pretrained
from optax_localsgd.transforms.learned.params import MetaParams


def scaled(meta: MetaParams, scale: float) -> MetaParams:
  """``meta`` whose update is ``scale`` times ``meta``'s: the step is linear in the direction
  output, which is linear in ``w2[:, 0]`` and ``b2[0]``."""
  mlp = dict(meta.mlp)
  mlp["w2"] = mlp["w2"].at[:, 0].multiply(scale)
  mlp["b2"] = mlp["b2"].at[0].multiply(scale)
  return dataclasses.replace(meta, mlp=mlp)


def main(argv: list[str] | None = None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--weights", required=True, help="a bundled name or a weight file")
  p.add_argument("--scale", type=float, required=True)
  p.add_argument("--out", required=True, help="the new .safetensors file")
  args = p.parse_args(argv)
  if not args.scale > 0:
    p.error(f"--scale must be > 0, got {args.scale}")
  info = pretrained.metadata(args.weights)["info"]
  pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
  pretrained.save(args.out, scaled(pretrained.load(args.weights), args.scale),
                  info | {"diagnostic": f"{args.weights} with its step scaled by {args.scale:g}"})
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
