"""Chain health diagnostics."""
from .mala import mala_log_acceptance, potential_and_gradient

__all__ = ["mala_log_acceptance", "potential_and_gradient"]
