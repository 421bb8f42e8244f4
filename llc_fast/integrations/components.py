"""Components of a model as weight restrictions (``estimate_llc``'s ``mask``): layers, attention heads,
attention vs MLP, embeddings; and ``create_param_masks``, devinterp 2.x's restriction strings.

``layers(model)``, ``heads(model)``, ``attn_mlp(model)``, ``embeddings(model)`` and ``standard(model, kind)``
return {component name: restriction}, ready for ``estimate_over_checkpoints(components=...)`` or one
``estimate_llc(mask=...)`` per component. A restriction maps parameter names to 0/1 (bool) tensors, or to
None for a whole parameter.

``create_param_masks``: devinterp 2.x's weight-restriction strings, for common transformer layouts.

Supported strings: "full", "embed", "unembed", "l<i>", "l<i> attn", "l<i> mlp", "l<i>h<j>" (one attention
head), "l<i>g<j>" (one group of query heads sharing a key/value head), a parameter name, or a list of
these (union). Layers are found as the largest ``nn.ModuleList`` of blocks; "attn" / "mlp" are the
block's parameters under a submodule named attn/attention/self_attn/... or mlp/feed_forward/ffn. Head
masks know three layouts: GPT-2 (fused c_attn, Q|K|V concatenated), GPT-NeoX (fused query_key_value,
interleaved per head) and separate q_proj/k_proj/v_proj/o_proj (Llama, Mistral, Qwen, ... with GQA).

Difference from devinterp: with tied input/output embeddings (GPT-2), "unembed" selects the tied
parameter (devinterp's name lookup finds no ``lm_head.weight`` and returns an empty restriction).
"""
from __future__ import annotations

import re

import torch
from torch import nn

ParamMasks = dict  # param name -> bool mask tensor, or None for the whole parameter

_ATTN = {"attn", "attention", "self_attn", "self_attention", "attn_layer"}
_MLP = {"mlp", "feed_forward", "ffn", "ff"}


def create_param_masks(model: nn.Module, restriction: str | list[str]) -> ParamMasks:
    """Parameter masks for a devinterp restriction string (or a list of them, merged by union)."""
    if not isinstance(restriction, (str, list)):
        raise TypeError(f"restriction must be a str or list[str], got {type(restriction).__name__}")
    if isinstance(restriction, list):
        if "full" in restriction:
            raise ValueError("Cannot combine 'full' with other restrictions.")
        return _merge([create_param_masks(model, r) for r in restriction])
    params = dict(model.named_parameters())
    r = restriction.strip()
    if r == "full":
        return {name: None for name in params}
    low = r.lower()
    if low in ("embed", "unembed"):
        return _embedding(model, params, low)
    m = re.fullmatch(r"l(\d+)\s*([hg])(\d+)", low)
    if m:
        return _heads(model, params, int(m[1]), m[2], int(m[3]))
    m = re.fullmatch(r"l(\d+)(?:\s+(attn|mlp))?", low)
    if m:
        prefix = _layer_prefix(model, params, int(m[1]))
        names = [n for n in params if n.startswith(prefix)]
        if m[2]:
            kinds = _ATTN if m[2] == "attn" else _MLP
            names = [n for n in names if set(n[len(prefix):].split(".")[:-1]) & kinds]
        return {n: None for n in names}
    if r in params:
        return {r: None}
    raise ValueError(
        f"Unknown restriction '{restriction}'. Valid patterns: 'full', 'l0', 'l0h1', 'l0g0', 'l0 attn', 'l0 mlp', "
        "'embed', 'unembed', or a direct parameter name.")


def _merge(masks_list: list[ParamMasks]) -> ParamMasks:
    out: ParamMasks = {}
    for masks in masks_list:
        for name, m in masks.items():
            if name not in out:
                out[name] = m
            elif out[name] is None or m is None:
                out[name] = None
            else:
                out[name] = torch.logical_or(out[name], m)
    return out


def _name_of(params: dict, tensor: torch.Tensor) -> str | None:
    return next((n for n, p in params.items() if p is tensor), None)


def _embedding(model: nn.Module, params: dict, which: str) -> ParamMasks:
    getter = getattr(model, "get_input_embeddings" if which == "embed" else "get_output_embeddings", None)
    module = getter() if callable(getter) else None
    if module is None and which == "embed":
        module = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if module is None or getattr(module, "weight", None) is None:
        raise ValueError(f"cannot find the {which}ding of {type(model).__name__}; pass the parameter name instead")
    name = _name_of(params, module.weight)
    return {} if name is None else {name: None}


def _blocks(model: nn.Module) -> str:
    best, best_size = None, -1
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(c) for c in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = name, size
    if best is None:
        raise ValueError(f"cannot find the layers (an nn.ModuleList of blocks) of {type(model).__name__}")
    return best


def _layer_prefix(model: nn.Module, params: dict, layer: int) -> str:
    base = _blocks(model)
    n_layers = len(model.get_submodule(base))
    if layer >= n_layers:
        raise ValueError(f"Layer {layer} out of range (model has {n_layers} layers).")
    return f"{base}.{layer}."


