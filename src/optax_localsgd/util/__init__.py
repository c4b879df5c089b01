"""Small helpers for long-running commands, shared by the meta-trainer and the harness:
tqdm progress bars (:mod:`~optax_localsgd.util.progress`), Ctrl-C / SIGTERM as a stop request
(:mod:`~optax_localsgd.util.signals`) and matplotlib figures that need no display
(:mod:`~optax_localsgd.util.plotting`)."""
