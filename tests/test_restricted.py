"""Many questions from one batched run: restricted LLCs of every component, data-refined LLCs and
susceptibilities (llc_fast.estimate_restricted_llcs, estimate_llc(eval_data=, refine=),
llc_fast.estimate_susceptibilities).

Oracles: a model of independent blocks under one summed quadratic loss. Component C's restricted
posterior (the other weights at w*) is Gaussian, each coordinate of the restriction's Hessian
eigenbasis an AR(1) chain with the stationary variance s^2 = 1/(a (1 - lr a/4)), a = nbeta h + gamma
(``oracles.quadratic_sgld_expectation``); so the restricted LLC, the eval-set expectation and the
covariances of the susceptibilities are exact. Tolerances: 3 standard errors over chains.
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

import llc_fast
from llc_fast.oracles import quadratic_sgld_expectation

from conftest import checkpoint_recorder, gpt2_case, mlp_case

NBETA, GAMMA, LR = 20.0, 1.0, 1e-3


def _spd(d, seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    eig = torch.linspace(0.3, 2.5, d, dtype=torch.float64)
    return q @ torch.diag(eig) @ q.T


class Blocks(nn.Module):
    """R replicas of independent blocks a [R, 2] and b [R, 3], all at w* = 0. A batch names the quadratic:
    "train" uses Hessians H_a, H_b; "eval" uses H'_a, H'_b (for the data-refined estimate). The loss carries
    a constant R (no effect on gradients, differences or covariances) so that L(w*) sets the divergence
    bound's scale, as a real model's loss does."""

    def __init__(self, replicas=200):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(replicas, 2, dtype=torch.float64))
        self.b = nn.Parameter(torch.zeros(replicas, 3, dtype=torch.float64))
        self.H = {"train": (_spd(2, 0), _spd(3, 1)), "eval": (torch.diag(torch.tensor([0.5, 2.0], dtype=torch.float64)),
                                                             _spd(3, 2))}

    def forward(self, which):
        ha, hb = self.H[which]
        quadratic = torch.einsum("ri,ij,rj->", self.a, ha, self.a) + torch.einsum("ri,ij,rj->", self.b, hb, self.b)
        return 0.5 * quadratic + float(self.a.shape[0])


def block_loss(model, batch):
    return model(batch)


TRAIN, EVAL = ["train"], ["eval"]


def _restricted_exact(H, idx):
    """E[nbeta K] of the discretised chain restricted to coordinates idx of one replica of Hessian H."""
    sub = H[np.ix_(idx, idx)]
    return quadratic_sgld_expectation(np.linalg.eigvalsh(sub), NBETA, GAMMA, LR)


def _continuous(H, idx):
    eig = np.linalg.eigvalsh(H[np.ix_(idx, idx)])
    return 0.5 * float(np.sum(NBETA * eig / (NBETA * eig + GAMMA)))


def _within_3se(per_chain, expected):
    mean, se = per_chain.mean(), per_chain.std(ddof=1) / math.sqrt(per_chain.size)
    assert abs(mean - expected) < 3 * se, f"{mean:.4f} vs exact {expected:.4f}, 3 SE = {3 * se:.4f}"


KW = dict(lr=LR, nbeta=NBETA, gamma=GAMMA, num_chains=4, num_draws=800, num_burnin_steps=800, seed=5, progress=False)


@pytest.fixture(scope="module")
def blocks_run():
    model = Blocks()
    mask_b01 = torch.zeros(200, 3)
    mask_b01[:, :2] = 1
    components = {"a": ["a"], "b": ["b"], "b01": {"b": mask_b01}, "both": ["a", "b"]}
    res = llc_fast.estimate_restricted_llcs(model, TRAIN, block_loss, components, refine={"eval": EVAL}, **KW)
    return model, components, res


def test_block_oracle_each_component_from_one_call(blocks_run):
    model, _, res = blocks_run
    ha, hb = (h.numpy() for h in model.H["train"])
    R = 200
    exact = {"a": _restricted_exact(ha, [0, 1]), "b": _restricted_exact(hb, [0, 1, 2]),
             "b01": _restricted_exact(hb, [0, 1])}
    exact["both"] = exact["a"] + exact["b"]
    continuous = {"a": _continuous(ha, [0, 1]), "b": _continuous(hb, [0, 1, 2]), "b01": _continuous(hb, [0, 1])}
    continuous["both"] = continuous["a"] + continuous["b"]
    assert res.names == ["a", "b", "b01", "both"]
    for name in res:
        per_copy = res[name].llc_per_chain / R
        _within_3se(per_copy, exact[name])
        assert per_copy.mean() == pytest.approx(continuous[name], rel=0.10)  # ½ Σ nβh/(nβh+γ)
    assert res["b01"].config["num_params"] == 2 * R and res["both"].config["num_params"] == 5 * R
    assert res.facts["engine"] == "vmap"


def test_each_component_is_the_same_chain_as_alone_with_mask(blocks_run):
    model, components, res = blocks_run
    for name in ("b01", "a"):
        mask = {n: None for n in components[name]} if isinstance(components[name], list) else components[name]
        alone = llc_fast.estimate_llc(model, TRAIN, block_loss, mask=mask, **KW)
        np.testing.assert_array_equal(alone.loss_trace, res[name].loss_trace)
        assert alone.llc_mean == res[name].llc_mean


def test_groups_straddling_components_change_nothing():
    model, loader, loss_fn = mlp_case()
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=3, num_draws=12, seed=1, progress=False)
    comps = {"first": ["0.*"], "last": ["2.weight"], "overlap": ["0.weight", "2.weight"]}  # overlapping: allowed
    one = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, include_full=True, **kw)
    grouped = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, include_full=True,
                                                max_batched_chains=5, **kw)
    sequential = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, include_full=True,
                                                   chain_batching="sequential", **kw)
    full = llc_fast.estimate_llc(model, loader, loss_fn, **kw)
    assert one.names == ["full", "first", "last", "overlap"]
    for name in one:
        np.testing.assert_array_equal(one[name].loss_trace, grouped[name].loss_trace)
        np.testing.assert_allclose(one[name].loss_trace, sequential[name].loss_trace, rtol=1e-5)
    np.testing.assert_array_equal(one["full"].loss_trace, full.loss_trace)


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_every_backend_gives_each_component_the_chain_it_gives_alone(backend):
    """Per-row masks through the loop (RowMasks) against the shared mask of a run alone, per backend."""
    if backend == "triton":
        pytest.importorskip("triton")
    model, loader, loss_fn = mlp_case()
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=2, num_draws=6, seed=4, progress=False, backend=backend,
              sampler="rmsprop_sgld")
    head = torch.zeros(16, 6)
    head[3:9] = 1  # a slice of rows of one weight, as an attention head is
    comps = {"slice": {"0.weight": head}, "last": ["2.*"]}
    res = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, **kw)
    for name, mask in (("slice", {"0.weight": head}), ("last", {"2.weight": None, "2.bias": None})):
        alone = llc_fast.estimate_llc(model, loader, loss_fn, mask=mask, **kw)
        np.testing.assert_array_equal(alone.loss_trace, res[name].loss_trace)
    assert res["slice"].config["backend"] == backend


def test_rmsprop_and_a_stopping_target_per_component():
    model, loader, loss_fn = mlp_case()
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=3, num_draws=10, seed=1, progress=False,
              sampler="rmsprop_sgld")
    comps = {"first": ["0.*"], "last": ["2.*"]}
    res = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, target_stderr=1e-9, max_draws=20,
                                            check_every=5, **kw)
    with pytest.warns(llc_fast.estimators.llc.LLCTargetNotMetWarning, match="component 'first'"):
        llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, target_stderr=1e-9, max_draws=20,
                                          check_every=5, **kw)
    assert res["first"].loss_trace.shape == (3, 20) and res["first"].config["stopped_by"] == "max_draws"
    alone = llc_fast.estimate_llc(model, loader, loss_fn, mask={"2.weight": None, "2.bias": None},
                                  target_stderr=1e-9, max_draws=20, check_every=5, **kw)
    np.testing.assert_array_equal(alone.loss_trace, res["last"].loss_trace)


def test_mala_acceptance_with_row_masks():
    model = Blocks(replicas=20)
    res = llc_fast.estimate_restricted_llcs(model, TRAIN, block_loss, {"a": ["a"], "b": ["b"]}, lr=LR, nbeta=NBETA,
                                            gamma=GAMMA, num_chains=2, num_draws=30, mala_every=3, progress=False)
    alone = llc_fast.estimate_llc(model, TRAIN, block_loss, mask={"b": None}, lr=LR, nbeta=NBETA, gamma=GAMMA,
                                  num_chains=2, num_draws=30, mala_every=3, progress=False)
    np.testing.assert_allclose(res["b"].mala_acceptance, alone.mala_acceptance, rtol=1e-12)
    assert np.all((res["a"].mala_acceptance > 0.5) & (res["a"].mala_acceptance <= 1))


def _same_runs(full, again) -> None:
    """Two restricted runs with a refined set "x" drew the same chains."""
    assert again.names == full.names
    for name in full:
        np.testing.assert_array_equal(full[name].loss_trace, again[name].loss_trace)
        np.testing.assert_array_equal(full[name].refined["x"].loss_trace, again[name].refined["x"].loss_trace)


def test_checkpoint_and_resume_of_a_restricted_run_with_refined_sets(tmp_path):
    model, loader, loss_fn = mlp_case()
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=2, num_draws=20, seed=1, progress=False,
              max_batched_chains=3)
    comps = {"first": ["0.*"], "last": ["2.*"]}
    evalset = [next(iter(loader))]
    full = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, refine={"x": evalset}, **kw)
    path = tmp_path / "run.ckpt"
    recording, seen = checkpoint_recorder(path, loss_fn)
    llc_fast.estimate_restricted_llcs(model, loader, recording, comps, refine={"x": evalset}, checkpoint=str(path),
                                      checkpoint_every=6, **kw)
    assert len(seen) >= 2
    copy = tmp_path / "copy.ckpt"
    copy.write_bytes(seen[len(seen) // 2][1])
    again = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, refine={"x": evalset},
                                              resume=str(copy), **kw)
    _same_runs(full, again)


def test_tiny_gpt2_all_heads_in_one_call():
    from llc_fast.integrations.components import heads

    model, loader, loss_fn = gpt2_case()
    kw = dict(lr=1e-4, nbeta=10.0, gamma=100.0, num_chains=2, num_draws=6, seed=0, progress=False)
    res = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, "heads", include_full=True, **kw)
    expect = heads(model)
    assert res.names == ["full"] + list(expect) and len(expect) == 4  # 2 layers x 2 heads
    for name in expect:
        r = res[name]
        assert np.isfinite(r.llc_mean) and r.loss_trace.shape == (2, 6)
        assert r.config["num_params"] == sum(int(m.sum()) if m is not None else p.numel()
                                             for n, m in expect[name].items()
                                             for p in [dict(model.named_parameters())[n]])
    alone = llc_fast.estimate_llc(model, loader, loss_fn, mask=expect["l1h0"], **kw)
    np.testing.assert_array_equal(alone.loss_trace, res["l1h0"].loss_trace)
    assert res.facts["engine"] == "vmap"
    assert len({float(res[n].llc_mean) for n in expect}) == len(expect)  # the heads really differ


def test_result_table_csv_json_and_plot(blocks_run, tmp_path):
    _, _, res = blocks_run
    text = res.table()
    assert text.splitlines()[0].split()[:3] == ["component", "#params", "LLC"] and "refined[eval]_mean" in text
    csv_text = res.to_csv()
    lines = csv_text.strip().splitlines()
    assert lines[0] == "name,num_params,llc_mean,llc_std,llc_stderr,mcse,rhat,trusted,verdict,diverged,refined[eval]_mean"
    assert [ln.split(",")[0] for ln in lines[1:]] == res.names
    back = llc_fast.RestrictedLLCResult.load(res.save(tmp_path / "r.json"))
    assert back.names == res.names and back.table() == text
    assert back["b"].refined["eval"].llc_mean == res["b"].refined["eval"].llc_mean
    pytest.importorskip("matplotlib")
    fig = res.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 1000 and len(fig.axes[0].patches) == len(res)
    with pytest.raises(KeyError, match="components: \\['a', 'b'"):
        res["nope"]


@pytest.mark.parametrize("components, match", [
    ({}, "components is empty"),
    ({"x": []}, "has no patterns"),
    ({"x": ["0.weightt"]}, "matches no trainable parameter.*similar: \\['0.weight'"),
    ({"x": {}}, "empty restriction"),
    ({"x": {"nope": None}}, "'nope' is not a sampled parameter"),
    ({"x": {"0.weight": torch.zeros(16, 6)}}, "samples nothing"),
    ({"x": {"0.weight": torch.ones(3, 3)}}, "not broadcastable"),
    ({"": ["0.*"]}, "non-empty strings"),
    ("bogus", "bogus"),
])
def test_bad_components_fail_before_sampling(components, match):
    model, loader, loss_fn = mlp_case()
    calls = []

    def counting(m, b):
        calls.append(1)
        return loss_fn(m, b)

    with pytest.raises((ValueError, KeyError), match=match):
        llc_fast.estimate_restricted_llcs(model, loader, counting, components, lr=1e-3, nbeta=10.0, num_draws=5,
                                          progress=False)
    assert not calls


def test_mask_is_refused_and_unknown_options_named():
    model, loader, loss_fn = mlp_case()
    with pytest.raises(ValueError, match="not mask="):
        llc_fast.estimate_restricted_llcs(model, loader, loss_fn, {"x": ["0.*"]}, mask={"0.weight": None}, lr=1e-3)
    with pytest.raises(TypeError, match="num_chain"):
        llc_fast.estimate_restricted_llcs(model, loader, loss_fn, {"x": ["0.*"]}, lr=1e-3, num_chain=3)


# --- data-refined estimates ---------------------------------------------------------------------


def test_refined_on_the_sampling_batch_is_the_estimate_itself():
    """With one full batch as both the sampling data and the eval set, the refined trace is the loss trace."""
    model, loader, loss_fn = mlp_case()
    batch = [next(iter(loader))]
    r = llc_fast.estimate_llc(model, batch, loss_fn, lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=3, num_draws=15,
                              num_burnin_steps=3, refine={"same": batch}, progress=False)
    np.testing.assert_allclose(r.refined["same"].loss_trace, r.loss_trace, rtol=1e-6)
    assert r.refined["same"].init_loss == pytest.approx(r.init_loss, rel=1e-6)
    assert r.refined["same"].llc_mean == pytest.approx(r.llc_mean, rel=1e-4)


def test_data_refined_oracle_and_eval_data_equal_refine(blocks_run):
    """E over the train posterior of nbeta K_eval = Σ_i nbeta (Q^T H' Q)_ii s_i^2 / 2 in the eigenbasis Q of H."""
    model, _, res = blocks_run
    R = 200
    for name, idx, which in (("a", [0, 1], 0), ("b", [0, 1, 2], 1)):
        H, Hp = model.H["train"][which].numpy(), model.H["eval"][which].numpy()
        eig, Q = np.linalg.eigh(H[np.ix_(idx, idx)])
        a = NBETA * eig + GAMMA
        s2 = 1.0 / (a * (1 - LR * a / 4))
        exact = 0.5 * NBETA * float(np.sum(np.diag(Q.T @ Hp[np.ix_(idx, idx)] @ Q) * s2))
        _within_3se(res[name].refined["eval"].llc_per_chain / R, exact)
    alone = llc_fast.estimate_llc(model, TRAIN, block_loss, mask={"a": None}, eval_data=EVAL, **KW)
    np.testing.assert_array_equal(alone.loss_trace, res["a"].refined["eval"].loss_trace)
    np.testing.assert_array_equal(alone.refined["sampling"].loss_trace, res["a"].loss_trace)
    assert alone.config["eval_set"] == "eval"


def test_several_subsets_come_from_the_same_chains():
    model, loader, loss_fn = mlp_case()
    batches = list(loader)
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=2, num_draws=10, progress=False)
    both = llc_fast.estimate_llc(model, loader, loss_fn, refine={"x": batches[:1], "y": batches[1:]},
                                 num_eval_batches=2, **kw)
    only_y = llc_fast.estimate_llc(model, loader, loss_fn, eval_data=batches[1:], num_eval_batches=2, **kw)
    np.testing.assert_array_equal(both.loss_trace, only_y.refined["sampling"].loss_trace)
    np.testing.assert_array_equal(both.refined["y"].loss_trace, only_y.loss_trace)
    assert not np.array_equal(both.refined["x"].loss_trace, both.refined["y"].loss_trace)
    back = llc_fast.LLCResult.from_dict(both.to_dict())
    assert back.refined["x"].llc_mean == both.refined["x"].llc_mean


