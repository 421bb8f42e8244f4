"""estimate_llc on many processes: FSDP2 shards a chain's model over a shard group, chain groups run at once.

``estimate_llc`` calls ``estimate_llc_sharded`` when torch.distributed is initialised with more than
one process (torchrun). The W processes form G = W/S chain groups of S shard ranks (``mesh.py``);
each group runs its chains (c = g, g+G, ...) one after another, and the results are gathered into one
LLCResult that **every rank** returns: the same traces and estimates everywhere (``timing`` holds the
rank's own clocks); rank 0 writes files, the other ranks may ignore it.

S = 1 (chains in parallel, nothing sharded)
    Each process runs its chains with the single-process machinery (``FlatState``, ``run_chains``:
    batched chains, one fused update per step over the flat vector, ``index_offset`` 0).

S > 1 (FSDP2)
    The model is sharded with ``fully_shard`` on the 1-D "shard" sub-mesh: each recognisable
    transformer block is a unit, then the root (``units.py``). A model the caller already sharded
    with ``fully_shard`` (1-D mesh, ``Shard(0)``) is used as it is. Every rank of the group reads the
    chain's batch from the same stream and takes its rows (``batch_split``, ``mesh.batch_part``); FSDP
    averages the gradient over the group; the loss is averaged over the group by an all-reduce.

    State on each rank lives on its local shards only:

    * the chain's weights **are** FSDP's local shards (``p.to_local()``, a view of the storage FSDP
      all-gathers from): the update writes them in place, nothing is copied per step;
    * the gradients are FSDP's reduce-scattered local shards (``p.grad.to_local()``);
    * w*, the RMSProp statistic and the mask are flat buffers of this rank's local elements,
      one contiguous segment per parameter.

    Global offsets: the unsharded flat vector is ``FlatLayout``'s (parameters in ``named_parameters``
    order, tied weights once), so parameter k starts at ``slot.offset``. FSDP2 gives shard rank s of
    S rows [s*ceil(d0/S), min(d0, (s+1)*ceil(d0/S))) of a parameter with d0 rows (``torch.chunk``),
    so the local shard is the global range starting at ``slot.offset + first_row * row_numel``. That
    is checked against the local tensor's shape, and passed as ``index_offset``: every element gets
    the noise (and bf16 rounding bits) it gets unsharded, so a chain is the same for any S, and a
    2-process run equals the 1-process run to float tolerance.

    Launches: a rank's shards are contiguous per parameter but not across parameters (rank s holds a
    slice of every parameter), so the update takes them as a table of segments (each shard's own
    [1, n] weights and gradient, its local start in the flat buffers, its global offset): one call of
    the backend's multi-segment entry (``update_segments``: one OpenMP region on the CPU, one Triton
    or CUDA launch on a GPU) per step; with S = 1 it is one launch for the whole vector. Before that
    multi-segment entry, a step was one fused update per segment. Measured on CPU (2-process gloo run of a 12-layer, width-768 GPT-2,
    85.9M parameters, rank 0 holding 42.9M elements in 148 segments; C++ backend, one thread each;
    a shared 2-core machine, three runs): one step's per-segment launches took 72-122 ms, a single
    launch over a flat staging buffer holding the same elements 68-105 ms, and staging itself (copy
    the shards and gradients in, the weights back out, then one launch) 134-168 ms, besides holding
    a second copy of the weights and gradients. So the update writes FSDP's shards in place, one
    launch per segment (a few tens of microseconds of overhead each, ~10 ms per step for the ~290
    segments of a 7B model, against seconds of forward and backward). The multi-segment entry now
    makes it one launch without copies (figures above predate it).

Not supported with S > 1: ``mala_every`` (use S = 1). ``chain_batching``, ``max_batched_chains`` and
``batch_memory_bytes`` apply to S = 1 only (with S > 1 a group's chains run one after another).
Randomness inside the model (dropout) differs from the single-process run.
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .. import __version__
from ..chains.data import STREAM_CHAIN, STREAM_INIT_LOSS, BatchStream, derived_seed, move_to_device
from ..chains.runner import DIVERGENCE_CHECK_EVERY, ChainHyper, Schedule, _first_draw_after, \
    _nan_after_first_bad, run_chains
from ..estimators import llc as _llc
from ..estimators import validation as check
from ..estimators.llc import LLCDivergenceWarning
from ..estimators.result import LLCResult
from ..kernels.dispatch import segments_update, select_backend
from ..kernels.reference import compute_dtype
from ..kernels.update_spec import SamplerSettings
from ..state.flat import FlatLayout, FlatState, isolated_buffers
from . import mesh as _mesh
from .failure import failure_guard
from .mesh import BATCH_SPLIT, ChainMesh, batch_part
from .units import transformer_blocks


def estimate_llc_sharded(
    model: nn.Module,
    data,
    loss_fn: Callable,
    *,
    sampler: str = "sgld",
    lr: float | Sequence[float],
    nbeta: float | Sequence[float] | None = None,
    gamma: float | Sequence[float] = 1.0,
    num_chains: int = 4,
    num_draws: int = 200,
    num_burnin_steps: int = 0,
    num_steps_bw_draws: int = 1,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    rmsprop_alpha: float = 0.99,
    rmsprop_eps: float = 0.1,
    weight_decay: float = 0.0,
    box: float | None = None,
    noise_level: float = 1.0,
    mask: dict[str, torch.Tensor] | None = None,
    num_init_loss_batches: int = 16,
    freeze_preconditioner_at: int | None = None,
    backend: str = "auto",
    shared_batches: bool = False,
    chain_batching: str = "auto",
    max_batched_chains: int | None = None,
    batch_memory_bytes: int | None = None,
    mala_every: int | None = None,
    shard_group_size: int | None = None,
    batch_split: str = "auto",
    failure_grace_s: float = 10.0,
) -> LLCResult:
    """``estimate_llc`` over the initialised process group (see module docstring); every rank calls it.

    The arguments are ``estimate_llc``'s, plus:
    shard_group_size: S, ranks per chain group (a divisor of the world size W; default W). W/S
        chains run at once; S = 1 runs whole models, one group per process, without FSDP.
    batch_split: how a shard group shares a chain's batch: "split" (each rank takes batch/S rows;
        FSDP's gradient average is then the whole batch's gradient), "replicate" (every rank runs
        the whole batch: exact for any loss_fn, S times the compute), or "auto" (split when every
        tensor of the batch has the same first dimension, divisible by S; else replicate).
    failure_grace_s: after another rank failed, how long a rank blocked in a collective waits before
        ending its process (``failure.py``).

    device: the device of this rank (default: the model's; with an nccl process group, the current
    CUDA device). With S > 1 an unsharded model is sharded in place with ``fully_shard`` (it stays
    sharded; its parameters hold w* again on return, bitwise); a model already sharded with
    ``fully_shard`` over a 1-D mesh sets S. Returns the same LLCResult on every rank. Without a
    process group of several ranks this is ``estimate_llc``.
    """
    args = dict(locals())
    for k in ("shard_group_size", "batch_split", "failure_grace_s"):
        args.pop(k)
    if _mesh.world_size() == 1:
        if shard_group_size not in (None, 1):
            raise ValueError(f"shard_group_size={shard_group_size} needs a process group of several ranks "
                             "(launch with torchrun --nproc_per_node=...)")
        return _llc.estimate_llc(**args)
    if batch_split not in BATCH_SPLIT:
        raise ValueError(f"batch_split must be one of {BATCH_SPLIT}, got {batch_split!r}")
    with failure_guard(grace_s=failure_grace_s) as guard:
        return _estimate(args, shard_group_size=shard_group_size, batch_split=batch_split, guard=guard)


# --- the run ------------------------------------------------------------------------------------

def _estimate(a: dict, *, shard_group_size, batch_split, guard) -> LLCResult:
    model, data, loss_fn = a["model"], a["data"], a["loss_fn"]
    settings, hyper, schedule, n = _llc.checked_inputs(a)
    layout = check.check_model(model, a["device"])
    device = _resolve_device(a["device"], layout)
    sharded_params = [p for p in layout.params if _is_dtensor(p)]
    if sharded_params and len(sharded_params) != len(layout.params):
        raise ValueError("some sampled parameters are sharded (DTensor) and some are not: shard the whole model with "
                         "fully_shard (blocks, then the root), or pass it unsharded")
    if sharded_params:
        cm = _mesh.mesh_of_sharded_model(sharded_params[0].device_mesh, device, shard_group_size)
    else:
        cm = _mesh.make_chain_mesh(shard_group_size, device)
    sharded = cm.shard_group_size > 1 or bool(sharded_params)
    if sharded and a["mala_every"]:
        raise NotImplementedError("mala_every is not supported on sharded models yet; use shard_group_size=1 "
                                  "(chains in parallel, whole models) to record MALA acceptance")
    chosen = select_backend(a["backend"], device)
    backend_name, update = chosen.name, chosen.update
    if a["mask"]:
        _check_mask(layout, a["mask"])  # before the model is sharded in place
    num_chains = a["num_chains"]
    config = _config(a, hyper, n, layout, device, backend_name, cm, batch_split, sharded)
    mine = cm.chains(num_chains)
    leader = cm.is_group_leader
    show = a["progress"] and cm.rank == 0

    t0 = time.perf_counter()
    if sharded:
        if not sharded_params:
            shard_model(model, cm.shard_mesh())
        run = _run_sharded(model, layout, data, loss_fn, hyper, mine, cm, settings=settings, schedule=schedule,
                           seed=a["seed"], update=update, device=device, mask=a["mask"],
                           shared_batches=a["shared_batches"], batch_split=batch_split,
                           num_init_loss_batches=a["num_init_loss_batches"], progress=show, guard=guard)
    else:
        run = _run_replicated(model, layout, data, loss_fn, hyper, mine, settings=settings, schedule=schedule,
                              a=a, update=update, device=device, progress=show, guard=guard)
    t_sampled = time.perf_counter()
    payloads: list = [None] * cm.world_size
    dist.all_gather_object(payloads, run if leader else None)
    t_end = time.perf_counter()

    traces = _assemble(payloads, num_chains, schedule)
    config["engine"] = traces["engine"]
    steps = num_chains * schedule.num_steps
    sampling_s = t_end - t0 - run["init_loss_s"]
    timing = dict(init_loss_s=run["init_loss_s"], sampling_s=sampling_s, steps=steps,
                  steps_per_s=steps / max(sampling_s, 1e-12), rank_sampling_s=t_sampled - t0 - run["init_loss_s"])
    if cm.rank == 0 and traces["fallback_reason"]:
        warnings.warn(f"the model could not be batched over chains ({traces['fallback_reason']}); chains ran one at "
                      "a time. Pass chain_batching='sequential' to skip the attempt.", RuntimeWarning, stacklevel=3)
    result = LLCResult.from_traces(traces["loss"], traces["init_loss"], hyper.nbeta.numpy(), traces["diverged"], config,
                                   timing, burnin_loss_trace=traces["burnin"], mala_acceptance=traces["mala"])
    with warnings.catch_warnings():
        if cm.rank != 0:  # one warning per run, not one per process
            warnings.simplefilter("ignore", LLCDivergenceWarning)
        _llc._report_divergence(result, hyper)
    return result


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def _resolve_device(device, layout: FlatLayout) -> torch.device:
    if device is not None:
        return torch.device(device)
    d = layout.device
    if d.type == "meta":
        raise ValueError("the model's parameters are on the meta device: materialise them (to_empty + load) first")
    if d.type == "cpu" and "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return d


def _config(a, hyper, n, layout, device, backend_name, cm: ChainMesh, batch_split, sharded) -> dict:
    mask = a["mask"]
    return dict(
        sampler=a["sampler"], lr=hyper.lr.tolist(), nbeta=hyper.nbeta.tolist(), gamma=hyper.gamma.tolist(),
        num_chains=a["num_chains"], num_draws=a["num_draws"], num_burnin_steps=a["num_burnin_steps"],
        num_steps_bw_draws=a["num_steps_bw_draws"], seed=a["seed"], device=str(device),
        rmsprop_alpha=a["rmsprop_alpha"], rmsprop_eps=a["rmsprop_eps"], weight_decay=a["weight_decay"], box=a["box"],
        noise_level=a["noise_level"], mask=sorted(mask) if mask else None,
        num_init_loss_batches=a["num_init_loss_batches"], freeze_preconditioner_at=a["freeze_preconditioner_at"],
        backend=backend_name, dataset_size=n, shared_batches=a["shared_batches"], chain_batching=a["chain_batching"],
        max_batched_chains=a["max_batched_chains"], mala_every=a["mala_every"],
        num_params=layout.numel, param_dtype=str(layout.dtype).replace("torch.", ""),
        llc_fast_version=__version__, torch_version=torch.__version__,
        world_size=cm.world_size, shard_group_size=cm.shard_group_size, num_chain_groups=cm.num_chain_groups,
        batch_split=batch_split if sharded else None, distributed_backend=str(dist.get_backend()),
    )


def _assemble(payloads: list, num_chains: int, schedule: Schedule) -> dict:
    """The group leaders' traces, one row per chain in chain order."""
    loss = np.full((num_chains, schedule.num_draws), np.nan)
    burnin = np.full((num_chains, schedule.num_burnin_steps), np.nan)
    mala = np.full((num_chains, schedule.num_mala), np.nan)
    diverged: dict[int, int] = {}
    engines, reasons, init_loss = [], [], None
    for p in payloads:
        if p is None:
            continue
        if init_loss is None:
            init_loss = p["init_loss"]  # the first leader's (rank 0's); every group computes the same
        for row, c in enumerate(p["chains"]):
            loss[c], burnin[c], mala[c] = p["loss"][row], p["burnin"][row], p["mala"][row]
        diverged.update(p["diverged"])
        if p["chains"]:
            engines.append(p["engine"])
        if p["fallback_reason"]:
            reasons.append(p["fallback_reason"])
    return dict(loss=loss, burnin=burnin, mala=mala, diverged=dict(sorted(diverged.items())), init_loss=init_loss,
                engine=engines[0] if engines else "none", fallback_reason=reasons[0] if reasons else "")


