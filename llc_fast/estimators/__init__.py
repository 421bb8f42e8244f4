"""Estimators built on the chains: the LLC and its result type."""
from .llc import AllChainsDivergedError, LLCDivergenceWarning, estimate
from .result import LLCResult

__all__ = ["estimate", "LLCResult", "LLCDivergenceWarning", "AllChainsDivergedError"]
