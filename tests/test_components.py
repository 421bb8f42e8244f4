"""Standard components (layers, heads, attention vs MLP, embeddings) as weight restrictions, for the three head
layouts: GPT-2 (fused Q|K|V), GPT-NeoX (interleaved per head) and Llama (separate projections, grouped KV)."""
import pytest
import torch

from llc_fast.integrations import components as comp

transformers = pytest.importorskip("transformers")


def gpt2():
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=8, n_head=2, vocab_size=20,
                                                                 n_positions=8))


def neox():
    torch.manual_seed(0)
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=8, num_attention_heads=2, intermediate_size=16, vocab_size=20,
        max_position_embeddings=8))


def llama():
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=8, num_attention_heads=4, num_key_value_heads=2, intermediate_size=16,
        vocab_size=20, max_position_embeddings=8))


def _count(mask) -> int:
    return sum(int(m.sum()) for m in mask.values())


@pytest.mark.parametrize("build", [gpt2, neox, llama])
def test_heads_partition_the_query_and_output_weights(build):
    model = build()
    cfg = model.config
    heads = comp.heads(model)
    assert list(heads) == [f"l{i}h{h}" for i in range(2) for h in range(cfg.num_attention_heads)]
    for layer in range(2):
        masks = [heads[f"l{layer}h{h}"] for h in range(cfg.num_attention_heads)]
        names = set(masks[0])
        assert all(set(m) == names for m in masks)
        for name in names:  # every element of a head-sliced weight belongs to some head
            union = torch.stack([m[name] for m in masks]).any(0)
            assert union.all(), name
        d = cfg.hidden_size // cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        if kv == cfg.num_attention_heads:  # no grouping: the heads are disjoint and equal in size
            total = torch.stack([torch.cat([m[n].reshape(-1) for n in sorted(names)]) for m in masks])
            assert (total.sum(0) == 1).all()
            assert len({_count(m) for m in masks}) == 1
        else:  # grouped KV: a group's heads share their key/value rows
            a, b = masks[0], masks[1]
            shared = [n for n in names if (a[n] & b[n]).any()]
            assert shared and all("k_proj" in n or "v_proj" in n for n in shared)
    assert _count(heads["l0h0"]) > 0


@pytest.mark.parametrize("build", [gpt2, neox, llama])
def test_layers_attn_mlp_and_embeddings(build):
    model = build()
    names = [n for n, _ in model.named_parameters()]
    layers = comp.layers(model)
    assert list(layers) == ["l0", "l1"]
    assert set(layers["l0"]).isdisjoint(layers["l1"]) and all(m is None for m in layers["l0"].values())
    parts = comp.attn_mlp(model)
    assert {"l0 attn", "l0 mlp", "l1 attn", "l1 mlp"} <= set(parts)
    assert set(parts["l0 attn"]) | set(parts["l0 mlp"]) <= set(layers["l0"])
    assert set(parts["l0 attn"]).isdisjoint(parts["l0 mlp"])
    emb = comp.embeddings(model)
    assert set(emb["embed"]) <= set(names)
    s = comp.standard(model, "layers")
    assert list(s)[0] == "full" and s["full"] is None
    with pytest.raises(ValueError, match="components must be one of"):
        comp.standard(model, "neurons")


def test_heads_need_a_huggingface_model():
    with pytest.raises(ValueError, match="HuggingFace"):
        comp.heads(torch.nn.Sequential(torch.nn.Linear(2, 2)))