# --- S = 1: whole models, chains in parallel ----------------------------------------------------

def _run_replicated(model, layout, data, loss_fn, hyper: ChainHyper, mine: list[int], *, settings, schedule, a, update,
                    device, progress, guard) -> dict:
    sub = ChainHyper(*(t[mine] for t in (hyper.lr, hyper.nbeta, hyper.gamma, hyper.chain_ids)))
    rows = _llc._group_size(layout, settings, max(1, len(mine)), a["chain_batching"], a["max_batched_chains"],
                            a["batch_memory_bytes"], device)
    state = FlatState(layout, rows, device=device, preconditioned=settings.preconditioned,
                      initial_statistic=settings.initial_statistic)
    flat_mask = layout.flat_mask(a["mask"], device) if a["mask"] else None
    t0 = time.perf_counter()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), isolated_buffers(layout, device):
        init_loss = _llc._init_loss(model, state, data, loss_fn, a["seed"], a["num_init_loss_batches"], device)
        t_init = time.perf_counter()
        if mine:
            with _llc._progress_bar(len(mine) * schedule.num_steps, progress) as bar:

                def on_step(n: int) -> None:
                    guard.check()  # stop between steps once another rank has failed
                    bar.update(n)

                trace = run_chains(model, state, data, loss_fn, sub, settings=settings, schedule=schedule,
                                   seed=a["seed"], update=update, device=device, mask=flat_mask,
                                   shared_batches=a["shared_batches"], chain_batching=a["chain_batching"],
                                   on_step=on_step)
    if not mine:
        return dict(chains=[], loss=[], burnin=[], mala=[], diverged={}, engine="none", fallback_reason="",
                    init_loss=init_loss, init_loss_s=t_init - t0)
    return dict(chains=mine, loss=trace.loss_trace, burnin=trace.burnin_loss_trace, mala=trace.mala_acceptance,
                diverged={mine[row]: step for row, step in trace.diverged_at.items()}, engine=trace.engine,
                fallback_reason=trace.fallback_reason, init_loss=init_loss, init_loss_s=t_init - t0)


