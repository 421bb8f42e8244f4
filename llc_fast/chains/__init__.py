"""Chains: data streams, forward/backward engines, the sampling loop and its set-up."""
from .runner import run_chains
from .schedule import ChainHyper, Schedule
from .settings import LoopSettings, SetupSettings
from .setup import ChainRun, run_local
from .trace import ChainTrace

__all__ = ["ChainHyper", "ChainRun", "ChainTrace", "LoopSettings", "Schedule", "SetupSettings", "run_chains",
           "run_local"]
