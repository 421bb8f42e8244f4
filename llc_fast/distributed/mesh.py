"""Where each process sits: W processes = G chain groups x S shard ranks.

    rank = g * S + s        g: chain group (0 .. G-1), s: rank inside the shard group (0 .. S-1)

A chain group's S ranks hold one copy of the model, sharded over them with FSDP2, and run its
chains one after another; the G groups run at once and never exchange gradients. The ranks of a
shard group are consecutive, so with S <= GPUs per node a group stays inside one node (FSDP's
all-gathers and reduce-scatters then run over NVLink). Chains are dealt round-robin: chain c runs
in group c mod G.

The device mesh is 2-D, ``("chain", "shard")`` of shape (G, S) (``init_device_mesh``); FSDP is
given the 1-D ``"shard"`` sub-mesh, so its collectives stay inside the group.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

MESH_DIMS = ("chain", "shard")


def world_size() -> int:
    """The process group's size, 1 when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def launched_processes() -> int:
    """How many processes run this program together: the process group's size, else torchrun's WORLD_SIZE (also
    before ``init_process_group``), else 1."""
    world = os.environ.get("WORLD_SIZE", "1")
    return max(world_size(), int(world) if world.isdigit() else 1)


def launched_world_size() -> int:
    """``world_size()``, but under torchrun (WORLD_SIZE > 1) without ``init_process_group`` raise: every
    process would otherwise run the whole estimate on its own."""
    world = os.environ.get("WORLD_SIZE", "1")
    if world_size() == 1 and launched_processes() > 1:
        raise RuntimeError(
            f"this process runs under torchrun (WORLD_SIZE={world}) but torch.distributed is not initialised, so "
            "each of the processes would run the whole estimate. Add this line before estimate_llc: "
            "llc_fast.distributed.init_from_env()   (or torch.distributed.init_process_group('gloo' or 'nccl'))"
        )
    return world_size()


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


@dataclass(frozen=True)
class ChainMesh:
    """The layout of this run's processes (see module docstring).

    device_mesh: the 2-D ("chain", "shard") DeviceMesh, or None when S == 1 (nothing is sharded)
    or when the model came sharded by the caller (``shard_group`` is then its mesh's group).
    """

    world_size: int
    shard_group_size: int
    rank: int
    device: torch.device
    chain_group: int
    shard_rank: int = 0
    device_mesh: object | None = None
    shard_group: object | None = None  # the ProcessGroup of this rank's shard group (S > 1)

    @property
    def num_chain_groups(self) -> int:
        return self.world_size // self.shard_group_size

    @property
    def is_group_leader(self) -> bool:
        """Rank 0 of its shard group: the rank that reports its group's chains."""
        return self.shard_rank == 0

    def chains(self, num_chains: int) -> list[int]:
        """The global indices of the chains this rank's group runs (round-robin over groups)."""
        return chain_assignment(num_chains, self.num_chain_groups)[self.chain_group]

    def shard_mesh(self):
        """The 1-D sub-mesh FSDP shards over."""
        if self.device_mesh is None:
            raise RuntimeError("no device mesh: S == 1 or the model was sharded by the caller")
        return self.device_mesh["shard"]


def chain_assignment(num_chains: int, num_groups: int) -> list[list[int]]:
    """Chains of each group: chain c runs in group c mod num_groups."""
    return [list(range(g, num_chains, num_groups)) for g in range(num_groups)]


def check_shard_group_size(shard_group_size: int | None, world: int) -> int:
    """S, defaulting to the world size; it must divide the world size."""
    s = world if shard_group_size is None else shard_group_size
    if isinstance(s, bool) or not isinstance(s, int) or s < 1 or world % s:
        raise ValueError(
            f"shard_group_size must be a positive divisor of the number of processes ({world}), "
            f"got {shard_group_size!r}; "
            f"with W processes and shard groups of S, W/S chains run at once"
        )
    return s


