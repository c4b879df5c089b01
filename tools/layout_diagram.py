"""Draws docs/layout.svg, the picture of docs/layout.md: the package's rooms and the one-way
flow of data through them. Run from the top of the checkout after changing the layout:

    python tools/layout_diagram.py
"""

import pathlib

import matplotlib

matplotlib.use("Agg")
matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: small, searchable
matplotlib.rcParams["svg.hashsalt"] = "layout"  # the same picture gives the same file
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = pathlib.Path("docs") / "layout.svg"
W, H = 0.165, 0.17  # a box

# name, (x, y) lower-left, contents, colour
FLOW = [
    ("data/", "loaders: Fashion-MNIST,\nCIFAR-10, ImageNet, text;\nworker split"),
    ("tasks/", "models + losses;\nload_split, num_items"),
    ("engine/", "one local-SGD round:\nworkers, batches, mesh;\ncompression/ of deltas"),
    ("transforms/", "the server step: local_sgd,\nslowmo, baselines;\nlearned/: lopt_a, lagg_a"),
    ("meta/", "PES meta-training of\nthe learned transforms"),
]
FLOW_LABELS = ["arrays", "Task", "worker deltas", "MetaParams"]


def box(ax, x, y, title, body, colour, w=W, h=H, dashed=False):
  ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.008", fc=colour, ec="#333",
                              lw=1.0, ls="--" if dashed else "-"))
  ax.text(x + w / 2, y + h - 0.03, title, ha="center", va="top", fontsize=10,
          fontweight="bold", family="monospace")
  ax.text(x + w / 2, y + h - 0.07, body, ha="center", va="top", fontsize=7.2, linespacing=1.3)


def arrow(ax, a, b, label="", colour="#1f5fa8", rad=0.0):
  ax.add_patch(FancyArrowPatch(a, b, arrowstyle="-|>", mutation_scale=12, lw=1.6, color=colour,
                               connectionstyle=f"arc3,rad={rad}"))
  if label:
    ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.018, label, ha="center", va="bottom",
            fontsize=7, color=colour, style="italic")


def main() -> None:
  fig = Figure(figsize=(11, 6.4))
  ax = fig.add_axes((0, 0, 1, 1))
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.axis("off")
  ax.text(0.5, 0.975, "optax_localsgd: rooms and the one-way flow of data", ha="center",
          va="top", fontsize=12, fontweight="bold")

  # Top: the entry points for people running experiments.
  box(ax, 0.25, 0.74, "harness/", "servers by name, trainer,\nsweep, evaluation, report,\ndemo, federated",
      "#f3e3c3", h=0.16)
  box(ax, 0.55, 0.74, "cli.py", "optax-localsgd train, demo,\nmeta-train, evaluate,\nsweep, publish (+ cli_federated)",
      "#f3e3c3", h=0.16)
  arrow(ax, (0.55, 0.82), (0.25 + W + 0.004, 0.82), colour="#b07a1a")

  # Middle: the flow, left to right.
  xs = [0.02 + i * 0.197 for i in range(len(FLOW))]
  y = 0.44
  colours = ["#dbe9f6", "#dbe9f6", "#dbe9f6", "#cfe8d4", "#e6dcf0"]
  for (title, body), x, c in zip(FLOW, xs, colours):
    box(ax, x, y, title, body, c)
  for i, label in enumerate(FLOW_LABELS):
    a, b = xs[i] + W + 0.004, xs[i + 1] - 0.004
    arrow(ax, (a, y + H / 2), (b, y + H / 2))
    ax.text((a + b) / 2, y - 0.012, label, ha="center", va="top", fontsize=7.5,
            color="#1f5fa8", style="italic")
  ax.text(0.5, 0.365, "data  →  tasks  →  engine  →  server transform  →  meta:  each room "
          "imports only rooms to its left (tests/test_layout.py checks it)", ha="center",
          fontsize=8, color="#1f5fa8")
  # The harness drives the flow from above; the CLI runs the harness and the meta-trainer.
  for i, x in enumerate(xs[:4]):
    arrow(ax, (0.27 + 0.04 * i, 0.74 - 0.004), (x + W / 2, y + H + 0.006), colour="#b07a1a")
  arrow(ax, (0.55 + W / 2, 0.74 - 0.004), (xs[4] + W / 2, y + H + 0.006), colour="#b07a1a")

  # Bottom: files and small helpers, shared by the rooms above.
  box(ax, 0.27, 0.12, "io/", "safetensors weights,\nnpz checkpoints,\nlocate weights",
      "#eeeeee", h=0.16)
  box(ax, 0.06, 0.12, "pretrained.py", "the weights API:\nload, save, available,\nmetadata",
      "#cfe8d4", h=0.16)
  box(ax, 0.48, 0.12, "_pretrained", "package data = the\ntop-level pretrained/\n(weights, cards)",
      "#eeeeee", h=0.16)
  box(ax, 0.69, 0.12, "util/", "tqdm progress, Ctrl-C,\ndetached figures", "#eeeeee",
      h=0.16)
  arrow(ax, (0.06 + W + 0.004, 0.20), (0.27 - 0.004, 0.20), colour="#555")
  arrow(ax, (0.27 + W + 0.004, 0.20), (0.48 - 0.004, 0.20), colour="#555")
  ax.text(0.5, 0.31, "below: used by the rooms above (meta writes checkpoints and weights "
          "through io; meta and the harness print and plot through util); grey arrows: uses", ha="center",
          fontsize=8, color="#555")
  ax.text(0.5, 0.075, "Public API (import optax_localsgd as ol): lopt_a, lagg_a, local_sgd, "
          "slowmo, MetaParams, init_lopt_a, init_lagg_a, AdaAccumulators, pretrained, "
          "UsageError", ha="center", fontsize=8)

  # Outside the wheel.
  box(ax, 0.80, 0.74, "outside the wheel", "tools/ (publish, this picture)\nexamples/  "
      "experiments/\nbenchmarks/  tests/  docs/", "#ffffff", w=0.18, h=0.16, dashed=True)
  fig.savefig(OUT, metadata={"Date": None})


if __name__ == "__main__":
  main()
