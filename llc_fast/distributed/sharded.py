"""estimate_llc on many processes: FSDP2 shards a chain's model over a shard group, chain groups run at once.

``estimate_llc`` calls ``estimate_llc_sharded`` when torch.distributed is initialised with more than
one process (torchrun). The W processes form G = W/S chain groups of S shard ranks (``mesh.py``);
each chain group runs its chains (c = g, g+G, ...) one after another, and the results are gathered into one
LLCResult that **every rank** returns: the same traces and estimates everywhere (``timing`` holds the
rank's own clocks); rank 0 writes files, the other ranks may ignore it.

S = 1 (chains in parallel, nothing sharded)
    Each process runs its chains with the single-process sampler (``estimators.sampling.sample_local``:
    row batches, one fused update per step over the flat vector).

S > 1 (FSDP2)
    The model is sharded with ``fully_shard`` on the 1-D "shard" sub-mesh: each recognisable
    transformer block is a unit, then the root (``units.py``). A model the caller already sharded
    with ``fully_shard`` (1-D mesh, ``Shard(0)``) is used as it is. Every rank of the shard group reads the
    chain's batch from the same stream and takes its rows (``batch_split``, ``mesh.batch_part``); FSDP
    averages the gradient over the shard group; the loss is averaged over it by an all-reduce.

    The chain's state on each rank is its local shards (``state.sharded.ShardedChainState``: the
    weights are FSDP's local shards, w*, the statistic and the mask flat local buffers, each element
    keyed by its global index), the engine ``engine.FSDPEngine``, and the loop the single-process one
    (``chains.runner.run_chains``, set up by ``chains.setup.run_on_state`` like the single-process run), one
    chain at a time. A 2-process run equals the 1-process run to
    float tolerance.

    Launches: a rank's shards are contiguous per parameter but not across parameters, so the update
    takes them as a table of segments (each shard's own [1, n] weights and gradient, its local start
    in the flat buffers, its global offset): one call of the backend's multi-segment entry per step
    (one OpenMP region on the CPU, one Triton or CUDA launch on a GPU), writing FSDP's shards in place.

Not supported with S > 1: ``mala_every`` (use S = 1). ``chain_batching``, ``max_batched_chains`` and
``batch_memory_bytes`` apply to S = 1 only (with S > 1 a chain group's chains run one after another).
Randomness inside the model (dropout) differs from the single-process run.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import nn

from ..chains.setup import ChainRun, model_facts, run_on_state
from ..chains.trace import ChainTrace
from ..config import LLCConfig
from ..estimators.llc import estimate
from ..estimators.sampling import control_for, sample_local, setup_settings
from ..kernels.dispatch import select_backend
from ..state.flat import FlatLayout
from ..state.sharded import ShardedChainState, is_dtensor
from . import mesh as _mesh
from .engine import FSDPEngine
from .failure import failure_guard
from .units import transformer_blocks


def estimate_llc_sharded(model: nn.Module, data, loss_fn, *, shard_group_size: int | None = None,
                         batch_split: str = "auto", failure_grace_s: float = 10.0, **options):
    """``llc_fast.estimate_llc`` over the initialised process group (see module docstring); every rank calls it.

    options: ``estimate_llc``'s keyword arguments. Besides them:
    shard_group_size: S, ranks per chain group (a divisor of the world size W; default W). W/S
        chains run at once; S = 1 runs whole models, one chain group per process, without FSDP.
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
    config = LLCConfig(shard_group_size=shard_group_size, batch_split=batch_split, failure_grace_s=failure_grace_s,
                       **options)
    if _mesh.launched_world_size() == 1:
        if shard_group_size not in (None, 1):
            raise ValueError(f"shard_group_size={shard_group_size} needs a process group of several ranks "
                             "(launch with torchrun --nproc_per_node=...)")
        return estimate(model, data, loss_fn, config)
    return estimate(model, data, loss_fn, config, sample=sample_sharded)


def sample_sharded(model: nn.Module, data, loss_fn, config) -> ChainRun:
    """The chains of ``config`` (an ``LLCConfig``) on every process of the process group; the same ChainRun on every
    rank (rank 0 reports)."""
    with failure_guard(grace_s=config.failure_grace_s) as guard:
        return _sample(model, data, loss_fn, config, guard)


