"""The memory planner of restricted runs: sparse rows (a component's coordinates only, w* once) against full rows,
exact bytes on a tiny GPT-2, GPT-2 small's 144 heads x 4 chains, and the README's table."""
import re
from pathlib import Path

import pytest
import torch

from llc_fast.distributed.planner import FIXED_OVERHEAD, GiB, plan_memory, spec_from_hf_config
from llc_fast.distributed.restricted_plan import ComponentSize, component_sizes, main, plan_model
from llc_fast.state.memory import sparse_rows_bytes

transformers = pytest.importorskip("transformers")

README = Path(__file__).parent.parent / "README.md"


def tiny_gpt2():
    """2 layers, width 16, 2 heads of 8: c_attn [16, 48] (q|k|v), c_proj [16, 16], MLP 64, vocabulary 64."""
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    with torch.device("meta"):
        return transformers.GPT2LMHeadModel(config)


def test_head_sizes_of_a_tiny_gpt2():
    sizes = component_sizes(tiny_gpt2(), "heads")
    assert [c.name for c in sizes] == ["l0h0", "l0h1", "l1h0", "l1h1"]
    # q, k, v columns of c_attn (3 x 8 of 48, 16 rows) + their bias + 8 rows of c_proj (16 wide)
    assert {c.numel for c in sizes} == {3 * 8 * 16 + 3 * 8 + 8 * 16} == {536}
    assert {c.touched for c in sizes} == {16 * 48 + 48 + 16 * 16}  # c_attn weight and bias, c_proj weight
    assert [c.layer for c in sizes] == [0, 0, 1, 1]
    emb = {c.name: c for c in component_sizes(tiny_gpt2(), "embeddings")}
    assert emb["embed"].layer == 0 and emb["embed"].numel == 64 * 16  # the tied head is the input embedding


def test_exact_bytes_of_sparse_rows_on_a_tiny_gpt2():
    model = tiny_gpt2()
    spec = spec_from_hf_config(model.config, "tiny")
    n = spec.num_params
    plan = plan_memory(spec, world_size=1, components=component_sizes(model, "heads"), chains=2,
                       sampler="rmsprop_sgld", batch_size=2, seq_len=4)  # float32, no capacity: one call
    assert plan.rows == 8 and plan.calls == [8] and plan.fits
    tokens, k = 2 * 4, 536
    act_all = 2 * tokens * (8 * 16 + 3 * 64) * 4 + tokens * 64 * (2 * 4 + 8)  # two layers and the logits
    expected = {"parameters": 4 * n + 8 * k * 4, "w*": 4 * n, "statistic": 8 * k * 4, "gradients": 8 * k * 4,
                "touched": 2 * 4 * 8 * 1072, "activations": 8 * act_all}  # the call starts at block 0
    expected["overhead"] = int(0.1 * sum(expected.values())) + FIXED_OVERHEAD
    assert plan.parts == expected
    assert plan.all_rows() == {"weights": 8 * k * 4, "gradients": 8 * k * 4, "statistic": 8 * k * 4}
    assert plan.all_rows(sparse=False) == {"weights": 8 * n * 4, "gradients": 8 * n * 4, "statistic": 8 * n * 4}
    assert sparse_rows_bytes([k] * 8, n, torch.float32, True)["w*"] == 4 * n
    # a row of a block-1 component runs only block 1 and the logits; with checkpointing: block inputs + one layer
    top = ComponentSize("l1h0", k, 1072, layer=1)
    act_top = tokens * (8 * 16 + 3 * 64) * 4 + tokens * 64 * 16
    assert plan_memory(spec, world_size=1, components=[top], batch_size=2, seq_len=4).parts["activations"] == act_top
    ckpt = plan_memory(spec, world_size=1, components=[top], batch_size=2, seq_len=4, activation_checkpointing=True)
    assert ckpt.parts["activations"] == tokens * 16 * 4 + act_top
    assert plan_memory(spec, world_size=1, components=[k], batch_size=2, seq_len=4).parts["activations"] == act_all


