"""Memory of a restricted run (``estimate_restricted_llcs``): full rows against sparse rows, on one process.

A restricted run samples K components x C chains = T rows. Each row batch ("call") is one batched
forward/backward over its rows. Two ways to hold a row (e = bytes per parameter, e_s = statistic bytes:
4, 8 for float64 weights, 0 for plain SGLD; N = sampled parameters of the model, k = the component's
coordinates):

full rows (today: ``plan_memory(batched_chains=R)``, each row a whole copy of the model)
  shared      the model N*e + w* N*e
  per row     N*(2e + e_s) (weights, gradient, statistic) + activations of the whole network
sparse rows (a row holds only its component's coordinates; w* once)
  shared      the model N*e + w* N*e
  per row     k*(2e + e_s)
              + touched: 2*e*P, the row's own copy of each parameter its component touches (w* with the
                row's coordinates written in, P elements in all) and that copy's gradient, for the pass
              + activations of the suffix: the network from the component's lowest block l up, i.e.
                (L - l) layers and the logits in ``planner``'s activation model (per layer b*T*(8h + 3I)*e,
                or with activation checkpointing (L - l)*b*T*h*e + one layer; logits b*T*V*(2e + 8)).
                Below block l every row computes the same thing from w*: it runs once per call without
                gradients and is not counted. Parameters outside the blocks count as block 0 when they
                come before the first block (embeddings) and as block L after the last (final norm,
                output head); a tied output head is the input embedding, block 0.
  overhead    10 % of the above + 1 GiB, as in ``planner``.

Rows per call. A call runs all its rows from the call's lowest block, so rows are taken in order of
their lowest block, top block first, and each call takes rows while the call still fits ``capacity``;
the call's activations are its rows' count times those of its lowest row. Full rows: the most rows
``plan_memory`` accepts (one batch size for every call). ``all_rows`` is the state of all T rows at
once (what "one buffer per row" costs: weights, or gradients, of every row).

    python -m llc_fast.distributed.restricted_plan --components heads --chains 4 [--model gpt2 ...]
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..state.memory import bytes_per, sparse_rows_bytes
from .planner import FIXED_OVERHEAD, FRAGMENTATION, GPU_80GB, GiB, MemoryPlan, ModelSpec, activation_bytes, \
    model_spec, plan_memory
from .units import transformer_blocks


@dataclass(frozen=True)
class ComponentSize:
    """One component of a restricted run, as the planner sees it."""

    name: str
    numel: int  # the component's coordinates: a sparse row's weights
    touched: int = 0  # elements of the parameters holding them
    layer: int = 0  # the lowest block it touches (0: the whole network runs per row)


def component_sizes(model: nn.Module, components="heads") -> list[ComponentSize]:
    """The components of ``model`` (a standard set such as "heads", or {name: restriction}, as
    ``estimate_restricted_llcs`` takes them) with their coordinates, touched parameters and lowest block.
    The model may be on the meta device."""
    from ..estimators.restricted import resolve_components

    params = dict(model.named_parameters(remove_duplicate=False))
    layer_of = _param_layers(model)
    out = []
    for name, masks in resolve_components(model, components).items():
        masks = {n: None for n in params if params[n].requires_grad} if masks is None else masks
        touched = {id(params[n]): params[n] for n in masks}
        numel = sum(_count(m, params[n]) for n, m in masks.items())
        low = min((layer_of[id(p)] for p in touched.values()), default=0)
        out.append(ComponentSize(name, numel, sum(p.numel() for p in touched.values()), low))
    return out


def _count(mask, p: torch.Tensor) -> int:
    """True elements of a 0/1 mask (None: the whole parameter), without expanding a broadcast mask."""
    if mask is None:
        return p.numel()
    repeat, index = 1, []
    for size, stride in zip(mask.shape, mask.stride()):
        broadcast = stride == 0 and size > 1
        repeat *= size if broadcast else 1
        index.append(slice(0, 1) if broadcast else slice(None))
    return int(mask[tuple(index)].count_nonzero()) * repeat


def _param_layers(model: nn.Module) -> dict[int, int]:
    """{id(parameter): its block}; outside the blocks, 0 before the first block's parameters and L after."""
    blocks = transformer_blocks(model)
    out = {id(p): i for i, b in enumerate(blocks) for p in b.parameters()}
    seen_block = False
    for p in model.parameters():
        if id(p) in out:
            seen_block = True
        else:
            out[id(p)] = len(blocks) if seen_block else 0
    return out


