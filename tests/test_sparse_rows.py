"""Sparse rows of a restricted run (state/sparse.py, chains/sparse.py, chains/sparse_setup.py): each component's
rows hold only its coordinates, groups of components run in one nested vmap, the update runs on the components'
runs of coordinates keyed by their global index. Every component's chain must be the chain of
``estimate_llc(mask=component)`` with the same seed, and the full-row restricted run's, to the golden traces'
tolerance (32 float32 ulps of the loss scale; in practice bit for bit on these models)."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import llc_fast
from llc_fast.chains.engines import VmapEngine
from llc_fast.chains.runner import run_chains
from llc_fast.chains.schedule import ChainHyper, Schedule
from llc_fast.chains.settings import LoopSettings
from llc_fast.chains.sparse import SparseVmapEngine
from llc_fast.chains.sparse_setup import SparseRowsWarning
from llc_fast.integrations.components import create_param_masks, heads
from llc_fast.kernels.dispatch import select_backend
from llc_fast.kernels.update_spec import SamplerSettings
from llc_fast.state.flat import FlatLayout, FlatState
from llc_fast.state.sparse import SparseRowState, coordinate_runs

from conftest import gpt2_case, mlp_case

LOSS_ULPS, U = 32, 2.0 ** -24  # tests/test_golden_traces.py's tolerance
KW = dict(lr=1e-4, nbeta=10.0, gamma=100.0, num_chains=2, num_draws=5, num_burnin_steps=3, seed=3, progress=False)


def assert_same_chains(a, b):
    """Loss traces within the golden traces' tolerance."""
    scale = max(float(np.abs(a.loss_trace).max()), abs(a.init_loss))
    np.testing.assert_allclose(a.loss_trace, b.loss_trace, rtol=0, atol=LOSS_ULPS * U * scale)
    assert a.init_loss == b.init_loss


@pytest.fixture(scope="module")
def gpt2_heads():
    model, loader, loss_fn = gpt2_case()
    model.eval()
    sparse = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, "heads", include_full=True, **KW)
    full = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, "heads", include_full=True, sparse_rows="off",
                                             **KW)
    return model, loader, loss_fn, sparse, full


def test_heads_and_full_in_one_run_equal_the_full_row_run(gpt2_heads):
    _, _, _, sparse, full = gpt2_heads
    assert sparse.facts["row_storage"] == "sparse" and full.facts["row_storage"] == "full"
    assert full.facts["row_storage_note"] == "sparse_rows='off'"
    assert sparse.names == full.names == ["full", "l0h0", "l0h1", "l1h0", "l1h1"]
    for name in sparse:
        assert_same_chains(sparse[name], full[name])
        assert sparse[name].config["num_params"] == full[name].config["num_params"]


def test_a_head_row_is_over_ten_times_smaller(gpt2_heads):
    _, _, _, sparse, full = gpt2_heads
    per_row = sparse.facts["state_bytes_per_row"]
    assert per_row[0] == sparse.facts["full_row_bytes"] == full.facts["state_bytes_per_row"][1]
    assert all(sparse.facts["full_row_bytes"] >= 10 * b for b in per_row[1:])


def test_each_head_equals_estimate_llc_with_its_mask(gpt2_heads):
    model, loader, loss_fn, sparse, _ = gpt2_heads
    for name in ("l0h1", "l1h0"):
        alone = llc_fast.estimate_llc(model, loader, loss_fn, mask=heads(model)[name], **KW)
        assert_same_chains(alone, sparse[name])


def test_a_component_spanning_two_layers_and_a_tied_one():
    model, loader, loss_fn = gpt2_case()
    model.eval()
    comps = {"two": create_param_masks(model, ["l0h0", "l1h1"]),
             "span": ["transformer.h.0.mlp.c_fc.weight", "transformer.h.1.ln_2.*"],
             "tied": ["lm_head.weight"]}  # the alias of transformer.wte.weight: sampled tied, under both names
    res = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, **KW)
    assert res.facts["row_storage"] == "sparse"
    for name, spec in comps.items():
        mask = spec if isinstance(spec, dict) else {n: None for n in res[name].config["mask"]}
        alone = llc_fast.estimate_llc(model, loader, loss_fn, mask=mask, **KW)
        assert_same_chains(alone, res[name])
    assert res["tied"].config["mask"] == ["transformer.wte.weight"]
    assert model.lm_head.weight is model.transformer.wte.weight