def _sample(model, data, loss_fn, config, guard) -> ChainRun:
    layout = FlatLayout.for_sampling(model)
    device = resolve_device(config.device, layout)
    sharded_params = [p for p in layout.params if is_dtensor(p)]
    if sharded_params and len(sharded_params) != len(layout.params):
        raise ValueError("some sampled parameters are sharded (DTensor) and some are not: shard the whole model with "
                         "fully_shard (blocks, then the root), or pass it unsharded")
    if sharded_params:
        cm = _mesh.mesh_of_sharded_model(sharded_params[0].device_mesh, device, config.shard_group_size)
    else:
        cm = _mesh.make_chain_mesh(config.shard_group_size, device)
    sharded = cm.shard_group_size > 1 or bool(sharded_params)
    if sharded and config.mala_every:
        how = "pass the model unsharded and shard_group_size=1" if sharded_params else \
            "pass shard_group_size=1" if config.shard_group_size is not None else \
            "call llc_fast.distributed.estimate_llc_sharded(..., shard_group_size=1, mala_every=...) instead of " \
            "estimate_llc"
        raise NotImplementedError(f"mala_every={config.mala_every} (MALA acceptance) is not supported on a model "
                                  f"sharded over {cm.shard_group_size} ranks yet: {how} (whole models, chains in "
                                  "parallel), or leave mala_every out")
    if sharded and config.preconditioner is not None:
        raise NotImplementedError(f"preconditioner={config.preconditioner!r} is not supported on a model sharded over "
                                  f"{cm.shard_group_size} ranks yet (its Hessian-vector products at w* need the whole "
                                  "model on one rank): pass the model unsharded with shard_group_size=1 (chains in "
                                  "parallel), or leave preconditioner out")
    if sharded and config.sampler == "sgnht":
        raise NotImplementedError(f"sampler='sgnht' is not supported on a model sharded over {cm.shard_group_size} "
                                  "ranks: its thermostat sums the kinetic energy over every element of a chain, which "
                                  "spans the shards. Pass the model unsharded with shard_group_size=1 (chains in "
                                  "parallel), or use sampler='sgld'")
    if config.mask:
        layout.checked_mask(config.mask)  # before the model is sharded in place
    backend = select_backend(config.backend, device, config.sampler, config.noise_scheme)
    mine = cm.chains(config.num_chains)
    show = config.progress and cm.rank == 0
    control = control_for(config, rank=cm.rank, world=cm.world_size,
                          agree=common_generation(cm) if sharded else None)

    t0 = time.perf_counter()
    if sharded:
        if not sharded_params:
            shard_model(model, cm.shard_mesh())
        settings = setup_settings(config).for_rows(mine).replace(progress=show)
        run = sample_fsdp(model, layout, data, loss_fn, settings, cm, config.batch_split, backend=backend,
                          device=device, on_step=guard.check, control=control)
    else:
        run = sample_local(model, data, loss_fn, config.replace(device=device), chains=mine, on_step=guard.check,
                           progress=show, control=control)
    t_sampled = time.perf_counter()
    payloads: list = [None] * cm.world_size
    dist.all_gather_object(payloads, (mine, run.trace, run.init_loss) if cm.is_group_leader else None)
    t_end = time.perf_counter()

    leaders = [p for p in payloads if p is not None]
    trace = ChainTrace.gather([(chains, part) for chains, part, _ in leaders], config.num_chains, config.schedule)
    init_loss = leaders[0][2]  # rank 0's; every chain group computes the same
    init_s = run.timing["init_loss_s"]
    timing = dict(init_loss_s=init_s, sampling_s=t_end - t0 - init_s, rank_sampling_s=t_sampled - t0 - init_s)
    facts = dict(run.facts, engine=trace.engine, world_size=cm.world_size, shard_group_size=cm.shard_group_size,
                 num_chain_groups=cm.num_chain_groups, batch_split=config.batch_split if sharded else None,
                 distributed_backend=str(dist.get_backend()))
    return ChainRun(init_loss, trace, timing, facts, report=cm.rank == 0)


def common_generation(cm):
    """The newest checkpoint generation every rank of this shard group has (see ``control_for``)."""
    def agree(mine: list[int]) -> int | None:
        everyone: list = [None] * cm.shard_group_size
        dist.all_gather_object(everyone, mine, group=cm.shard_group)
        common = set(everyone[0]).intersection(*map(set, everyone[1:]))
        return max(common) if common else None

    return agree


def sample_fsdp(model, layout: FlatLayout, data, loss_fn, settings, cm, batch_split: str, *, backend, device,
                on_step, control) -> ChainRun:
    """``settings``' rows (``chains.settings.SetupSettings``) one chain at a time on this rank's shards of the
    model, sharded over the shard group of ``cm``: the FSDP state and engine, then ``chains.setup.run_on_state``."""
    update = settings.loop.update
    state = ShardedChainState(model, layout, device=device, preconditioned=update.preconditioned,
                              initial_statistic=update.initial_statistic, mask=settings.mask,
                              shard_group=cm.shard_group)
    engine = FSDPEngine(model, state, loss_fn, cm, batch_split)
    run, _ = run_on_state(state, engine, data, settings, backend=backend, device=device, control=control,
                          on_step=on_step)
    run.facts = dict(device=str(device), backend=backend.name, engine="fsdp", **model_facts(model, layout))
    return run


def resolve_device(device, layout: FlatLayout) -> torch.device:
    """This rank's device: ``device``, else the model's (with an nccl process group: the current CUDA device)."""
    if device is not None:
        return torch.device(device)
    d = layout.device
    if d.type == "meta":
        raise ValueError("the model's parameters are on the meta device: materialise them (to_empty + load) first")
    if d.type == "cpu" and "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return d


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