def _heads(model: nn.Module, params: dict, layer: int, kind: str, index: int) -> ParamMasks:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_attention_heads"):
        raise ValueError("head restrictions need a HuggingFace model (config.num_attention_heads)")
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    prefix = _layer_prefix(model, params, layer)
    if kind == "h":
        if index >= n_heads:
            raise ValueError(f"Head {index} out of range (model has {n_heads} heads).")
        q_heads, kv_heads = [index], [index * n_kv // n_heads]
    else:
        if index >= n_kv:
            raise ValueError(f"Group {index} out of range (model has {n_kv} KV heads/groups).")
        per = n_heads // n_kv
        q_heads, kv_heads = list(range(index * per, (index + 1) * per)), [index]
    layouts = {  # parameter suffix -> (layout of the sliced axis, sliced axis of a matrix)
        "attn.c_attn.weight": ("concat", 1), "attn.c_attn.bias": ("concat", 0), "attn.c_proj.weight": ("q", 0),
        "attention.query_key_value.weight": ("interleaved", 0), "attention.query_key_value.bias": ("interleaved", 0),
        "attention.dense.weight": ("q", 1),
        "q_proj.weight": ("q", 0), "q_proj.bias": ("q", 0), "k_proj.weight": ("kv", 0), "k_proj.bias": ("kv", 0),
        "v_proj.weight": ("kv", 0), "v_proj.bias": ("kv", 0), "o_proj.weight": ("q", 1),
    }
    masks: ParamMasks = {}
    for name, p in params.items():
        if not name.startswith(prefix):
            continue
        spec = next((v for k, v in layouts.items() if name[len(prefix):].endswith(k)), None)
        if spec is None:
            continue
        layout, dim = spec
        dim = 0 if p.dim() == 1 else dim
        m = torch.zeros(p.shape[dim], dtype=torch.bool)
        if layout == "concat":
            q, kv = m.split([n_heads * hd, p.shape[dim] - n_heads * hd])
            q.view(n_heads, hd)[q_heads] = True
            kv.view(2, n_kv, hd)[:, kv_heads] = True
        elif layout == "interleaved":
            m.view(n_heads, -1)[q_heads] = True
        else:
            m.view(n_heads if layout == "q" else n_kv, -1)[q_heads if layout == "q" else kv_heads] = True
        if p.dim() > 1:
            shape = [1] * p.dim()
            shape[dim] = -1
            m = m.view(*shape).expand_as(p)
        masks[name] = m
    if not masks:
        raise ValueError(
            f"no attention parameters of a known layout in layer {layer} of {type(model).__name__}; head "
            "restrictions support GPT-2, GPT-NeoX and q_proj/k_proj/v_proj/o_proj models")
    return masks


def _num_layers(model: nn.Module) -> int:
    return len(model.get_submodule(_blocks(model)))


def layers(model: nn.Module) -> dict[str, ParamMasks]:
    """{"l0": ..., "l1": ...}: every transformer block's parameters."""
    return {f"l{i}": create_param_masks(model, f"l{i}") for i in range(_num_layers(model))}


def attn_mlp(model: nn.Module) -> dict[str, ParamMasks]:
    """{"l0 attn", "l0 mlp", ...}: the attention and the MLP parameters of every block."""
    out = {}
    for i in range(_num_layers(model)):
        for part in ("attn", "mlp"):
            masks = create_param_masks(model, f"l{i} {part}")
            if masks:
                out[f"l{i} {part}"] = masks
    return out


def heads(model: nn.Module) -> dict[str, ParamMasks]:
    """{"l0h0", "l0h1", ...}: every attention head (its query, key, value and output weights; with grouped
    key/value heads the heads of a group share their key/value rows, so their components overlap)."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_attention_heads"):
        raise ValueError("head components need a HuggingFace model (config.num_attention_heads)")
    return {f"l{i}h{h}": create_param_masks(model, f"l{i}h{h}")
            for i in range(_num_layers(model)) for h in range(cfg.num_attention_heads)}


def embeddings(model: nn.Module) -> dict[str, ParamMasks]:
    """{"embed": ..., "unembed": ...} (one entry when they are tied)."""
    out = {"embed": create_param_masks(model, "embed")}
    try:
        unembed = create_param_masks(model, "unembed")
    except ValueError:
        return out
    if unembed and unembed != out["embed"]:
        out["unembed"] = unembed
    return out


STANDARD = {"layers": layers, "heads": heads, "attn-mlp": attn_mlp, "embeddings": embeddings}


def standard(model: nn.Module, kind: str, full: bool = True) -> dict:
    """The components of one ``kind`` ("layers", "heads", "attn-mlp", "embeddings"), with "full" (no restriction)
    first when ``full``."""
    if kind not in STANDARD:
        raise ValueError(f"components must be one of {sorted(STANDARD)}, got {kind!r}")
    out = {"full": None} if full else {}
    out.update(STANDARD[kind](model))
    return out