@pytest.mark.parametrize("refine, match", [
    ([1, 2], "refine must be a non-empty dict"),
    ({}, "refine must be a non-empty dict"),
    ({"x": []}, "evaluation set 'x' yielded no batches"),
    ({"eval": [None]}, "rename it"),
    ({"sampling": [None]}, "rename it"),
])
def test_bad_evaluation_sets(refine, match):
    model, loader, loss_fn = mlp_case()
    extra = dict(eval_data=list(loader)) if match == "rename it" else {}
    with pytest.raises(ValueError, match=match):
        llc_fast.estimate_llc(model, loader, loss_fn, lr=1e-3, nbeta=10.0, num_draws=5, progress=False, refine=refine,
                              **extra)


# --- susceptibilities ---------------------------------------------------------------------------


def per_sample(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def test_susceptibility_oracle_for_quadratic_blocks():
    """chi(C, eval) = -Cov[K(w), K'(w) - K(w)] under C's restricted posterior: in the eigenbasis Q of H_C,
    coordinates are independent with variance s_i^2 and Cov(w_i^2, w_j^2) = 2 s_i^4 delta_ij, so
    chi = -Σ_i (h_i / 2) ((Q^T H' Q)_ii / 2 - h_i / 2) 2 s_i^4 (per replica, times R)."""
    R, lr = 20, 4e-3  # the covariance's relative error does not shrink with R (both sides grow as R): draws do
    model = Blocks(replicas=R)
    res = llc_fast.estimate_susceptibilities(model, TRAIN, block_loss, {"a": ["a"], "b": ["b"]}, {"eval": EVAL},
                                             lr=lr, nbeta=NBETA, gamma=GAMMA, num_chains=8, num_draws=4000,
                                             num_burnin_steps=800, seed=2, progress=False)
    for k, (name, which) in enumerate((("a", 0), ("b", 1))):
        H, Hp = model.H["train"][which].numpy(), model.H["eval"][which].numpy()
        eig, Q = np.linalg.eigh(H)
        a = NBETA * eig + GAMMA
        s2 = 1.0 / (a * (1 - lr * a / 4))
        hp = np.diag(Q.T @ Hp @ Q)
        exact = -R * float(np.sum((eig / 2) * (hp / 2 - eig / 2) * 2 * s2**2))
        chi, se = res[name, "eval"]
        assert abs(chi - exact) < 3 * se, f"{name}: chi {chi:.4g} vs exact {exact:.4g}, SE {se:.3g}"
        assert se < 0.2 * abs(exact)  # the test resolves chi to well within its size
        assert res.chi_per_chain.shape == (2, 8, 1)
    assert res.llcs.names == ["a", "b"]


def test_susceptibility_of_the_reference_set_itself_is_zero_and_token_layout():
    model, loader, loss_fn = mlp_case()
    batches = list(loader)

    res = llc_fast.estimate_susceptibilities(model, batches, loss_fn, {"first": ["0.*"], "last": ["2.*"]},
                                             {"ref": batches[:1], "other": batches[1:2]}, per_token_fn=per_sample,
                                             token_losses=True, lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=3,
                                             num_draws=12, progress=False)
    assert np.allclose(res.chi[:, 0], 0.0, atol=1e-12) and np.all(np.abs(res.chi[:, 1]) > 0)
    assert res.token_chi["other"].shape == (2, 32) and res.token_losses["other"].shape == (2, 3, 12, 32)
    # the per-sample susceptibilities average to the subset's (the covariance is linear in the observable)
    np.testing.assert_allclose(res.token_chi["other"].mean(axis=1), res.chi[:, 1], rtol=1e-5)
    back = llc_fast.SusceptibilityResult.from_dict(res.to_dict())
    np.testing.assert_allclose(back.chi, res.chi)
    assert back.token_chi["other"].shape == (2, 32)


def test_token_losses_stream_to_disk(tmp_path, capsys):
    model, loader, loss_fn = mlp_case()
    batches = list(loader)

    res = llc_fast.estimate_susceptibilities(model, batches, loss_fn, {"first": ["0.*"]}, {"other": batches[1:2]},
                                             per_token_fn=per_sample, token_losses=True, token_losses_path=tmp_path,
                                             lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=2, num_draws=8,
                                             progress=False)
    err = capsys.readouterr().err
    assert "per-token losses of 'other'" in err and "MiB" in err
    on_disk = np.load(tmp_path / "token_losses_other.npy", mmap_mode="r")
    assert on_disk.shape == (2, 8, 32)
    np.testing.assert_array_equal(on_disk.reshape(1, 2, 8, 32), res.token_losses["other"])
    with pytest.raises(ValueError, match="per_token_fn"):
        llc_fast.estimate_susceptibilities(model, batches, loss_fn, {"first": ["0.*"]}, {"o": batches}, lr=1e-3,
                                           nbeta=3.0, token_losses=True)
    with pytest.raises(ValueError, match="reference set"):
        llc_fast.estimate_susceptibilities(model, batches, loss_fn, {"first": ["0.*"]}, {"sampling": batches},
                                           lr=1e-3, nbeta=3.0)


def test_ctrl_c_keeps_a_partial_restricted_result_and_resumes_to_the_full_run(tmp_path):
    import os
    import signal

    from llc_fast.chains.interrupt import SamplingInterrupted

    model, loader, loss_fn = mlp_case()
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=2, num_draws=15, seed=1, progress=False)
    comps = {"first": ["0.*"], "last": ["2.*"]}
    evalset = [next(iter(loader))]
    full = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, refine={"x": evalset}, **kw)
    calls = []

    def interrupting(m, b):
        calls.append(1)
        if len(calls) == 12:
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(m, b)

    path = tmp_path / "run.ckpt"
    with pytest.raises(SamplingInterrupted) as info:
        llc_fast.estimate_restricted_llcs(model, loader, interrupting, comps, refine={"x": evalset},
                                          checkpoint=str(path), **kw)
    partial = info.value.result
    assert isinstance(partial, llc_fast.RestrictedLLCResult) and partial.names == ["first", "last"]
    assert partial["first"].config["partial"] and "x" in partial["first"].refined
    again = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, comps, refine={"x": evalset},
                                              resume=str(path), **kw)
    _same_runs(full, again)