# --- S > 1: FSDP2 -------------------------------------------------------------------------------

def shard_model(model: nn.Module, mesh, **fully_shard_kwargs) -> nn.Module:
    """``fully_shard`` each transformer block of ``model`` (where recognisable), then the root, in place."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if isinstance(model, FSDPModule):
        return model
    for block in transformer_blocks(model):
        if not isinstance(block, FSDPModule):
            fully_shard(block, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


class _Segment:
    """One parameter's local shard: where it sits in the global flat vector and in this rank's buffers."""

    __slots__ = ("param", "name", "global_offset", "numel", "local_offset", "first_row", "rows")

    def __init__(self, param, name, global_offset, numel, local_offset, first_row, rows):
        self.param, self.name, self.global_offset, self.numel = param, name, global_offset, numel
        self.local_offset, self.first_row, self.rows = local_offset, first_row, rows

    def weights(self) -> torch.Tensor:
        """[1, n] view of FSDP's local shard (the storage FSDP all-gathers from)."""
        return self.param.to_local().view(1, -1)

    def grad(self) -> torch.Tensor | None:
        g = self.param.grad
        return None if g is None else g.to_local().view(1, -1)


def local_segments(model: nn.Module, layout: FlatLayout) -> list[_Segment]:
    """Each sampled parameter's local FSDP shard with its global flat offset (empty shards left out)."""
    from torch.distributed.tensor import Shard

    named = dict(model.named_parameters())
    out, local_offset = [], 0
    for slot in layout.slots:
        p = named.get(slot.name)
        if p is None or not _is_dtensor(p):
            raise ValueError(f"parameter {slot.name!r} is not sharded by FSDP; shard the whole model")
        if tuple(p.placements) != (Shard(0),) or p.device_mesh.ndim != 1:
            raise ValueError(f"parameter {slot.name!r} is sharded as {p.placements} over a "
                             f"{p.device_mesh.ndim}-D mesh; "
                             "llc_fast needs fully_shard's default Shard(0) over a 1-D mesh")
        local = p.to_local()
        shape = tuple(slot.shape)
        if not shape:
            raise ValueError(f"parameter {slot.name!r} is 0-dimensional; FSDP cannot shard it on dim 0")
        size, s = p.device_mesh.size(), p.device_mesh.get_local_rank()
        chunk = -(-shape[0] // size)
        first = min(s * chunk, shape[0])
        rows = max(0, min(shape[0], first + chunk) - first)
        if tuple(local.shape) != (rows, *shape[1:]) or not local.is_contiguous():
            raise RuntimeError(
                f"FSDP's local shard of {slot.name!r} on shard rank {s}/{size} has shape {tuple(local.shape)}; "
                f"expected "
                f"rows [{first}, {first + rows}) of {shape}, contiguous (an FSDP version with another layout?)"
            )
        row_numel = math.prod(shape[1:])
        if rows:
            out.append(_Segment(p, slot.name, slot.offset + first * row_numel, rows * row_numel, local_offset,
                                first, rows))
            local_offset += rows * row_numel
    return out


class ShardedChainState:
    """This rank's part of one chain: FSDP's local shards (the weights), and flat local buffers
    for w*, the RMSProp statistic and the mask, one segment per parameter (see module docstring)."""

    def __init__(self, model: nn.Module, layout: FlatLayout, *, settings: SamplerSettings, device: torch.device,
                 mask: dict | None):
        self.model, self.settings = model, settings
        self.segments = local_segments(model, layout)
        self.params = [s.param for s in self.segments]
        self.all_params = [p for p in model.parameters() if p.requires_grad]
        self.numel = sum(s.numel for s in self.segments)
        dtype = layout.dtype
        self.w_star = torch.empty(self.numel, dtype=dtype, device=device)
        with torch.no_grad():
            for seg in self.segments:
                self._star(seg).copy_(seg.weights()[0])
        self.stat = (torch.empty(self.numel, dtype=compute_dtype(dtype), device=device)
                     if settings.preconditioned else None)
        self.masks = self._local_masks(layout, mask or {}, device)
        self.flat_mask = None  # [numel] 0/1 of all segments (1 where a parameter has no mask), or None
        if any(m is not None for m in self.masks):
            self.flat_mask = torch.ones(self.numel, dtype=torch.float32, device=device)
            for seg, m in zip(self.segments, self.masks):
                if m is not None:
                    self.flat_mask[seg.local_offset: seg.local_offset + seg.numel].copy_(m)
        self._zeros = torch.zeros(max((s.numel for s in self.segments), default=0), dtype=dtype, device=device)

    def _star(self, seg: _Segment) -> torch.Tensor:
        return self.w_star[seg.local_offset: seg.local_offset + seg.numel]

    def _stat(self, seg: _Segment) -> torch.Tensor | None:
        if self.stat is None:
            return None
        return self.stat[seg.local_offset: seg.local_offset + seg.numel].view(1, -1)

    def _local_masks(self, layout: FlatLayout, mask: dict, device) -> list:
        _check_mask(layout, mask)
        out = []
        for seg in self.segments:
            if seg.name not in mask:
                out.append(None)
                continue
            full = torch.broadcast_to(torch.as_tensor(mask[seg.name]), layout.slot(seg.name).shape)
            out.append(full[seg.first_row: seg.first_row + seg.rows].reshape(-1).to(device=device,
                                                                                      dtype=torch.float32).contiguous())
        return out

    @torch.no_grad()
    def reset(self) -> None:
        """Every local shard back at w*, the statistic at its start value, no gradients."""
        for seg in self.segments:
            seg.weights()[0].copy_(self._star(seg))
        if self.stat is not None:
            self.stat.fill_(self.settings.initial_statistic)
        self.zero_grad()

    def zero_grad(self) -> None:
        for p in self.all_params:
            p.grad = None

    @torch.no_grad()
    def update(self, update: Callable, **step_args) -> None:
        """One fused update over all local segments (``update``'s multi-segment entry: one kernel call or
        launch per step; a backend without one falls back to one call per segment), each segment keyed by
        its global offset."""
        segments = []
        for seg in self.segments:
            grad = seg.grad()
            if grad is None:  # a parameter the loss does not use: gradient 0, as unsharded
                grad = self._zeros[: seg.numel].view(1, -1)
            segments.append((seg.weights(), grad, seg.local_offset, seg.global_offset))
        stat = None if self.stat is None else self.stat.view(1, -1)
        segments_update(update)(segments, self.w_star, stat, mask=self.flat_mask, **step_args)


def _check_mask(layout: FlatLayout, mask: dict) -> None:
    """FlatLayout.flat_mask's checks and messages, without building the [N] mask."""
    for name, m in mask.items():
        s = layout.slot(name)
        m = torch.as_tensor(m)
        try:
            torch.broadcast_to(m, s.shape)
        except RuntimeError as e:
            raise ValueError(f"mask for {name!r} has shape {tuple(m.shape)}, not broadcastable to "
                             f"{tuple(s.shape)}") from e
        if not torch.all((m == 0) | (m == 1)):
            raise ValueError(f"mask for {name!r} must hold only 0 and 1")


@contextlib.contextmanager
def _isolated_module_buffers(model: nn.Module):
    """Private copies of the module's buffers while sampling (BatchNorm statistics and the like)."""
    saved = [(m._buffers, name, t) for m in model.modules() for name, t in m._buffers.items() if t is not None]
    try:
        for table, name, t in saved:
            table[name] = t.detach().clone()
        yield
    finally:
        for table, name, t in saved:
            table[name] = t


def _checked_scalar(loss, where: str) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor):
        raise TypeError(f"loss_fn must return a scalar torch.Tensor, got {type(loss).__name__} {where}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return the scalar mean loss of the batch, got a tensor of shape "
                         f"{tuple(loss.shape)} {where}; reduce it (e.g. loss.mean())")
    return loss.reshape(())


