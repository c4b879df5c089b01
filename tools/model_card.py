"""Publishing meta-trained weights into ``pretrained/``: the file, its manifest entry and its
model card (``optax-localsgd publish``, run from the top of the checkout).

Maintainer tooling, outside the package: the wheel ships the weights, not the means to publish
them. It uses only the public API (:mod:`optax_localsgd.pretrained`).

A card says what the weights are for (task, K, H, B), how they were made (the recipe next to
the paper's, the exact command, the meta-loss curve), how they do (the evaluation table, when
one exists) and how to check them (sha256).
"""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import numpy as np

from optax_localsgd import pretrained

KIND_LABELS = {"lopt_a": "LOpt-A", "lagg_a": "LAgg-A"}
# SPEC section 5 / paper appendix B.
PAPER_RECIPE = {"outer_steps": 5000, "tasks_per_estimate": 8, "truncation": 50,
                "min_inner": 100, "max_inner": 1000, "sigma": None, "lr_peak": 3e-3,
                "lr_end": 1e-3, "warmup_steps": 100, "loss_clip": "off"}


def _recipe_rows(info: Mapping[str, Any]) -> list[str]:
  pes = info.get("pes", {})
  # The PES config's outer_steps is the schedule's length; info's is how many steps ran
  # (fewer for a snapshot or a stopped run), which is what the card must show.
  ours = {**pes, "outer_steps": info.get("outer_steps"),
          "tasks_per_estimate": info.get("tasks_per_estimate")}
  rows = ["| setting | these weights | paper |", "| --- | --- | --- |"]
  for key, paper in PAPER_RECIPE.items():
    mine = ours.get(key)
    if key == "loss_clip" and mine is None:
      mine = "off"  # the divergence guard; weights made before it existed never had it
    if key == "outer_steps" and info.get("outer_steps_planned") not in (None, mine):
      mine = f"{mine} (of a {info['outer_steps_planned']}-step schedule)"
    rows.append(f"| {key} | {mine} | {'not stated' if paper is None else paper} |")
  return rows


def _setting(info: dict) -> str:
  """The inner training the weights were meta-trained for, in words."""
  fed = info.get("federated")
  if fed:  # meta-train --federated: FedLOpt (docs/federated.md)
    return (f"K = {info.get('K')} of N = {fed['num_clients']} clients sampled per round "
            f"(Dirichlet label skew alpha = {fed['alpha']:g}), each running E = "
            f"{fed['local_epochs']:g} local epoch(s) of SGD on batches of B = "
            f"{info.get('batch_size')} at learning rate {info.get('local_lr')} (the paper's "
            f"FedLOpt setting, appendix E.6).")
  return (f"K = {info.get('K')} workers, H = {info.get('H')} local steps, B = "
          f"{info.get('batch_size')} examples per worker and step, workers' SGD learning rate "
          f"{info.get('local_lr')}.")


def card_text(name: str, meta: Mapping[str, Any], sha256: str, *, curve: str | None,
              results_md: str | None, notes: str = "") -> str:
  """The markdown model card of weights ``name`` with metadata ``meta``."""
  info = meta.get("info", {})
  cfg = meta["config"]
  reduced = any(info.get(k) != v for k, v in (("outer_steps", 5000), ("tasks_per_estimate", 8)))
  lines = [
      f"# `{name}`",
      "",
      f"{KIND_LABELS[cfg['kind']]} server optimizer, meta-trained on `{', '.join(info.get('tasks', []))}` with "
      + _setting(info),
      "",
      "```python",
      "import optax_localsgd as ol",
      f"meta = ol.pretrained.load(\"{name}\")  # checks the sha256 below",
      ("server = ol.lopt_a(meta)" if cfg["kind"] == "lopt_a"
       else f"server = ol.lagg_a(meta, {cfg.get('num_workers')})"),
      "```",
      "",
      f"- file sha256: `{sha256}`",
      f"- feature set `{cfg.get('feature_set')}`, hidden size {cfg.get('hidden_size')}, "
      f"sign convention `{cfg.get('sign_convention')}`",
      f"- package version at meta-training: {info.get('package_version')}",
      "",
      "## Recipe",
      "",
  ]
  if reduced:
    where = f" on {info['device']}" if info.get("device") else ""
    lines += [f"**Reduced recipe.** These weights were meta-trained{where} with fewer outer "
              "steps or fewer tasks per estimate than the paper's recipe (the table below); "
              "the evaluation shows what they do.", ""]
  if info.get("compress"):
    lines += [f"**For compressed deltas.** Every worker compressed its delta with "
              f"`--compress {info['compress']}` during meta-training (docs/compression.md); "
              f"use these weights with the same compressor.", ""]
  if info.get("init_from"):
    lines += [f"**Fine-tuned.** Meta-training started from `{info['init_from']}` (sha256 "
              f"`{info.get('init_from_sha256')}`), not from a fresh init; the table and the "
              f"curve are this run's steps only.", ""]
  lines += _recipe_rows(info)
  lines += ["", "Meta-trained with:", "", "```bash", info.get("command", "(not recorded)"),
            "```", ""]
  lines += [f"Final meta-loss (mean of the last 50 outer steps): "
            f"{info.get('final_meta_loss_mean_last_50')}; non-finite PES pairs ignored: "
            f"{info.get('nonfinite_pairs')}.", ""]
  if curve:
    lines += [f"![meta-loss curve]({curve})", ""]
  lines += ["## Evaluation", ""]
  lines += [results_md.strip() if results_md else
            "Not evaluated yet: run `optax-localsgd evaluate` (see docs/results/)."]
  if notes:
    lines += ["", "## Notes", "", notes.strip()]
  return "\n".join(lines) + "\n"