def test_tiny_gpt2_per_token_susceptibilities_of_every_head():
    from llc_fast.integrations.hf import causal_lm_loss, causal_lm_token_losses

    model, loader, loss_fn = gpt2_case()
    batches = list(loader)
    assert torch.allclose(causal_lm_token_losses(model, batches[0]).mean(), causal_lm_loss(model, batches[0]))
    res = llc_fast.estimate_susceptibilities(model, loader, loss_fn, "heads", {"s1": batches[1:2], "s2": batches[2:3]},
                                             per_token_fn=causal_lm_token_losses, token_losses=True, lr=1e-4,
                                             nbeta=10.0, gamma=100.0, num_chains=2, num_draws=8, progress=False)
    assert res.components == ["l0h0", "l0h1", "l1h0", "l1h1"] and res.chi.shape == (4, 2)
    tokens = 8 * 11  # 8 rows of 12 tokens: 11 predictions each
    assert res.token_chi["s1"].shape == (4, tokens) and res.token_losses["s2"].shape == (4, 2, 8, tokens)
    np.testing.assert_allclose(res.token_chi["s1"].mean(axis=1), res.chi[:, 0], rtol=1e-4, atol=1e-9)
    assert np.isfinite(res.chi).all() and np.isfinite(res.chi_stderr).all()