def _loop(k: int, chains: int, sampler: str) -> LoopSettings:
    hyper = ChainHyper(*(torch.full((k * chains,), v, dtype=torch.float64) for v in (1e-3, 30.0, 10.0)),
                       chain_ids=torch.arange(chains).repeat(k), component=torch.arange(k).repeat_interleave(chains))
    return LoopSettings(hyper=hyper, update=SamplerSettings(sampler=sampler), seed=7,
                        schedule=Schedule(num_draws=6, num_burnin_steps=4, num_steps_bw_draws=2))


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
@pytest.mark.parametrize("sampler", ["sgld", "rmsprop_sgld_bc"])
def test_component_weights_bit_for_bit_against_full_rows(backend, sampler):
    """The loop on both states: every component's weights (and RMSProp statistic) equal the full-row run's at its
    coordinates, and the full-row run's other weights never left w*."""
    if backend == "triton":
        pytest.importorskip("triton")
    model, loader, loss_fn = mlp_case()
    layout = FlatLayout.for_sampling(model)
    comps = [{"0.weight": (torch.rand(16, 6, generator=torch.Generator().manual_seed(0)) > 0.5).float()},
             {"0.bias": None, "2.weight": None}, None, {"2.bias": None}]
    C, loop = 2, _loop(len(comps), 2, sampler)
    try:
        back = select_backend(backend, torch.device("cpu"))
    except Exception as e:  # pragma: no cover - no compiler / no triton here
        pytest.skip(f"backend {backend} cannot run here: {e}")
    full = FlatState(layout, len(comps) * C, device="cpu", preconditioned=loop.update.preconditioned,
                     initial_statistic=loop.update.initial_statistic, components=comps)
    sparse = SparseRowState(layout, comps, C, device="cpu", preconditioned=loop.update.preconditioned,
                            initial_statistic=loop.update.initial_statistic)
    traces = [run_chains(engine, state, loader, loop, backend=back, device=torch.device("cpu"), init_loss=1.0)
              for engine, state in ((VmapEngine(model, full, loss_fn), full),
                                    (SparseVmapEngine(model, sparse, loss_fn), sparse))]
    np.testing.assert_array_equal(traces[0].loss_trace, traces[1].loss_trace)
    for k, c in enumerate(sparse.components):
        rows = full.w[k * C:(k + 1) * C]
        if c is None:
            assert torch.equal(rows, sparse.packed(k))
            continue
        assert torch.equal(rows[:, c.index], sparse.packed(k))
        outside = torch.ones(layout.numel, dtype=torch.bool)
        outside[c.index] = False
        assert torch.equal(rows[:, outside], full.w_star[outside].expand(C, -1))
        if c.stat is not None:
            assert torch.equal(full.stat[k * C:(k + 1) * C][:, c.index], c.stat)
    assert sparse.bytes_per_row()[2] == layout.numel * (8 + (4 if loop.update.preconditioned else 0))


def test_components_of_unequal_size_in_one_group_are_padded_without_changing_a_chain():
    """Two components of one tensor, of unequal sizes, run in one call: the shorter one is padded with its first
    coordinate (written again with its own value), so its chains equal the full-row run's bit for bit."""
    model, loader, loss_fn = mlp_case()
    layout = FlatLayout.for_sampling(model)
    g = torch.Generator().manual_seed(1)
    comps = [{"0.weight": (torch.rand(16, 6, generator=g) > 0.2).float()},
             {"0.weight": (torch.rand(16, 6, generator=g) > 0.8).float()}]
    C, loop = 2, _loop(len(comps), 2, "sgld")
    full = FlatState(layout, len(comps) * C, device="cpu", preconditioned=False, components=comps)
    sparse = SparseRowState(layout, comps, C, device="cpu", preconditioned=False)
    engine = SparseVmapEngine(model, sparse, loss_fn)
    (group,) = engine.groups
    assert group.lengths[0] > group.lengths[1] and group.numel == group.base.numel()
    back = select_backend("torch", torch.device("cpu"))
    traces = [run_chains(e, state, loader, loop, backend=back, device=torch.device("cpu"), init_loss=1.0)
              for e, state in ((VmapEngine(model, full, loss_fn), full), (engine, sparse))]
    np.testing.assert_array_equal(traces[0].loss_trace, traces[1].loss_trace)
    for k, c in enumerate(sparse.components):
        assert torch.equal(full.w[k * C:(k + 1) * C][:, c.index], sparse.packed(k))


def test_a_subset_of_every_components_chains_runs_on_sparse_rows():
    """What a rank of a torchrun run split by chains holds (``distributed.rows``): chains 1 and 3 of every component.
    Each component's rows hold the same chain ids, so sparse rows apply, and the rows equal those rows of the whole
    run; rows whose components hold other chains (or another order) stay on full rows, saying why."""
    from llc_fast.api import components_config
    from llc_fast.chains.sparse_setup import tiled_rows
    from llc_fast.estimators.sampling import sample_local

    model, loader, loss_fn = mlp_case()
    config = components_config("estimate_restricted_llcs", model, {"a": ["0.*"], "b": ["2.weight"]}, False,
                               dict(KW, num_chains=4))
    whole = sample_local(model, loader, loss_fn, config)
    part = sample_local(model, loader, loss_fn, config, chains=[1, 3, 5, 7])
    assert whole.facts["row_storage"] == part.facts["row_storage"] == "sparse"
    np.testing.assert_array_equal(part.trace.loss_trace, whole.trace.loss_trace[[1, 3, 5, 7]])
    np.testing.assert_array_equal(part.trace.burnin_loss_trace, whole.trace.burnin_loss_trace[[1, 3, 5, 7]])
    odd = sample_local(model, loader, loss_fn, config, chains=[1, 3, 7, 5])
    assert odd.facts["row_storage"] == "full" and "the same chains" in odd.facts["row_storage_note"]
    np.testing.assert_allclose(odd.trace.loss_trace, whole.trace.loss_trace[[1, 3, 7, 5]], rtol=0, atol=1e-6)
    hyper = config.hyper
    assert tiled_rows(hyper, 2) and tiled_rows(hyper.rows([1, 3, 5, 7]), 2) and tiled_rows(hyper.rows([2, 6]), 2)
    for rows in ([1, 3, 5], [5, 7, 1, 3], [1, 2, 5, 7], [1, 3, 7, 5]):
        assert not tiled_rows(hyper.rows(rows), 2), rows


