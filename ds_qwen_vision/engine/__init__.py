"""Rank 0's engine: requests, scheduling (engine.py), sampling (sampling.py), output text (textstream.py)."""
from .engine import Engine, RequestError, Sequence
from .sampling import RowParams, Sampling, sample

__all__ = ["Engine", "RequestError", "RowParams", "Sampling", "Sequence", "sample"]