# --- what a component samples: its size, its tied names, its saved mask -----------------------------


def _half_masks():
    lo = torch.zeros(16, 6)
    lo[:5] = 1
    return lo, 1 - lo


def test_num_params_counts_the_sampled_weights_alone_and_in_a_restricted_run():
    model, loader, loss_fn = mlp_case()
    lo, _ = _half_masks()
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=2, num_draws=4, seed=1, progress=False)
    alone = llc_fast.estimate_llc(model, loader, loss_fn, mask={"0.weight": lo, "2.bias": None}, **kw)
    res = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, {"c": {"0.weight": lo, "2.bias": None}},
                                            include_full=True, **kw)
    total = sum(p.numel() for p in model.parameters())  # 163
    assert alone.config["num_params"] == res["c"].config["num_params"] == 30 + 3
    assert alone.config["model_num_params"] == res["c"].config["model_num_params"] == total
    assert res["full"].config["num_params"] == total
    assert llc_fast.estimate_llc(model, loader, loss_fn, **kw).config["num_params"] == total


def test_a_tied_alias_names_the_tensor_it_is_tied_to():
    from conftest import token_case
    from llc_fast.estimators.restricted import resolve_components

    model, loader, loss_fn = token_case()  # out.weight is emb.weight
    assert resolve_components(model, {"out": ["out.weight"], "all": ["*"]}) == {
        "out": {"emb.weight": None}, "all": {n: None for n, _ in model.named_parameters()}}
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=2, num_draws=4, seed=1, progress=False)
    res = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, {"out": ["out.weight"], "emb": ["emb.*"]}, **kw)
    np.testing.assert_array_equal(res["out"].loss_trace, res["emb"].loss_trace)
    assert res["out"].config["mask"] == ["emb.weight"] and res["out"].config["num_params"] == 11 * 8
    alone = llc_fast.estimate_llc(model, loader, loss_fn, mask={"out.weight": None}, **kw)
    np.testing.assert_array_equal(alone.loss_trace, res["out"].loss_trace)
    assert alone.config["tied_params"] == {"out.weight": "emb.weight"}
    with pytest.raises(ValueError, match=r"one tied tensor twice \(\['emb.weight', 'out.weight'\]\): give it once, "
                                         "under 'emb.weight'"):
        llc_fast.estimate_llc(model, loader, loss_fn, mask={"emb.weight": None, "out.weight": None}, **kw)


