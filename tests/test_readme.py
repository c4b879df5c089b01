"""The README's code runs as written, and CI runs the README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _blocks(lang):
  text = (ROOT / "README.md").read_text()
  return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def test_readme_python_blocks_run():
  blocks = _blocks("python")
  assert blocks, "README has no python example"
  for code in blocks:
    exec(compile(code, "README.md", "exec"), {})


def test_ci_runs_the_readme_test_command():
  cmd = re.search(r"The test command is `([^`]+)`", (ROOT / "README.md").read_text()).group(1)
  assert cmd in (ROOT / ".ci" / "run").read_text()


def test_readme_results_match_the_results_page():
  """The README's table is copied from docs/results/, with the command that wrote it."""
  page = (ROOT / "docs" / "results" / "fmnist_mlp_k8_h4.md").read_text()
  readme = (ROOT / "README.md").read_text()
  rows = [line for line in page.splitlines() if line.startswith("| ")]
  assert len(rows) >= 4 and set(rows) <= set(readme.splitlines())
  command = re.search(r"```bash\n(optax-localsgd evaluate[^\n]*)\n```", page).group(1)
  assert command in readme
