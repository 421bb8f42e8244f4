"""Studies built on many chains of one run: calibration of (lr, gamma, nbeta)."""
from .calibrate import CalibrationResult, CalibrationRow, calibrate

__all__ = ["calibrate", "CalibrationResult", "CalibrationRow"]
