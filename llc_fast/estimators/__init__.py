"""Estimators built on the chains: the LLC and its result type."""
from .calibrate import CalibrationResult, calibrate
from .llc import AllChainsDivergedError, LLCDivergenceWarning, default_nbeta, estimate_llc
from .result import LLCResult

__all__ = ["estimate_llc", "LLCResult", "LLCDivergenceWarning", "AllChainsDivergedError", "default_nbeta",
           "calibrate", "CalibrationResult"]
