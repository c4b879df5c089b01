"""Files on disk: atomic writes, reproducible archives and what is stored in them.

* :mod:`~optax_localsgd.io.atomic`: write through a temporary file, fsync and rename;
* :mod:`~optax_localsgd.io.npz`: the ``.npz`` archive layer (atomic, pickle-free, byte-reproducible,
  a JSON metadata member, per-array hashes);
* :mod:`~optax_localsgd.io.checkpoint`: any pytree (meta-training state, a ViT's training
  state) as a verified checkpoint;
* :mod:`~optax_localsgd.io.weights`: the weight-file format of LOpt-A / LAgg-A (safetensors;
  older ``.npz`` weight files are still read);
* :mod:`~optax_localsgd.io.locate`: where a weight file is (bundled names, run directories).

Users load weights through :mod:`optax_localsgd.pretrained`.
"""
