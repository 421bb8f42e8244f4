"""Chains: data streams and the sampling loop."""
from .runner import ChainHyper, ChainTrace, Schedule, run_chains_sequentially

__all__ = ["ChainHyper", "ChainTrace", "Schedule", "run_chains_sequentially"]
