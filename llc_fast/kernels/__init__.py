"""Kernels: the reference update (the definition of the math), its counter-based noise, and
the fast backends that implement the same function."""
from .dispatch import BackendInfo, backends, select_backend
from .reference import reference_update
from .update_spec import SAMPLERS, SamplerSettings, StepCounters

__all__ = ["BackendInfo", "backends", "select_backend", "reference_update", "SAMPLERS", "SamplerSettings",
           "StepCounters"]