def test_a_saved_result_knows_exactly_which_weights_were_sampled(tmp_path):
    import json

    model, loader, loss_fn = mlp_case()
    lo, hi = _half_masks()
    kw = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=2, num_draws=4, seed=1, progress=False)
    res = llc_fast.estimate_restricted_llcs(model, loader, loss_fn, {"lo": {"0.weight": lo}, "hi": {"0.weight": hi},
                                                                     "layer": ["0.*"]}, **kw)
    back = llc_fast.RestrictedLLCResult.load(res.save(tmp_path / "r.json"))
    assert back["lo"].config["mask"] == back["hi"].config["mask"] == ["0.weight"]  # the names alone cannot tell
    np.testing.assert_array_equal(back["lo"].sampled_mask()["0.weight"], lo.bool().numpy())
    np.testing.assert_array_equal(back["hi"].sampled_mask()["0.weight"], hi.bool().numpy())
    assert back["layer"].sampled_mask() == {"0.weight": None, "0.bias": None}
    assert back["lo"].config["mask_content"]["0.weight"]["ones"] == 30 == back["lo"].config["num_params"]
    alone = llc_fast.estimate_llc(model, loader, loss_fn, mask={"0.weight": lo[:, :1]}, **kw)  # [16, 1]
    assert alone.config["mask_content"] == res["lo"].config["mask_content"]  # broadcast to the parameter's shape
    assert llc_fast.estimate_llc(model, loader, loss_fn, **kw).sampled_mask() is None

    saved = json.loads((tmp_path / "r.json").read_text())
    record = saved["results"]["lo"]["config"]["mask_content"]["0.weight"]
    record["bits"] = saved["results"]["hi"]["config"]["mask_content"]["0.weight"]["bits"]
    (tmp_path / "changed.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="do not match its sha256"):
        llc_fast.RestrictedLLCResult.load(tmp_path / "changed.json")["lo"].sampled_mask()
    del saved["results"]["hi"]["config"]["mask_content"]
    (tmp_path / "old.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"keeps only the names of its mask \(\['0.weight'\]\)"):
        llc_fast.RestrictedLLCResult.load(tmp_path / "old.json")["hi"].sampled_mask()
