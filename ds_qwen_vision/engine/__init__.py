"""Rank 0's engine, one concern per file: intake.py (request -> sequences), scheduler.py (each step's plan),
output.py (picks, tokens into events, per-sequence isolation), engine.py (the IPC handler and the loop),
warmup.py; sampling.py, textstream.py, tools.py, grammar.py, speculative.py and the caches' bookkeeping
(prefix_cache.py, block_manager.py) beside them."""
from .engine import Engine
from .sampling import RowParams, Sampling, sample
from .sequence import RequestError, Sequence

__all__ = ["Engine", "RequestError", "RowParams", "Sampling", "Sequence", "sample"]