def _group_mean(value: torch.Tensor, cm: ChainMesh) -> torch.Tensor:
    """The mean over the shard group of a float64 tensor (every rank gets it)."""
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=cm.shard_group)
    return value / cm.shard_group_size


def _run_sharded(model, layout, data, loss_fn, hyper: ChainHyper, mine: list[int], cm: ChainMesh, *, settings, schedule,
                 seed, update, device, mask, shared_batches, batch_split, num_init_loss_batches, progress,
                 guard) -> dict:
    state = ShardedChainState(model, layout, settings=settings, device=device, mask=mask)
    part = lambda batch: batch_part(batch, cm.shard_rank, cm.shard_group_size, batch_split)  # noqa: E731
    devices = [device] if device.type == "cuda" else []
    out = dict(chains=mine, loss=np.full((len(mine), schedule.num_draws), np.nan),
               burnin=np.full((len(mine), schedule.num_burnin_steps), np.nan),
               mala=np.full((len(mine), schedule.num_mala), np.nan), diverged={}, engine="fsdp", fallback_reason="")
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=devices), _isolated_module_buffers(model):
            out["init_loss"] = _init_loss_sharded(model, data, loss_fn, seed, num_init_loss_batches, device, cm, part)
            t_init = time.perf_counter()
            with _llc._progress_bar(len(mine) * schedule.num_steps, progress) as bar:
                for row, chain in enumerate(mine):
                    losses, seen = _run_chain(model, state, data, loss_fn, chain, hyper, cm, settings=settings,
                                              schedule=schedule, seed=seed, update=update, device=device,
                                              shared_batches=shared_batches, part=part, on_step=bar.update,
                                              guard=guard)
                    draws, burnin = _split_trace(losses, schedule, seen)
                    out["loss"][row], out["burnin"][row] = draws, burnin
                    if seen is not None:
                        out["diverged"][chain] = seen
    finally:
        state.reset()  # the model's parameters hold w* again, bitwise
    out["init_loss_s"] = t_init - t0
    return out