def make_chain_mesh(shard_group_size: int | None, device: torch.device) -> ChainMesh:
    """The mesh of the initialised process group for shard groups of ``shard_group_size`` (default: all)."""
    world, me = world_size(), rank()
    s = check_shard_group_size(shard_group_size, world)
    if s == 1:
        return ChainMesh(world, 1, me, device, chain_group=me, shard_rank=0)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (world // s, s), mesh_dim_names=MESH_DIMS)
    return ChainMesh(world, s, me, device, chain_group=me // s, shard_rank=me % s, device_mesh=mesh,
                     shard_group=mesh["shard"].get_group())


def mesh_of_sharded_model(param_mesh, device: torch.device, shard_group_size: int | None) -> ChainMesh:
    """The layout implied by a model the caller already sharded (its parameters' 1-D mesh)."""
    world, me = world_size(), rank()
    if param_mesh.ndim != 1:
        raise ValueError(
            f"the model is sharded over a {param_mesh.ndim}-D mesh; llc_fast samples models sharded with fully_shard "
            "over a 1-D mesh (pass the unsharded model to let llc_fast shard it)"
        )
    s = param_mesh.size()
    if shard_group_size not in (None, s):
        raise ValueError(f"the model is sharded over {s} ranks but shard_group_size={shard_group_size}")
    check_shard_group_size(s, world)
    ranks = [int(r) for r in param_mesh.mesh.flatten().tolist()]
    leaders: list = [None] * world
    dist.all_gather_object(leaders, min(ranks))
    groups = sorted(set(leaders))
    if len(groups) * s != world:
        raise ValueError(f"the model's shard groups do not tile the {world} processes: group leaders {groups}")
    return ChainMesh(world, s, me, device, chain_group=groups.index(min(ranks)), shard_rank=param_mesh.get_local_rank(),
                     shard_group=param_mesh.get_group())


# --- process group from the torchrun environment ------------------------------------------------

@dataclass(frozen=True)
class LaunchInfo:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    initialised_here: bool  # this call created the process group (so the caller should destroy it)


def init_from_env(timeout_s: float = 1800.0, device: str | None = None) -> LaunchInfo:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...).

    gloo on CPU, nccl on CUDA (each process takes GPU LOCAL_RANK). A single process (no torchrun, or
    --nproc_per_node=1) gets no process group. ``timeout_s`` bounds every collective: a rank that
    stops answering makes the others fail after at most that long instead of hanging.
    """
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world <= 1:
        return LaunchInfo(0, 1, 0, 1, dev, False)
    if dist.is_initialized():
        return LaunchInfo(dist.get_rank(), dist.get_world_size(), local_rank, local_world, dev, False)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return LaunchInfo(dist.get_rank(), dist.get_world_size(), local_rank, local_world, dev, True)


# --- splitting a chain's batch over its shard group ---------------------------------------------

class _NotSplittable(Exception):
    pass


def _batch_rows(batch) -> set[int]:
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 0:
            raise _NotSplittable
        return {batch.shape[0]}
    if isinstance(batch, Mapping):
        return set().union(*(_batch_rows(v) for v in batch.values())) if batch else set()
    if isinstance(batch, (list, tuple)):
        return set().union(*(_batch_rows(v) for v in batch)) if batch else set()
    return set()


def _take_rows(batch, lo: int, hi: int):
    if isinstance(batch, torch.Tensor):
        return batch[lo:hi]
    if isinstance(batch, Mapping):
        return type(batch)((k, _take_rows(v, lo, hi)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_take_rows(v, lo, hi) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(_take_rows(v, lo, hi) for v in batch)
    return batch


BATCH_SPLIT = ("auto", "split", "replicate")


def batch_part(batch, index: int, parts: int, mode: str = "auto"):
    """This shard rank's part of a chain's batch.

    "split": rows [index*B/parts, (index+1)*B/parts) of every tensor (all tensors must share the
    batch size B, a multiple of ``parts``): the shard group runs one data-parallel step, and FSDP's
    gradient average over the group is the gradient of the whole batch's mean loss.
    "replicate": every rank takes the whole batch (exact for any loss, S times the compute).
    "auto": split when possible, else replicate, decided per batch (both give the batch's mean loss
    when loss_fn is a mean over rows).
    """
    if mode not in BATCH_SPLIT:
        raise ValueError(f"batch_split must be one of {BATCH_SPLIT}, got {mode!r}")
    if parts == 1 or mode == "replicate":
        return batch
    rows = None
    try:
        rows = _batch_rows(batch)
        ok = len(rows) == 1 and next(iter(rows)) % parts == 0
    except _NotSplittable:
        ok = False
    if not ok:
        if mode == "split":
            got = sorted(rows) if rows is not None else "a 0-d tensor"
            raise ValueError(
                f"batch_split='split' needs every tensor of a batch to have the same first dimension, a multiple of "
                f"the shard group size {parts}; got {got}. Use batch_split='replicate' or 'auto'."
            )
        return batch
    size = next(iter(rows)) // parts
    return _take_rows(batch, index * size, (index + 1) * size)
