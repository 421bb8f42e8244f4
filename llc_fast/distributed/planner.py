"""Per-rank memory of a sampling run, before any of it is allocated; refuse what will not fit.

For W processes in shard groups of S (W/S chains in flight), each rank holds, in bytes
(e = bytes per parameter, N_r = the largest rank's share of the N sampled parameters, which is
rank 0's: FSDP gives each rank ceil(rows/S) rows of every parameter):

S > 1 (FSDP2)                                   S = 1 (each rank a whole model, R chains batched)
  parameters  N_r*e  (FSDP's local shards are     parameters  N*e (the model) + R*N*e (chain weights)
              the chain's current weights)
  w*          N_r*e                                w*          N*e
  statistic   N_r*4  (RMSProp samplers; 8 for      statistic   R*N*4
              float64 weights)
  gradients   N_r*e                                gradients   R*N*e
  FSDP        e*(3*largest block + 2*root unit): the gathered parameters of the running and the
              prefetched block and the running block's unsharded gradients, and the root unit
              (embeddings, head), which FSDP keeps gathered through forward and backward
  activations of one forward/backward on a micro-batch of b sequences of T tokens (b = batch/S
              when the batch is split over the shard group), transformer of L layers, width h,
              MLP width I, vocabulary V, activations in the parameters' dtype (e_a bytes):
                per layer     b*T*(8h + 3I)*e_a   (inputs of every matmul, norm and activation)
                all layers    L * per layer,  or with activation checkpointing
                              L*b*T*h*e_a (block inputs) + one layer recomputed
                logits        b*T*V*(2*e_a + 8)  (logits, float32 log-softmax and its gradient)
              (memory-efficient attention assumed: no T^2 score matrix; eager attention adds
              b*heads*T^2*e_a per layer, 2x without checkpointing)
  overhead    10 % of the above (allocator fragmentation) + 1 GiB (CUDA context, communicator buffers)

A restricted run (``plan_memory(components=...)``: components x chains rows on one process) is planned by
``restricted_plan``: sparse rows, each holding only its component's coordinates, beside full rows.

This is an estimate meant to refuse configurations that cannot fit and to say what to change; a
configuration it accepts may still need a smaller batch on an unusual model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..state.memory import available_bytes, bytes_per, row_bytes
from .units import transformer_blocks, unit_param_counts

if TYPE_CHECKING:
    from .restricted_plan import RestrictedMemoryPlan

GiB = 1 << 30
FIXED_OVERHEAD = 1 * GiB
FRAGMENTATION = 0.10
#: Usable memory of an "80 GB" H100/A100 as torch reports it (H100 SXM: 79.1 GiB), less a little headroom.
GPU_80GB = 78 * GiB


class MemoryPlanError(RuntimeError):
    """The configuration does not fit in the memory of a rank; the message says what to change."""


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know about a model (build one with ``model_spec``)."""

    name: str
    param_shapes: tuple[tuple[int, ...], ...]  # each sampled parameter, in order
    block_params: tuple[int, ...]  # sampled parameters of each FSDP block unit
    root_params: int  # the rest (the root unit)
    num_layers: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    vocab_size: int = 0
    num_heads: int = 0

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes)

    def shard_numel(self, shard_group_size: int) -> int:
        """Elements of the largest rank's FSDP shards (rank 0: ceil(rows / S) rows of every parameter)."""
        total = 0
        for shape in self.param_shapes:
            if not shape:
                total += 1
                continue
            rows = -(-shape[0] // shard_group_size)
            total += min(rows, shape[0]) * math.prod(shape[1:])
        return total


def model_spec(model: nn.Module, name: str | None = None) -> ModelSpec:
    """The planner's view of ``model`` (parameters may be on the meta device: nothing is allocated)."""
    seen: set[int] = set()
    shapes = []
    for p in model.parameters():
        if id(p) not in seen and p.requires_grad and p.is_floating_point():
            seen.add(id(p))
            shapes.append(tuple(p.shape))
    blocks = transformer_blocks(model)
    block_counts, root = unit_param_counts(model, blocks)
    config = getattr(model, "config", None)
    h = _cfg(config, "hidden_size", "n_embd", "d_model")
    inter = _cfg(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * h
    return ModelSpec(
        name=name or getattr(config, "_name_or_path", "") or type(model).__name__,
        param_shapes=tuple(shapes), block_params=tuple(block_counts), root_params=root,
        num_layers=len(blocks) if h else 0, hidden_size=h, intermediate_size=inter if h else 0,
        vocab_size=_cfg(config, "vocab_size"), num_heads=_cfg(config, "num_attention_heads", "n_head"),
    )


def _cfg(config, *names) -> int:
    for n in names:
        v = getattr(config, n, None) if config is not None else None
        if isinstance(v, int) and v > 0:
            return v
    return 0


def spec_from_hf_config(config, name: str = "") -> ModelSpec:
    """Build a HuggingFace causal LM from its config on the meta device (no memory) and describe it."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return model_spec(model, name or getattr(config, "model_type", ""))


@dataclass
class MemoryPlan:
    """Per-rank bytes of one configuration; ``fits`` against ``capacity`` (None: not checked)."""

    spec: ModelSpec
    world_size: int
    shard_group_size: int
    param_dtype: torch.dtype
    sampler: str
    batch_size: int
    seq_len: int
    activation_checkpointing: bool
    batched_chains: int  # chains batched per rank when S == 1
    capacity: int | None
    parts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def chains_in_flight(self) -> int:
        groups = self.world_size // self.shard_group_size
        return groups * (self.batched_chains if self.shard_group_size == 1 else 1)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return self.capacity is None or self.total <= self.capacity

    def table(self) -> str:
        s = self.shard_group_size
        n = self.spec.num_params
        size = f"{n / 1e9:.3g}B" if n >= 1e8 else f"{n / 1e6:.3g}M"
        head = (f"memory per rank: {self.spec.name or 'model'}, {size} parameters "
                f"({str(self.param_dtype).replace('torch.', '')}), {self.world_size} process(es) in shard groups of "
                f"{s} -> {self.chains_in_flight} chain(s) in flight; sampler {self.sampler}, batch {self.batch_size}"
                f" x {self.seq_len} tokens{', activation checkpointing' if self.activation_checkpointing else ''}")
        rows = [f"  {k:<12} {v / GiB:9.2f} GiB" for k, v in self.parts.items()]
        cap = "not checked" if self.capacity is None else f"{self.capacity / GiB:.2f} GiB"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        rows.append(f"  {'total':<12} {self.total / GiB:9.2f} GiB of {cap}: {verdict}")
        return "\n".join([head, *rows, *(f"  note: {n}" for n in self.notes)])

    def advice(self) -> list[str]:
        """What would make it fit: each single change that does, re-planned (the smallest such change)."""
        if self.fits:
            return []
        out = []
        for label, candidates in _ALTERNATIVES:
            for kwargs in candidates(self):
                alt = plan_memory(self.spec, **{**self._kwargs(), **kwargs})
                if alt.fits:
                    out.append(f"{label(alt)} ({alt.total / GiB:.1f} GiB per rank, {alt.chains_in_flight} chain(s) "
                               "in flight)")
                    break
        return out

    def check(self) -> None:
        """Raise MemoryPlanError, with the table and what to change, if the plan does not fit."""
        if self.fits:
            return
        tips = self.advice()
        raise MemoryPlanError(
            f"this configuration needs {self.total / GiB:.1f} GiB per rank but a rank has "
            f"{self.capacity / GiB:.1f} GiB.\n"
            + self.table() + "\nto fit, change one of: "
            + ("; ".join(tips) if tips else "more processes (larger shard groups), bfloat16 weights, a smaller batch")
        )

    def _kwargs(self) -> dict:
        return dict(world_size=self.world_size, shard_group_size=self.shard_group_size, param_dtype=self.param_dtype,
                    sampler=self.sampler, batch_size=self.batch_size, seq_len=self.seq_len,
                    activation_checkpointing=self.activation_checkpointing, batched_chains=self.batched_chains,
                    capacity=self.capacity)


_ALTERNATIVES = [
    (lambda p: f"--shard-group-size {p.shard_group_size}",
     lambda p: [dict(shard_group_size=s) for s in range(p.shard_group_size + 1, p.world_size + 1)
                if p.world_size % s == 0]),
    (lambda p: "--activation-checkpointing",
     lambda p: [] if p.activation_checkpointing else [dict(activation_checkpointing=True)]),
    (lambda p: "--dtype bfloat16",
     lambda p: [] if p.param_dtype == torch.bfloat16 else [dict(param_dtype=torch.bfloat16)]),
    (lambda p: "--max-batched-chains 1", lambda p: [dict(batched_chains=1)] if p.batched_chains > 1 else []),
    (lambda p: f"--batch-size {p.batch_size}",
     lambda p: [dict(batch_size=p.batch_size >> k) for k in range(1, p.batch_size.bit_length())]),
    (lambda p: "--sampler sgld (no RMSProp statistic)",
     lambda p: [] if p.sampler == "sgld" else [dict(sampler="sgld")]),
    (lambda p: f"{p.world_size} processes (torchrun --nproc_per_node, --nnodes)",
     lambda p: [dict(world_size=p.world_size << k, shard_group_size=p.shard_group_size << k) for k in range(1, 5)]),
]


def plan_memory(
    spec: ModelSpec,
    *,
    world_size: int,
    shard_group_size: int | None = None,
    param_dtype: torch.dtype = torch.float32,
    sampler: str = "sgld",
    batch_size: int = 1,
    seq_len: int = 1,
    activation_checkpointing: bool = False,
    batched_chains: int = 1,
    capacity: int | None = None,
    split_batch: bool = True,
    components: list | None = None,
    chains: int = 1,
) -> MemoryPlan | RestrictedMemoryPlan:
    """Per-rank memory for sampling ``spec`` (see module docstring for the terms).

    components: a restricted run (``estimate_restricted_llcs``) of these components x ``chains`` rows on one
    process: a list of ``restricted_plan.ComponentSize`` (``component_sizes(model, "heads")``) or of each
    component's coordinate count; returns a ``RestrictedMemoryPlan``: sparse rows (each row only its
    component's coordinates, w* once) and how many go per call, beside today's full rows
    (``llc_fast.distributed.restricted_plan``)."""
    if components is not None:
        from .restricted_plan import plan_restricted

        if world_size != 1 or (shard_group_size or 1) != 1:
            raise ValueError("a restricted run is planned on one process (world_size=1)")
        return plan_restricted(spec, components, chains=chains, param_dtype=param_dtype, sampler=sampler,
                               batch_size=batch_size, seq_len=seq_len, capacity=capacity,
                               activation_checkpointing=activation_checkpointing)
    s = world_size if shard_group_size is None else shard_group_size
    if world_size % s:
        raise ValueError(f"shard_group_size {s} does not divide world_size {world_size}")
    e = bytes_per(param_dtype)
    pre = sampler != "sgld"
    n = spec.num_params
    plan = MemoryPlan(spec, world_size, s, param_dtype, sampler, batch_size, seq_len, activation_checkpointing,
                      batched_chains if s == 1 else 1, capacity)
    parts = plan.parts
    if s > 1:  # one chain row of this rank's shards; FSDP's local shards are the chain's weights
        nr = spec.shard_numel(s)
        row = row_bytes(nr, param_dtype, pre)
        parts["parameters"] = row["weights"]
        parts["w*"] = nr * e
        parts["statistic"] = row["statistic"]
        parts["gradients"] = row["gradients"]
        biggest = max(spec.block_params, default=0)
        parts["FSDP"] = e * (3 * biggest + 2 * spec.root_params)
        rows = 1
    else:  # the model itself and R chain rows
        rows = plan.batched_chains
        row = row_bytes(n, param_dtype, pre)
        parts["parameters"] = n * e + rows * row["weights"]
        parts["w*"] = n * e
        parts["statistic"] = rows * row["statistic"]
        parts["gradients"] = rows * row["gradients"]
        parts["FSDP"] = 0
    micro = -(-batch_size // s) if (s > 1 and split_batch) else batch_size
    parts["activations"] = rows * activation_bytes(spec, micro, seq_len, e, activation_checkpointing, plan.notes)
    parts["overhead"] = int(FRAGMENTATION * sum(parts.values())) + FIXED_OVERHEAD
    return plan


def activation_bytes(spec: ModelSpec, micro: int, seq_len: int, e: int, checkpointing: bool, notes: list,
                     layers: int | None = None) -> int:
    """Activations of one forward/backward of ``micro`` sequences (module docstring) through the top ``layers``
    blocks (None: all) and the logits."""
    if not (spec.num_layers and spec.hidden_size):
        notes.append("activations not estimated (no transformer blocks recognised); leave room for them")
        return 0
    tokens = micro * seq_len
    h, inter = spec.hidden_size, spec.intermediate_size
    L = spec.num_layers if layers is None else min(layers, spec.num_layers)
    per_layer = tokens * (8 * h + 3 * inter) * e
    blocks = (L * tokens * h * e + per_layer if L else 0) if checkpointing else L * per_layer
    logits = tokens * spec.vocab_size * (2 * e + 8)
    return blocks + logits


def device_capacity(device: torch.device, local_world_size: int = 1) -> int | None:
    """Memory one rank may use: the GPU's free memory, or on CPU this machine's available memory
    divided among its processes (None if unknown)."""
    free, _ = available_bytes(device if device.type == "cuda" else torch.device("cpu"))
    if free is None or device.type == "cuda":
        return free
    return free // max(1, local_world_size)
