"""Sphinx configuration of the optax-localsgd documentation.

Build: ``python -m sphinx -W -b html docs docs/_build/html`` (tests/test_docs.py runs the same
build with ``-W --keep-going``). Pages are MyST markdown; the API reference comes from the
docstrings (autodoc + napoleon, Google style).

Two sets of pages are found at build time, so the build passes whether or not they exist:

* model cards: every ``pretrained/<optimizer>/<name>.md`` next to a bundled weight file gets a
  page (a copy under ``docs/_generated/``, links rebased, rewritten at every build);
* results: every ``docs/results/*.md`` written by the evaluation harness.

``model_cards.md`` and ``results.md`` list them, or say that none exist yet.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT / "src"))  # document the checkout, installed or not.

from optax_localsgd import __version__  # noqa: E402

project = "optax-localsgd"
author = "optax-localsgd contributors"
copyright = "optax-localsgd contributors"  # noqa: A001 (Sphinx's name)
version = release = __version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "results/*/**"]
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3

# Docstrings: Google style ("Args:", "Returns:", "Attributes:", "Examples:").
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" of NamedTuples/dataclasses: no duplicate entries.
autodoc_default_options = {"members": True, "member-order": "bysource"}
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_mock_imports = ["matplotlib", "PIL"]
autodoc_inherit_docstrings = False

html_theme = "alabaster"
html_title = f"optax-localsgd {release}"
html_static_path: list[str] = []
html_show_sourcelink = False

# --------------------------------------------------------------------------------------------
# Model cards and results, found at build time.

GENERATED = DOCS / "_generated"
CARDS_MARKER = "<!-- model-cards -->"
RESULTS_MARKER = "<!-- results -->"


def _model_cards() -> list[pathlib.Path]:
  """``pretrained/<optimizer>/<name>.md``, sorted (``pretrained/README.md`` is not a card)."""
  return sorted(p for p in (ROOT / "pretrained").glob("*/*.md") if p.is_file())


def _results() -> list[pathlib.Path]:
  return sorted(p for p in (DOCS / "results").glob("*.md") if p.is_file())


def _write_if_changed(path: pathlib.Path, text: str) -> None:
  if not path.is_file() or path.read_text(encoding="utf-8") != text:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


_LINK = re.compile(r"(!?\[[^\]]*\]\()([^)\s]+)((?:\s+\"[^\"]*\")?\))")
_LINK_DEF = re.compile(r"^(\s{0,3}\[[^\]]+\]:\s*)(\S+)(.*)$")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _rebase(target: str, src_dir: pathlib.Path, dst_dir: pathlib.Path) -> str:
  """A relative link target of a file in ``src_dir``, rewritten for a file in ``dst_dir``."""
  if not target or target.startswith(("#", "/", "<")) or _SCHEME.match(target):
    return target
  path, sep, fragment = target.partition("#")
  rebased = os.path.relpath(os.path.normpath(src_dir / path), dst_dir).replace(os.sep, "/")
  return rebased + sep + fragment


def _rebase_links(text: str, src_dir: pathlib.Path, dst_dir: pathlib.Path) -> str:
  """Rewrites the relative links and images of markdown ``text`` (outside code fences)."""
  out, fence = [], None
  for line in text.splitlines(keepends=True):
    stripped = line.lstrip()
    marker = stripped[:3]
    if fence is None and marker in ("```", "~~~"):
      fence = marker
    elif fence is not None:
      if stripped.startswith(fence):
        fence = None
    else:
      line = _LINK.sub(lambda m: m[1] + _rebase(m[2], src_dir, dst_dir) + m[3], line)
      line = _LINK_DEF.sub(lambda m: m[1] + _rebase(m[2], src_dir, dst_dir) + m[3], line)
    out.append(line)
  return "".join(out)


def _card_stubs() -> list[str]:
  """One page per card in ``docs/_generated/model_cards``; returns their docnames.

  A page is the card's text with its relative links and images rewritten to point where
  the card's own did (images, other pages, the weight file next to it). Pages are rewritten
  at every build, so they always show the current cards.
  """
  out = GENERATED / "model_cards"
  wanted = {}
  for card in _model_cards():
    # Names may hold dots (``..._top0.01``): strip ".md" by hand, never with with_suffix.
    rel = card.relative_to(ROOT / "pretrained")
    rel = rel.with_name(rel.name[:-len(".md")])
    stub = out / rel.parent / f"{rel.name}.md"
    text = card.read_text(encoding="utf-8")
    first = next((ln for ln in text.splitlines() if ln.strip()), "")
    title = "" if first.startswith("# ") else f"# `{rel.as_posix()}`\n\n"
    wanted[stub] = (
        f"<!-- Generated by docs/conf.py from pretrained/{rel.as_posix()}.md: edit that. -->\n"
        f"{title}{_rebase_links(text, card.parent, stub.parent).rstrip()}\n\n"
        f"*Card: `pretrained/{rel.as_posix()}.md`. Load the weights with "
        f"`optax_localsgd.pretrained.load(\"{rel.as_posix()}\")`.*\n")
  if out.is_dir():  # cards removed since the last build
    for old in out.rglob("*"):
      if old.is_file() and old not in wanted:
        old.unlink()
  for stub, text in wanted.items():
    _write_if_changed(stub, text)
  return sorted(stub.relative_to(DOCS).as_posix()[:-len(".md")] for stub in wanted)


_CARD_DOCS = _card_stubs()
if not _CARD_DOCS:
  shutil.rmtree(GENERATED, ignore_errors=True)


def _toctree(docnames: list[str]) -> str:
  entries = "\n".join(f"/{d}" for d in docnames)
  return f"```{{toctree}}\n:maxdepth: 1\n\n{entries}\n```\n"


def _fill_lists(app, docname: str, source: list[str]) -> None:
  """Replaces the markers in ``model_cards.md`` and ``results.md`` with what exists."""
  text = source[0]
  if CARDS_MARKER in text:
    body = _toctree(_CARD_DOCS) if _CARD_DOCS else (
        "No model cards ship yet: no `pretrained/<optimizer>/<name>.md` was found when "
        "these pages were built.\n")
    text = text.replace(CARDS_MARKER, body)
  if RESULTS_MARKER in text:
    results = [p.relative_to(DOCS).as_posix()[:-len(".md")] for p in _results()]
    body = _toctree(results) if results else (
        "No results yet: no `docs/results/*.md` was found when these pages were built.\n")
    text = text.replace(RESULTS_MARKER, body)
  source[0] = text


def _always_reread(app, env, added, changed, removed) -> list[str]:
  """The two list pages depend on files outside Sphinx's view: re-read them every build."""
  return [d for d in ("model_cards", "results") if d in env.found_docs]


def _skip_namedtuple_fields(app, what, name, obj, skip, options):
  """NamedTuple fields: their "Attributes:" section documents them, not "Alias for field"."""
  doc = getattr(obj, "__doc__", None) or ""
  if what == "class" and doc.startswith("Alias for field number"):
    return True
  return None


def setup(app):
  app.connect("source-read", _fill_lists)
  app.connect("autodoc-skip-member", _skip_namedtuple_fields)
  app.connect("env-get-outdated", _always_reread)
  return {"parallel_read_safe": True}