def _init_loss_sharded(model, data, loss_fn, seed, num_batches, device, cm: ChainMesh, part) -> float:
    first_pass = _llc._count_upto(data, num_batches)
    if first_pass == 0:
        raise ValueError("data yielded no batches: pass a non-empty DataLoader or list of batches")
    batches = BatchStream(data, seed=seed, stream=STREAM_INIT_LOSS, index=0)
    total = 0.0
    with torch.no_grad():
        for k in range(first_pass):
            where = f"at w* (initial-loss batch {k})"
            loss = _checked_scalar(loss_fn(model, move_to_device(part(next(batches)), device)), where)
            mean = _group_mean(loss.detach().to(torch.float64).reshape(1), cm)[0]
            total += float(check.checked_loss(mean, where))
    return total / first_pass


def _run_chain(model, state: ShardedChainState, data, loss_fn, chain: int, hyper: ChainHyper, cm: ChainMesh, *,
               settings, schedule: Schedule, seed, update, device, shared_batches, part, on_step, guard):
    """One chain on this shard group; returns its loss per step [num_steps] (NaN where not reached) and the
    step at which a divergence was seen (None)."""
    state.reset()
    stream = BatchStream(data, seed=seed, stream=STREAM_CHAIN, index=0 if shared_batches else chain)
    step_args = dict(lr=hyper.lr[chain:chain + 1].to(device), nbeta=hyper.nbeta[chain:chain + 1].to(device),
                     gamma=hyper.gamma[chain:chain + 1].to(device), settings=settings, seed=seed,
                     chain_ids=hyper.chain_ids[chain:chain + 1].to(device))
    losses = torch.full((schedule.num_steps,), math.nan, dtype=torch.float64, device=device)
    torch.manual_seed(derived_seed(seed, STREAM_CHAIN, chain, 2**32))  # dropout etc., as a group of one
    seen = None
    for t in range(schedule.num_steps):
        guard.check()
        batch = move_to_device(part(next(stream)), device)
        state.zero_grad()
        loss = _checked_scalar(loss_fn(model, batch), f"(chain {chain}, step {t})")
        loss.backward()
        losses[t : t + 1] = _group_mean(loss.detach().to(torch.float64).reshape(1), cm)
        last = t == schedule.num_steps - 1
        if (t + 1) % DIVERGENCE_CHECK_EVERY == 0 or last:
            if not bool(torch.isfinite(losses[: t + 1]).all()):  # the same on every rank of the group
                seen = t
                break
        on_step(1)
        if last:
            break
        state.update(update, counters=schedule.counters(t), **step_args)
    if seen is not None:
        on_step(schedule.num_steps - t)
    state.zero_grad()
    return losses.cpu().numpy(), seen


def _split_trace(losses: np.ndarray, schedule: Schedule, seen: int | None):
    """Per-step losses -> draws [D] and burn-in [B], as ``run_chains`` records them."""
    draws = np.full(schedule.num_draws, np.nan)
    burnin = np.full(schedule.num_burnin_steps, np.nan)
    for t, value in enumerate(losses):
        d = schedule.draw_at(t)
        if d is not None:
            draws[d] = value
        elif t < schedule.num_burnin_steps:
            burnin[t] = value
    if seen is not None:
        draws[_first_draw_after(schedule, seen):] = np.nan
    return _nan_after_first_bad(draws[None, :])[0], burnin
