"""Kernels: the reference update (the definition of the math), its counter-based noise, and
the fast backends that implement the same function behind one base class (``backend.Backend``)."""
from .backend import Backend, NotSupportedError, UpdateCall
from .dispatch import BackendInfo, backend_names, backends, select_backend
from .reference import reference_update
from .update_spec import SAMPLERS, RowMasks, SamplerSettings, StepCounters

__all__ = ["Backend", "BackendInfo", "NotSupportedError", "UpdateCall", "backend_names", "backends",
           "select_backend", "reference_update", "RowMasks", "SAMPLERS", "SamplerSettings", "StepCounters"]
