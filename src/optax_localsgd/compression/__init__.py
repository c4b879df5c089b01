"""Compressed worker deltas (paper appendix E.5): top-k with error feedback, quantisation, bits.

* :mod:`optax_localsgd.compression.transforms`: :func:`top_k` and :func:`quantize`, Optax
  transforms that a worker applies to its delta before sending it;
* :mod:`optax_localsgd.compression.spec`: :class:`TopK` and :class:`Quantize`, the same as
  hashable configuration for ``engine.RoundConfig(compression=...)``, the bits a delta costs,
  and :func:`from_spec` for the ``--compress`` flag.

Everything is re-exported here (see docs/compression.md).
"""

from optax_localsgd.compression.spec import (SPEC_HELP, Compression, Quantize, TopK, dense_bits,
                                             from_flag, from_spec, round_bits)
from optax_localsgd.compression.transforms import (SUPPORTED_BITS, QuantizeState, TopKState,
                                                   num_kept, quantize, top_k)

__all__ = [
    "SPEC_HELP", "SUPPORTED_BITS", "Compression", "Quantize", "QuantizeState", "TopK",
    "TopKState", "dense_bits", "from_flag", "from_spec", "num_kept", "quantize", "round_bits",
    "top_k",
]
