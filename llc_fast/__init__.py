"""llc_fast: fast estimation of the Local Learning Coefficient (LLC) with fused SGLD kernels.

    result = llc_fast.estimate_llc(model, data, loss_fn, lr=1e-4, nbeta=..., num_chains=4)
    print(result.llc_mean, result.llc_std)
"""
__version__ = "0.1.0"

from . import oracles  # noqa: E402
from .api import estimate_llc, estimate_restricted_llcs, estimate_susceptibilities  # noqa: E402
from .config import LLCConfig, default_nbeta  # noqa: E402
from .estimators import AllChainsDivergedError, LLCDivergenceWarning, LLCResult  # noqa: E402
from .estimators.restricted import RestrictedLLCResult  # noqa: E402
from .estimators.susceptibility import SusceptibilityResult  # noqa: E402
from .estimators.bif_result import BIFResult  # noqa: E402
from .kernels import backends  # noqa: E402
from .studies import (AutoCalibrationError, CalibrationResult, CheckpointSweepResult, ProbeResult,  # noqa: E402
                      SweepResult, calibrate, estimate_bif, estimate_llc_auto, estimate_over_checkpoints,
                      perturbation_probe, sweep)

__all__ = ["estimate_llc", "estimate_restricted_llcs", "RestrictedLLCResult", "estimate_susceptibilities", "SusceptibilityResult", "LLCConfig", "LLCResult", "LLCDivergenceWarning", "AllChainsDivergedError", "backends",
           "oracles", "estimate_llc_auto", "AutoCalibrationError", "calibrate", "CalibrationResult", "default_nbeta",
           "sweep", "SweepResult", "perturbation_probe",
           "ProbeResult", "estimate_over_checkpoints", "CheckpointSweepResult", "estimate_bif", "BIFResult",
           "__version__"]
