"""Kernels: the reference update (``reference.py``, the definition of the math), its counter-based
noise (``philox.py``), and the backends that implement the same function behind one base class
(``backend.Backend``), each in the module named after it: "torch" (``torch_update.py``, the
reference), "cpu" (``cpu_update.py``), "cuda" (``cuda_update.py``), "triton" (``triton_update.py``)."""
from .backend import Backend, NotSupportedError, PreparedUpdate
from .dispatch import BackendInfo, backend_names, backends, select_backend
from .torch_update import reference_update, torch_update
from .update_call import Segment, UpdateCall
from .update_spec import SAMPLERS, RowMasks, SamplerSettings, StepCounters

__all__ = ["Backend", "BackendInfo", "NotSupportedError", "PreparedUpdate", "Segment", "UpdateCall", "backend_names",
           "backends", "select_backend", "reference_update", "torch_update", "RowMasks", "SAMPLERS", "SamplerSettings",
           "StepCounters"]