def test_rows_per_call_fill_the_capacity():
    model = tiny_gpt2()
    spec = spec_from_hf_config(model.config, "tiny")
    heads = component_sizes(model, "heads")
    kwargs = dict(world_size=1, components=heads, chains=2, batch_size=2, seq_len=4)
    one_call = plan_memory(spec, **kwargs)
    five_low = plan_memory(spec, **{**kwargs, "components": [heads[0]], "chains": 5}).total
    plan = plan_memory(spec, **kwargs, capacity=five_low)
    # a block-0 row: 536 * 8 bytes of state + 2 * 4 * 1072 touched + 28672 of activations = 41536 bytes; a block-1
    # row needs 10240 bytes less activations (one layer fewer), so 6 of them fit where 5 block-0 rows do
    assert plan.most_rows == (5, 6)
    # the 4 block-1 rows go first; the call that takes a block-0 row runs from block 0 for all its rows
    assert plan.calls == [5, 3] and plan.fits and plan.total <= five_low < one_call.total
    assert plan_memory(spec, **kwargs, capacity=five_low - 1).most_rows[0] == 4
    none = plan_memory(spec, **kwargs, capacity=FIXED_OVERHEAD)
    assert not none.fits and none.calls == [] and none.most_rows == (0, 0) and none.full_rows_per_call == 0
    with pytest.raises(ValueError, match="one process"):
        plan_memory(spec, world_size=2, components=heads)


def test_full_rows_are_todays_model():
    model = tiny_gpt2()
    spec = spec_from_hf_config(model.config, "tiny")
    common = dict(world_size=1, param_dtype=torch.float32, sampler="rmsprop_sgld", batch_size=2, seq_len=4)
    cap = plan_memory(spec, batched_chains=5, **common).total  # today's plan: 5 full rows fit exactly
    plan = plan_memory(spec, components=component_sizes(model, "heads"), chains=2, capacity=cap, **common)
    assert plan.full_rows_per_call == 5 and plan.full_calls == 2
    assert plan.full.parts == plan_memory(spec, batched_chains=5, capacity=cap, **common).parts
    assert not plan_memory(spec, batched_chains=6, capacity=cap, **common).fits


@pytest.fixture(scope="module")
def gpt2_heads():
    return plan_model("gpt2")  # 144 heads x 4 chains, RMSProp-SGLD, float32, batch 16 x 512, on 78 GiB


def test_gpt2_small_all_heads(gpt2_heads):
    plan = gpt2_heads
    assert plan.spec.num_params == 124_439_808 and len(plan.components) == 144 and plan.rows == 576
    assert {c.numel for c in plan.components} == {768 * 3 * 64 + 3 * 64 + 64 * 768} == {196_800}
    full, sparse = plan.all_rows(sparse=False), plan.all_rows(sparse=True)
    # the issue: with full rows all heads need ~287 GB per buffer (576 rows of 124M float32 weights)
    assert full["weights"] == 576 * 124_439_808 * 4 and round(full["weights"] / 1e9) == 287
    assert sparse["weights"] == 576 * 196_800 * 4 < 0.5e9 and sum(sparse.values()) < 1.3 * GiB
    assert plan.fits and sum(plan.calls) == 576 and plan.total <= plan.capacity
    assert plan.full_rows_per_call == 8 and plan.most_rows == (10, 10)  # the logits bound both (b*T*V*16 bytes)
    assert plan.parts["activations"] > 0.85 * plan.total


def readme_block() -> tuple[str, str]:
    """(command, output) of the README section "Planning an all-heads study"."""
    text = README.read_text()
    section = text[text.index("## Planning an all-heads study"):]
    block = re.search(r"```text\n\$ (.+?)\n(.*?)```", section, re.S)
    return block[1], block[2].rstrip("\n")


def test_readme_table_is_what_the_planner_says(capsys):
    command, output = readme_block()
    prefix = "python -m llc_fast.distributed.restricted_plan "
    assert command.startswith(prefix)
    assert main(command[len(prefix):].split()) == 0
    assert capsys.readouterr().out.rstrip("\n") == output


def test_row_counts_without_a_transformer_and_refusals():
    from torch import nn

    from llc_fast.distributed.planner import model_spec

    spec = model_spec(nn.Sequential(nn.Linear(3, 7), nn.Linear(7, 1)))
    plan = plan_memory(spec, world_size=1, components=[21, 8], chains=3, sampler="rmsprop_sgld")
    assert plan.rows == 6 and plan.calls == [6] and plan.parts["statistic"] == 3 * (21 + 8) * 4
    assert plan.parts["activations"] == 0 and "not estimated" in plan.table()
    with pytest.raises(ValueError, match="components and chains"):
        plan_memory(spec, world_size=1, components=[], chains=3)
