"""FSDP units: the submodules that get their own ``fully_shard`` call (one per transformer block).

FSDP2 all-gathers a unit's parameters just before the unit runs and frees them after, so the
unsharded memory at any time is about one or two blocks, not the whole model. Blocks are found
by the model's own declaration where it has one (HuggingFace models list their block classes in
``_no_split_modules``), else as the children of the longest ``nn.ModuleList`` whose children all
share one class (``model.layers``, ``transformer.h``, ...). The root module is the last unit and
holds everything else (embeddings, final norm, output head; tied weights stay together there).
"""
from __future__ import annotations

import functools

from torch import nn


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model`` in forward order ([] if none is recognisable)."""
    names = getattr(model, "_no_split_modules", None)
    if names:
        names = set(names)
        blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
        # keep the outermost matches only (a block class nested in another block)
        inside = {id(sub) for b in blocks for sub in b.modules() if sub is not b}
        blocks = [b for b in blocks if id(b) not in inside]
        if blocks:
            return blocks
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) >= 2 and len({type(c) for c in m}) == 1 and len(m) > len(best):
            if any(p.requires_grad for p in m.parameters()):
                best = list(m)
    return best


def unit_param_counts(model: nn.Module, blocks: list[nn.Module] | None = None) -> tuple[list[int], int]:
    """Trainable floating-point parameters of each block and of the rest (the root unit)."""
    blocks = transformer_blocks(model) if blocks is None else blocks
    seen: set[int] = set()
    counts = []
    for b in blocks:
        n = 0
        for p in b.parameters():
            if id(p) not in seen and p.requires_grad and p.is_floating_point():
                seen.add(id(p))
                n += p.numel()
        counts.append(n)
    root = sum(p.numel() for p in model.parameters()
               if id(p) not in seen and p.requires_grad and p.is_floating_point())
    return counts, root


def enable_activation_checkpointing(blocks: list[nn.Module]) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    The block's ``forward`` is wrapped in ``torch.utils.checkpoint.checkpoint`` (non-reentrant), inside
    the module's hooks, so FSDP's all-gather before the block and its re-gather for the backward pass
    both still happen; only the block inputs are kept between the forward and backward passes.
    Works in eval mode (unlike HuggingFace's gradient checkpointing, which is off unless training).
    """
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if getattr(block, "_llc_fast_checkpointed", False):
            continue
        inner = block.forward
        block.forward = functools.partial(checkpoint, inner, use_reentrant=False)
        block._llc_fast_checkpointed = True