def publish(weights: pathlib.Path, name: str, root: pathlib.Path, *,
            curve: pathlib.Path | None = None, results: pathlib.Path | None = None,
            notes: str = "") -> pathlib.Path:
  """Copies ``weights`` to ``root/name.safetensors`` (re-writing a legacy ``.npz`` as
  safetensors, same arrays and metadata), records its sha256 in ``root/MANIFEST.json`` and
  writes the card ``root/name.md`` (plus the meta-loss PNG next to it). Returns the card."""
  pretrained.load(weights)  # refuse a corrupt file before publishing it
  meta = pretrained.metadata(weights)
  dest = _copy_as_safetensors(weights, root / f"{name}{pretrained.SUFFIX}")
  sha = _record_sha256(root, name, dest)
  curve_name = None
  if curve is not None and curve.is_file():
    curve_dest = dest.with_name(dest.stem + "_meta_loss.png")
    if curve.resolve() != curve_dest.resolve():
      shutil.copyfile(curve, curve_dest)
    curve_name = curve_dest.name
  results_md = results.read_text() if results is not None else None
  if results_md:  # drop the page's title and its image (the card travels without docs/)
    results_md = "\n".join(line for line in results_md.splitlines()
                           if not line.startswith(("# ", "![")))
    results_md += f"\n\nFrom `docs/results/{results.name}` (curves in the PNG next to it)."
  card = dest.with_suffix(".md")
  card.write_text(card_text(name, meta, sha, curve=curve_name, results_md=results_md,
                            notes=notes))
  return card


def _copy_as_safetensors(weights: pathlib.Path, dest: pathlib.Path) -> pathlib.Path:
  dest.parent.mkdir(parents=True, exist_ok=True)
  if weights.suffix == pretrained.LEGACY_SUFFIX:
    # The same arrays and JSON; only the container changes (arrays_sha256 stays).
    pretrained.save(dest, pretrained.load(weights), pretrained.metadata(weights)["info"])
  elif weights.resolve() != dest.resolve():
    shutil.copyfile(weights, dest)
  return dest


def _record_sha256(root: pathlib.Path, name: str, path: pathlib.Path) -> str:
  sha = pretrained.file_sha256(path)
  manifest_path = root / pretrained.MANIFEST
  manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
  manifest[name] = {"sha256": sha}
  manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
  return sha


def convert_legacy(root: pathlib.Path) -> list[str]:
  """Re-writes every bundled ``root/**/NAME.npz`` as ``NAME.safetensors`` and deletes the
  ``.npz``: same arrays (checked bit for bit), same metadata, new sha256 in the manifest and
  in the model cards. Returns the converted names.

  A card also names the sha256 of the weights a fine-tuned run started from (its
  ``init_from_sha256``, the ``.npz`` file of then); that stays, with the new file's sha256
  added, since the weights' own metadata records the old one.
  """
  converted = {}
  published = json.loads((root / pretrained.MANIFEST).read_text())
  for old in sorted(root.rglob(f"*{pretrained.LEGACY_SUFFIX}")):
    name = old.relative_to(root).with_suffix("").as_posix()
    before = pretrained.load(old, expected_sha256=published[name]["sha256"])
    new = _copy_as_safetensors(old, old.with_suffix(pretrained.SUFFIX))
    after = pretrained.load(new)
    for k in before.mlp:
      assert np.asarray(after.mlp[k]).tobytes() == np.asarray(before.mlp[k]).tobytes(), k
    assert (np.asarray(after.decay_offsets).tobytes()
            == np.asarray(before.decay_offsets).tobytes())
    assert pretrained.metadata(new)["info"] == pretrained.metadata(old)["info"]
    converted[name] = (pretrained.file_sha256(old), _record_sha256(root, name, new))
    old.unlink()
  for card in sorted(root.rglob("*.md")):
    text = card.read_text()
    name = card.relative_to(root).with_suffix("").as_posix()
    for other, (old_sha, new_sha) in converted.items():
      if other == name:
        text = text.replace(f"file sha256: `{old_sha}`", f"file sha256: `{new_sha}`")
      else:
        text = text.replace(f"`{old_sha}`", f"`{old_sha}` of its former `.npz` file; "
                            f"`{new_sha}` as today's `{other}{pretrained.SUFFIX}`, the same "
                            f"arrays")
    card.write_text(text)
  return sorted(converted)


if __name__ == "__main__":
  import sys
  if sys.argv[1:2] != ["convert-legacy"] or len(sys.argv) != 3:
    sys.exit("usage: python tools/model_card.py convert-legacy ROOT  (e.g. pretrained)")
  for converted_name in convert_legacy(pathlib.Path(sys.argv[2])):
    print(f"converted {converted_name}")
