"""Chains: data streams, forward/backward engines and the sampling loop."""
from .runner import ChainRun, run_chains, sample_local
from .schedule import ChainHyper, Schedule
from .trace import ChainTrace

__all__ = ["ChainHyper", "ChainRun", "ChainTrace", "Schedule", "run_chains", "sample_local"]
