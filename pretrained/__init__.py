"""The bundled weights, shipped as the package data ``optax_localsgd._pretrained``.

pyproject.toml maps this folder onto that subpackage, so a wheel installs it as
``optax_localsgd/_pretrained/`` and an editable install reads it here; code finds it through
the import system (``optax_localsgd.io.locate``). Nothing to import: see README.md here.
"""