@dataclass
class RestrictedMemoryPlan:
    """Sparse rows of a restricted run on one process, beside the same run with full rows."""

    spec: ModelSpec
    components: list[ComponentSize]
    chains: int
    param_dtype: torch.dtype
    sampler: str
    batch_size: int
    seq_len: int
    activation_checkpointing: bool
    capacity: int | None
    calls: list[int] = field(default_factory=list)  # rows of each call, in order (top block first)
    parts: dict[str, int] = field(default_factory=dict)  # the largest call
    full: MemoryPlan | None = None  # today's full rows, at full_rows_per_call rows (1 if none fit)
    full_rows_per_call: int = 0
    most_rows: tuple[int, int] = (0, 0)  # the most sparse rows of a call of lowest-block rows, of top-block rows
    notes: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return len(self.components) * self.chains

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool:
        return sum(self.calls) == self.rows

    @property
    def full_calls(self) -> int:
        return math.ceil(self.rows / self.full_rows_per_call) if self.full_rows_per_call else 0

    def all_rows(self, sparse: bool = True) -> dict[str, int]:
        """Bytes of the state of all rows at once (weights, gradients, statistic), sparse or full rows."""
        numels = [c.numel if sparse else self.spec.num_params for c in self.components] * self.chains
        out = sparse_rows_bytes(numels, self.spec.num_params, self.param_dtype, self.sampler != "sgld")
        out.pop("w*")
        return out

    def table(self) -> str:
        return format_plan(self)


def plan_restricted(spec: ModelSpec, components: list, *, chains: int = 1, param_dtype=torch.float32,
                    sampler: str = "sgld", batch_size: int = 1, seq_len: int = 1,
                    activation_checkpointing: bool = False, capacity: int | None = None) -> RestrictedMemoryPlan:
    """Plan a restricted run of ``components`` (``ComponentSize``s, or each row's coordinate count: the whole
    network above, nothing touched) x ``chains`` rows with sparse rows, and the same rows as full rows."""
    comps = [c if isinstance(c, ComponentSize) else ComponentSize(f"c{i}", int(c)) for i, c in enumerate(components)]
    if not comps or chains < 1:
        raise ValueError(f"a restricted run needs components and chains >= 1 (got {len(comps)} and {chains})")
    plan = RestrictedMemoryPlan(spec, comps, chains, param_dtype, sampler, batch_size, seq_len,
                                activation_checkpointing, capacity)
    e = bytes_per(param_dtype)
    acts = {c.layer: activation_bytes(spec, batch_size, seq_len, e, activation_checkpointing, plan.notes,
                                      layers=max(0, spec.num_layers - c.layer)) for c in comps}
    plan.notes[:] = sorted(set(plan.notes))

    def call(rows: list[ComponentSize]) -> dict:
        return _call_parts(spec.num_params, rows, acts, param_dtype, sampler != "sgld")

    def fits(rows: list[ComponentSize]) -> bool:
        return capacity is None or sum(call(rows).values()) <= capacity

    rows = sorted((c for c in comps for _ in range(chains)), key=lambda c: -c.layer)
    plan.most_rows = tuple(_longest(lambda n, r=r: fits([r] * n), len(rows)) for r in (rows[-1], rows[0]))
    start = 0
    while start < len(rows):
        stop = start + _longest(lambda n, s=start: fits(rows[s:s + n]), len(rows) - start)
        if stop == start:  # not even one row fits
            break
        plan.calls.append(stop - start)
        plan.parts = max(plan.parts, call(rows[start:stop]), key=lambda p: sum(p.values()))
        start = stop
    plan.parts = plan.parts or call(rows[:1])
    full = dict(world_size=1, param_dtype=param_dtype, sampler=sampler, batch_size=batch_size, seq_len=seq_len,
                activation_checkpointing=activation_checkpointing, capacity=capacity)
    plan.full_rows_per_call = _longest(lambda n: plan_memory(spec, batched_chains=n, **full).fits, plan.rows)
    plan.full = plan_memory(spec, batched_chains=max(1, plan.full_rows_per_call), **full)
    return plan


