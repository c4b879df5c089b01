"""Where every benchmark writes its results: ``OUT/STEM.json`` (the numbers) and ``OUT/STEM.md``
(the table docs/benchmarks.md quotes)."""

from __future__ import annotations

import json
import pathlib


def write(out_dir: str | pathlib.Path, stem: str, result: dict, markdown: str) -> None:
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
  (out / f"{stem}.md").write_text(markdown)