def test_coordinate_runs_are_keyed_by_their_global_start():
    assert coordinate_runs(torch.tensor([3, 4, 5, 9, 11, 12])) == [(0, 3, 3), (3, 1, 9), (4, 2, 11)]
    assert coordinate_runs(torch.tensor([], dtype=torch.int64)) == []


class Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.b(self.drop(torch.tanh(self.a(x))))


class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x):
        return self.b(self.norm(self.a(x)))


class ItemModel(nn.Sequential):
    """A forward vmap cannot batch (.item() of a batched value)."""

    def forward(self, x):
        out = super().forward(x)
        return out * (1.0 if out.sum().item() > -1e9 else 0.0)


def _mlp_data():
    _, loader, loss_fn = mlp_case()
    return loader, loss_fn


@pytest.mark.parametrize("make,why", [(Dropout, "dropout is active.*model.eval"),
                                      (Normed, "BatchNorm.*train mode.*model.eval")])
def test_train_mode_randomness_and_batchnorm_are_refused_or_run_on_full_rows(make, why):
    loader, loss_fn = _mlp_data()
    torch.manual_seed(0)
    model = make()
    comps = {"a": ["a.*"]}
    with pytest.raises(ValueError, match=f"sparse_rows='on' cannot run.*{why}"):
        llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, sparse_rows="on", **KW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, **KW)
    assert res.facts["row_storage"] == "full" and "model.eval()" in res.facts["row_storage_note"]
    model.eval()  # then sparse rows apply, and give the full-row chains
    sparse = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, **KW)
    full = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, sparse_rows="off", **KW)
    assert sparse.facts["row_storage"] == "sparse"
    assert_same_chains(sparse["a"], full["a"])


def test_a_model_vmap_cannot_batch_falls_back_with_a_warning():
    loader, loss_fn = _mlp_data()
    torch.manual_seed(0)
    model = ItemModel(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.warns(SparseRowsWarning, match="full rows instead of sparse rows: the nested vmap failed"):
        res = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, {"a": ["0.*"]},
                                                **dict(KW, chain_batching="auto"))
    assert res.facts["row_storage"] == "full" and "nested vmap failed" in res.facts["row_storage_note"]


@pytest.mark.parametrize("options,match", [
    (dict(sparse_rows="maybe"), "sparse_rows"),
    (dict(sparse_rows="on", chain_batching="sequential"), "chain_batching='sequential'"),
    (dict(sparse_rows="on", mala_every=2), "mala_every"),
])
def test_bad_inputs(options, match):
    model, loader, loss_fn = mlp_case()
    with pytest.raises(ValueError, match=match):
        llc_fast.estimate_restricted_llcs(model, loader, loss_fn, {"a": ["0.*"]}, **dict(KW, **options))


def test_bad_state_arguments():
    model, _, _ = mlp_case()
    layout = FlatLayout.for_sampling(model)
    with pytest.raises(ValueError, match="chains must be a positive int"):
        SparseRowState(layout, [None], 0, device="cpu", preconditioned=False)
    with pytest.raises(ValueError, match="at least one component"):
        SparseRowState(layout, [], 2, device="cpu", preconditioned=False)
    with pytest.raises(ValueError, match="the mask samples nothing"):
        SparseRowState(layout, [{"0.bias": torch.zeros(16)}], 2, device="cpu", preconditioned=False)
    state = SparseRowState(layout, [{"0.bias": None}], 2, device="cpu", preconditioned=False)
    with pytest.raises(ValueError, match="one row batch"):
        state.segments(1, None)


def test_checkpoint_and_resume_of_a_sparse_run(tmp_path):
    model, loader, loss_fn = mlp_case()
    kw = dict(KW, lr=1e-3, sampler="rmsprop_sgld", num_draws=6)
    comps, ck = {"a": ["0.weight"], "b": ["2.*"]}, tmp_path / "run.ckpt"
    first = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, include_full=True, checkpoint=str(ck),
                                              checkpoint_every=4, **kw)
    again = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, include_full=True, resume=str(ck), **kw)
    assert first.facts["row_storage"] == again.facts["row_storage"] == "sparse"
    for name in first:
        np.testing.assert_array_equal(first[name].loss_trace, again[name].loss_trace)
    with pytest.raises(ValueError, match="sampled on sparse rows: resume it with sparse_rows='auto'"):
        llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, include_full=True, resume=str(ck),
                                          sparse_rows="off", **kw)
