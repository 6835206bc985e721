"""The data layer: offline text sources -> byte-level BPE tokenizer -> packed shards -> blended loader.

* :mod:`kinetic.data.sources` — one loader per domain (Python code, Python docs, State of the Union
  prose, Metamath math), their licenses, and ``scripts/install_data.sh`` for the optional ones;
* :mod:`kinetic.data.tokenizer` — train/save/load ``tokenizer.json``; special ids 0..5 are
  ``<pad> <bos> <eos> <|system|> <|user|> <|assistant|>``;
* :mod:`kinetic.data.pack` — :func:`build_corpus` writes ``index.json`` + uint16/uint32 shards with a
  per-domain validation split;
* :mod:`kinetic.data.loader` — :class:`BlendedLoader`, deterministic, resumable, rank-aware.

The commands ``kinetic data sources|build`` and ``kinetic tokenizer train`` run these jobs.
"""

from kinetic.data.loader import BlendedLoader
from kinetic.data.pack import build_corpus
from kinetic.data.sources import SOURCES, available
from kinetic.data.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

__all__ = ["SOURCES", "BlendedLoader", "available", "build_corpus", "load_tokenizer", "save_tokenizer",
           "train_tokenizer"]
