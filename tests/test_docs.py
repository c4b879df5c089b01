"""The documentation site builds with warnings as errors, and the docstring examples run.

The Sphinx builds need Sphinx and MyST, which the ``test`` extra installs; a missing one is a
failure, never a skip. The doctests need nothing beyond the package.
"""

import base64
import doctest
import importlib
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

# Modules whose public docstrings carry ``Examples:``, and the objects that must keep them.
EXAMPLES = {
    "optax_localsgd.transforms.averaging": ("local_sgd", "slowmo"),
    "optax_localsgd.transforms.learned.transform": ("lopt_a", "lagg_a"),
    "optax_localsgd.transforms.learned.params": ("init_lopt_a", "init_lagg_a"),
    "optax_localsgd.transforms.learned.features": ("num_features", "factor_spec"),
    "optax_localsgd.transforms.baselines": ("diloco", "fedadam"),
    "optax_localsgd.engine.round": ("make_round_fn",),
    "optax_localsgd.data.partition": ("dirichlet_partition",),
    "optax_localsgd.compression.transforms": ("top_k", "quantize"),
    "optax_localsgd.pretrained": ("save",),
}


@pytest.mark.parametrize("module", sorted(EXAMPLES))
def test_docstring_examples_run(module):
  mod = importlib.import_module(module)
  for name in EXAMPLES[module]:
    assert ">>>" in (getattr(mod, name).__doc__ or ""), (
        f"{module}.{name} has lost its doctest example")
  result = doctest.testmod(
      mod, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=True)
  assert result.attempted > 0, f"no doctest examples found in {module}"
  assert result.failed == 0, f"{result.failed} of {result.attempted} doctest examples of " \
      f"{module} failed (the failures are printed above)"


@pytest.mark.parametrize("page, min_blocks", [("baselines.md", 5), ("federated.md", 3)])
def test_page_code_runs(page, min_blocks):
  """The page's snippets (with their own assertions) run in order, as written."""
  blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
  assert len(blocks) >= min_blocks
  namespace = {}
  for code in blocks:
    exec(compile(code, str(DOCS / page), "exec"), namespace)


def _require_sphinx():
  import myst_parser  # noqa: F401  (the test extra installs both: fail, never skip)
  import sphinx  # noqa: F401


def _build(src_root: pathlib.Path, out: pathlib.Path) -> None:
  cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", str(out)]
  proc = subprocess.run(cmd, cwd=src_root, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (
      f"{' '.join(cmd)} failed in {src_root} (exit {proc.returncode}):\n"
      f"{proc.stderr[-8000:]}\n--- stdout (end) ---\n{proc.stdout[-2000:]}")
  assert (out / "index.html").is_file()


def _cards(root: pathlib.Path) -> list[pathlib.Path]:
  return sorted((root / "pretrained").glob("*/*.md"))


def _results(root: pathlib.Path) -> list[pathlib.Path]:
  return sorted((root / "docs" / "results").glob("*.md"))


def test_docs_build_without_warnings(tmp_path):
  _require_sphinx()
  _build(ROOT, tmp_path / "html")
  out = tmp_path / "html"
  assert (out / "api" / "transforms.html").is_file()
  # Every model card and results page found has a page of its own.
  for card in _cards(ROOT):
    rel = card.relative_to(ROOT / "pretrained").with_suffix(".html")
    assert (out / "_generated" / "model_cards" / rel).is_file(), card
  for page in _results(ROOT):
    assert (out / "results" / page.with_suffix(".html").name).is_file(), page


# A 1x1 PNG.
_PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6k"
                        "gAAAABJRU5ErkJggg==")


def test_docs_build_with_the_other_set_of_cards_and_results(tmp_path):
  """The build in the checkout covers the cards and results that exist now; this one builds a
  copy with the opposite: a throwaway card and results page where none exist, none where some
  do. So both cases are built, whatever the checkout holds."""
  _require_sphinx()
  copy = tmp_path / "repo"
  ignore = shutil.ignore_patterns("_build", "_generated", "__pycache__", "*.egg-info")
  for d in ("docs", "src", "pretrained"):
    shutil.copytree(ROOT / d, copy / d, ignore=ignore)
  shutil.copy2(ROOT / "README.md", copy / "README.md")

  had_cards, had_results = bool(_cards(ROOT)), bool(_results(ROOT))
  for card in _cards(copy):
    card.unlink()
  for page in _results(copy):
    page.unlink()
  if not had_cards:
    card_dir = copy / "pretrained" / "lopt_a"
    card_dir.mkdir(parents=True, exist_ok=True)
    (card_dir / "docs_test_card.png").write_bytes(_PNG)
    (card_dir / "docs_test_card.safetensors").write_bytes(b"not a real weight file")
    (card_dir / "docs_test_card.md").write_text(
        "# LOpt-A: throwaway card of tests/test_docs.py\n\n"
        "Weights: [docs_test_card.safetensors](docs_test_card.safetensors); recipe: "
        "[meta-training](../../docs/meta.md).\n\n"
        "![meta-loss](docs_test_card.png)\n\n"
        "```bash\noptax-localsgd meta-train --optimizer lopt_a --task fmnist_mlp --out runs/x\n```\n")
    (card_dir / "docs_test_untitled.md").write_text("A card without a title.\n")
  if not had_results:
    results = copy / "docs" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "docs_test_result.png").write_bytes(_PNG)
    (results / "docs_test_result.md").write_text(
        "# Throwaway results page of tests/test_docs.py\n\n![curve](docs_test_result.png)\n\n"
        "Command: `optax-localsgd train --rounds 1`.\n")

  out = tmp_path / "html"
  _build(copy, out)
  cards_page = (out / "model_cards.html").read_text()
  results_page = (out / "results.html").read_text()
  if had_cards:
    assert "No model cards ship yet" in cards_page
  else:
    page = out / "_generated" / "model_cards" / "lopt_a" / "docs_test_card.html"
    assert page.is_file() and "docs_test_card.html" in cards_page
    assert (out / "_images" / "docs_test_card.png").is_file()
    assert (out / "_generated" / "model_cards" / "lopt_a" / "docs_test_untitled.html").is_file()
  if had_results:
    assert "No results yet" in results_page
  else:
    assert (out / "results" / "docs_test_result.html").is_file()
    assert "docs_test_result.html" in results_page
    assert (out / "_images" / "docs_test_result.png").is_file()