def _longest(fits, most: int) -> int:
    """The largest n <= most with fits(n) (0 if fits(1) is false); fits(n) must hold for every n below one that
    does (binary search)."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _call_parts(num_params: int, rows: list[ComponentSize], acts: dict, dtype: torch.dtype, pre: bool) -> dict:
    """Bytes of one call of ``rows`` (sorted top block first, so the last row's block is the call's lowest)."""
    state = sparse_rows_bytes([r.numel for r in rows], num_params, dtype, pre)
    parts = {"parameters": num_params * bytes_per(dtype) + state["weights"], "w*": state["w*"],
             "statistic": state["statistic"], "gradients": state["gradients"],
             "touched": 2 * bytes_per(dtype) * sum(r.touched for r in rows),
             "activations": len(rows) * acts[rows[-1].layer]}
    parts["overhead"] = int(FRAGMENTATION * sum(parts.values())) + FIXED_OVERHEAD
    return parts


def _gb(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n < 1000 * GiB else f"{n / GiB / 1024:.2f} TiB"


def format_plan(plan: RestrictedMemoryPlan) -> str:
    """The plan as a table: the run, then full rows beside sparse rows."""
    spec, dtype = plan.spec, str(plan.param_dtype).replace("torch.", "")
    numels = sorted({c.numel for c in plan.components})
    k = f"{numels[0]:,}" if len(numels) == 1 else f"{numels[0]:,}-{numels[-1]:,}"
    cap = "no limit" if plan.capacity is None else f"{plan.capacity / GiB:.0f} GiB"
    head = [f"{spec.name}: {spec.num_params:,} parameters ({dtype}), {len(plan.components)} components x "
            f"{plan.chains} chains = {plan.rows} rows; sampler {plan.sampler}, batch {plan.batch_size} x "
            f"{plan.seq_len} tokens{', activation checkpointing' if plan.activation_checkpointing else ''}; "
            f"one GPU of {cap}",
            f"  {'':<34} {'full rows':>14} {'sparse rows':>14}"]
    full_state, sparse_state = plan.all_rows(False), plan.all_rows(True)
    lo, hi = plan.most_rows
    full_call = plan.full.total if plan.full_rows_per_call else 0
    lines = [("coordinates per row", f"{spec.num_params:,}", k),
             ("one buffer (weights) of all rows", _gb(full_state["weights"]), _gb(sparse_state["weights"])),
             ("  the same in GB (1e9 bytes)", f"{full_state['weights'] / 1e9:,.1f} GB",
              f"{sparse_state['weights'] / 1e9:,.2f} GB"),
             ("state of all rows", _gb(sum(full_state.values())), _gb(sum(sparse_state.values()))),
             ("rows per call (lowest-top block)", str(plan.full_rows_per_call), f"{lo}-{hi}"),
             ("calls for all rows", str(plan.full_calls) if plan.full_rows_per_call else "-",
              str(len(plan.calls)) if plan.fits else "-"),
             ("largest call", _gb(full_call) if full_call else "-", _gb(plan.total) if plan.calls else "-")]
    body = [f"  {a:<34} {b:>14} {c:>14}" for a, b, c in lines]
    parts = ", ".join(f"{n} {_gb(v)}" for n, v in plan.parts.items() if v)
    return "\n".join(head + body + [f"  largest sparse call: {parts}"] + [f"  note: {n}" for n in plan.notes])


#: The models of the README's table: their published sizes, and the weights' dtype the table assumes.
MODELS = {"gpt2": ("GPT-2 small", torch.float32), "pythia-1.4b": ("Pythia-1.4B", torch.float32),
          "llama-2-7b": ("Llama-2-7B", torch.bfloat16)}


def hf_config(model: str):
    """The HuggingFace config of one of ``MODELS`` (published sizes; nothing is downloaded)."""
    import transformers

    if model == "gpt2":
        return transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    if model == "pythia-1.4b":
        return transformers.GPTNeoXConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                          num_attention_heads=16, vocab_size=50304, max_position_embeddings=2048,
                                          rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)
    if model == "llama-2-7b":
        return transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                        max_position_embeddings=4096, tie_word_embeddings=False)
    raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")


def plan_model(model: str, components: str = "heads", chains: int = 4, batch_size: int = 16, seq_len: int = 512,
               sampler: str = "rmsprop_sgld", activation_checkpointing: bool = True,
               capacity: int | None = GPU_80GB, param_dtype: torch.dtype | None = None) -> RestrictedMemoryPlan:
    """The plan of one of ``MODELS``, built on the meta device from its config (the README's table)."""
    from transformers import AutoModelForCausalLM

    name, dtype = MODELS[model]
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(hf_config(model))
    return plan_memory(model_spec(net, name), world_size=1, components=component_sizes(net, components),
                       chains=chains, param_dtype=param_dtype or dtype, sampler=sampler, batch_size=batch_size,
                       seq_len=seq_len, activation_checkpointing=activation_checkpointing, capacity=capacity)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m llc_fast.distributed.restricted_plan",
                                description="Memory of a restricted run: full rows against sparse rows.")
    p.add_argument("--model", choices=sorted(MODELS), action="append", help="(repeatable; default: all)")
    p.add_argument("--components", default="heads", choices=["heads", "layers", "attn-mlp", "embeddings"])
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--sampler", default="rmsprop_sgld", choices=["sgld", "rmsprop_sgld"])
    p.add_argument("--no-activation-checkpointing", action="store_true")
    p.add_argument("--capacity-gib", type=float, default=GPU_80GB / GiB)
    args = p.parse_args(argv)
    for i, model in enumerate(args.model or list(MODELS)):
        plan = plan_model(model, args.components, args.chains, args.batch_size, args.seq_len, args.sampler,
                          not args.no_activation_checkpointing, int(args.capacity_gib * GiB))
        print(("\n" if i else "") + plan.table())
    return 0


if __name__ == "__main__":  # run the package's module, whose classes plan_memory uses, not this __main__ copy
    from llc_fast.distributed.restricted_plan import main as package_main

    raise SystemExit(package_main())
