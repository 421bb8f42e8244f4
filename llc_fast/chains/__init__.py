"""Chains: data streams, forward/backward engines and the sampling loop."""
from .runner import ChainHyper, ChainTrace, Schedule, run_chains

__all__ = ["ChainHyper", "ChainTrace", "Schedule", "run_chains"]
