"""The memory planner: 7B-class models on 8 x 80 GB (built on the meta device), and refusals."""
import pytest
import torch

from llc_fast.distributed.planner import GPU_80GB, GiB, MemoryPlanError, model_spec, plan_memory, spec_from_hf_config

transformers = pytest.importorskip("transformers")

# Sampling workload of the published 6.9B runs (Urdshals et al. 2025): batch 32 of 2048-token rows,
# here with the RMSProp sampler (its statistic is the largest state), bf16 weights, activation checkpointing.
WORKLOAD = dict(param_dtype=torch.bfloat16, sampler="rmsprop_sgld", batch_size=32, seq_len=2048,
                activation_checkpointing=True, capacity=GPU_80GB)


def llama_2_7b():
    return transformers.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                    max_position_embeddings=4096, tie_word_embeddings=False)


def pythia_6_9b():
    return transformers.GPTNeoXConfig(hidden_size=4096, intermediate_size=16384, num_hidden_layers=32,
                                      num_attention_heads=32, vocab_size=50432, max_position_embeddings=2048,
                                      rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)


@pytest.mark.parametrize("name, config, num_params", [("Llama-2-7B", llama_2_7b, 6_738_415_616),
                                                      ("Pythia-6.9B", pythia_6_9b, 6_857_302_016)])
def test_7b_models_sample_on_8x80gb_with_4_chains_in_flight(name, config, num_params, capsys):
    spec = spec_from_hf_config(config(), name)  # built on the meta device: no memory
    assert spec.num_params == num_params
    assert len(spec.block_params) == 32 and spec.root_params == num_params - sum(spec.block_params)
    plans = {s: plan_memory(spec, world_size=8, shard_group_size=s, **WORKLOAD) for s in (1, 2, 4, 8)}
    with capsys.disabled():
        print(f"\n{name} on 8 x 80 GB (usable {GPU_80GB / GiB:.0f} GiB each):")
        for plan in plans.values():
            print(plan.table())
    assert plans[2].fits and plans[2].chains_in_flight == 4
    assert max(p.chains_in_flight for p in plans.values() if p.fits) >= 4
    assert not plans[1].fits  # eight whole models with their chain state do not fit in 80 GB each
    # the sharded states shrink as 1/S; the per-rank shard is rank 0's (ceil rows)
    assert plans[8].parts["w*"] == spec.shard_numel(8) * 2 >= num_params * 2 // 8
    assert plans[2].parts["statistic"] == 2 * plans[2].parts["w*"]  # float32 statistic for bf16 weights


def test_refuses_a_configuration_that_does_not_fit_and_says_what_to_change():
    spec = spec_from_hf_config(llama_2_7b(), "Llama-2-7B")
    plan = plan_memory(spec, world_size=8, shard_group_size=1, **WORKLOAD)  # 8 whole models
    with pytest.raises(MemoryPlanError) as err:
        plan.check()
    message = str(err.value)
    assert "GiB per rank" in message and "DOES NOT FIT" in message
    assert "--shard-group-size 2" in message  # the smallest shard group that fits, with its numbers
    fp32_one_gpu = plan_memory(spec, world_size=1, param_dtype=torch.float32, sampler="sgld", batch_size=8,
                               seq_len=2048, capacity=GPU_80GB)
    with pytest.raises(MemoryPlanError, match="processes"):
        fp32_one_gpu.check()


def test_small_model_spec_and_unchecked_capacity():
    from torch import nn

    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64, n_positions=16)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    spec = model_spec(model)
    assert spec.num_params == sum(p.numel() for p in model.parameters())  # tied embedding counted once
    assert len(spec.block_params) == 2 and (spec.hidden_size, spec.intermediate_size, spec.vocab_size) == (16, 64, 64)
    plan = plan_memory(spec, world_size=2, batch_size=4, seq_len=16)
    assert plan.fits and plan.capacity is None and plan.parts["activations"] > 0
    mlp = model_spec(nn.Sequential(nn.Linear(3, 7), nn.Linear(7, 1)))
    assert mlp.shard_numel(2) == 4 * 3 + 4 + 1 * 7 + 1  # rank 0: ceil(rows / 2) rows of each parameter
    assert "not estimated" in plan_memory(mlp, world_size=2).table()
