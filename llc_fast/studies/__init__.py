"""Studies built on many chains of one run: calibration of (lr, gamma, nbeta), sweeps over the grid, the
perturbation probe, and LLCs over training checkpoints."""
from .auto import AutoCalibrationError, estimate_llc_auto
from .calibrate import CalibrationResult, CalibrationRow, calibrate
from .checkpoints import CheckpointSweepResult, estimate_over_checkpoints
from .probe import ProbeResult, perturbation_probe
from .sweep import SweepResult, sweep

__all__ = ["estimate_llc_auto", "AutoCalibrationError", "calibrate", "CalibrationResult", "CalibrationRow",
           "perturbation_probe", "ProbeResult", "sweep",
           "SweepResult", "estimate_over_checkpoints", "CheckpointSweepResult"]
