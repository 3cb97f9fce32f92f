"""Training data for `pp.run`: token streams (bytes, memory-mapped token files, tokenized text) and the
batches of a step, a pure function of (seed, step); `python -m pp.data prepare|inspect` makes and reads
token files.
"""
from __future__ import annotations

from .batches import TokenBatches
from .stream import DataError, TokenStream, open_stream

__all__ = ["DataError", "TokenBatches", "TokenStream", "open_stream"]
