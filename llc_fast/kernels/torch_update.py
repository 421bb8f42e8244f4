"""The "torch" backend: the reference (``reference.py``) as a backend, in plain torch on any device
it runs on. ``torch_update`` (also ``reference_update``) is the backend object
(``backend.Backend``: ``prepare`` and ``update``); the fast backends are tested against it."""
from __future__ import annotations

from . import philox
from .backend import Backend, PreparedUpdate
from .reference import BufferStep, thermostat_step
from .update_call import UpdateCall
from .update_spec import NOISE_SCHEMES, SAMPLERS, RowMasks, StepCounters


def segment_mask(mask, seg):
    """The segment's columns of a shared mask; a RowMasks as it is (indexed by local element)."""
    if mask is None or isinstance(mask, RowMasks):
        return mask
    return mask[seg.local]


class TorchPrepared(PreparedUpdate):
    """The reference's prepared update: one ``BufferStep`` per segment, on w*, stat and mask sliced to
    the segment's columns, with the segment's global offset."""

    def __init__(self, backend: "TorchBackend", call: UpdateCall):
        super().__init__(backend, call)
        lr, nbeta, gamma = (v[:, None] for v in call.per_row_values())
        chain_ids = call.chain_ids.to(call.device)
        philox.check_counters(chain_ids, 0, 0)  # once (a host sync for chain indices on an accelerator)
        self.steps = [(seg.local, call.w_star[seg.local],
                       BufferStep(seg.w, segment_mask(call.mask, seg), lr=lr, nbeta=nbeta, gamma=gamma,
                                  settings=call.settings, chain_ids=chain_ids, index_offset=seg.global_offset,
                                  local_start=seg.local_start)) for seg in call.segments]
        if call.settings.thermostat:  # SGNHT: each row's sampled elements over all segments
            self.lr, self.count = lr, sum(step.count for _, _, step in self.steps)

    def launch_step(self, counters: StepCounters, step: int) -> None:
        call = self.call
        thermostat = None if call.thermostat is None else call.thermostat[:, None]
        kinetic = 0.0
        for seg, grad, (sl, w_star, buffer_step) in zip(call.segments, self.grads, self.steps):
            stat = None if call.stat is None else call.stat[:, sl]
            if stat is not None and not stat.is_contiguous():
                stat = stat.contiguous()
            k = buffer_step.run(seg.w, grad, w_star, stat, counters, step, call.seed, thermostat)
            if stat is not None and stat.data_ptr() != call.stat[:, sl].data_ptr():
                call.stat[:, sl].copy_(stat)
            if k is not None:
                kinetic = kinetic + k
        if thermostat is not None:  # SGNHT: the thermostat takes the kinetic energy of all the row's elements
            call.thermostat.copy_(thermostat_step(thermostat, kinetic, self.count, self.lr)[:, 0])


class TorchBackend(Backend):
    """The reference as a backend ("torch"): ``BufferStep`` once per segment, on w*, stat and mask
    sliced to the segment's columns, with the segment's global offset (``TorchPrepared``)."""

    name = "torch"
    devices = ("cpu", "cuda")
    samplers = SAMPLERS
    noise_schemes = NOISE_SCHEMES

    def prepare_call(self, call: UpdateCall) -> PreparedUpdate:
        return TorchPrepared(self, call)


torch_update = TorchBackend()
#: The reference update: ``reference_update(w, grad, w_star, stat, ...)`` (``Backend.update``).
reference_update = torch_update
