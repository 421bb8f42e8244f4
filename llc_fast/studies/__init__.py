"""Studies built on many chains of one run: calibration of (lr, gamma, nbeta), sweeps over the grid, the
perturbation probe, LLCs over training checkpoints, and Bayesian influence functions."""
from .auto import AutoCalibrationError, estimate_llc_auto
from .bif import estimate_bif
from .calibrate import CalibrationResult, CalibrationRow, calibrate
from .checkpoints import CheckpointSweepResult, estimate_over_checkpoints
from .probe import ProbeResult, perturbation_probe
from .sweep import SweepResult, sweep

__all__ = ["estimate_llc_auto", "AutoCalibrationError", "calibrate", "CalibrationResult", "CalibrationRow",
           "perturbation_probe", "ProbeResult", "sweep",
           "SweepResult", "estimate_over_checkpoints", "CheckpointSweepResult", "estimate_bif"]
