"""Bayesian influence functions: llc_fast.estimate_bif (the estimator, an exact oracle, a tiny GPT-2, checkpoints,
Ctrl-C, bad inputs, its outputs) and llc_fast.compat.devinterp.bif/compute_bif against devinterp 2.0.1.

Oracle: linear regression under MSE, one full batch. The discretised SGLD chain on the quadratic potential
U(w) = nbeta L(w) + gamma/2 |w - w*|^2 (Hessian H) is a Gaussian AR(1) process with mean m (U's minimum) and the
stationary covariance S = (H (I - lr H / 4))^-1 (``oracles.quadratic_sgld_expectation``). A per-sample loss
l_i = (a_i.(w - m) + r_i)^2 (r_i = a_i.m - y_i) is a quadratic in a Gaussian, so by Isserlis
Cov(l_i, l_j) = 2 s_ij^2 + 4 r_i r_j s_ij with s = A S B^T. Tolerance: 3 standard errors.
"""
import copy
import json
import os
import signal
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import llc_fast
from llc_fast.chains.interrupt import SamplingInterrupted
from llc_fast.estimators.bif import component_bif

from conftest import checkpoint_recorder, gpt2_case

NB, GAMMA, LR = 50.0, 1.0, 2e-3


def _regression(n=64, seed=0):
    """X [n, 3] with X^T X / n of eigenvalues 0.36, 1, 2.25; y with noise 0.3; 3 query points."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=torch.float64))
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x = x @ torch.linalg.inv(torch.linalg.cholesky(x.T @ x / n)).T @ torch.diag(
        torch.tensor([0.6, 1.0, 1.5], dtype=torch.float64)) @ q.T
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = x @ w + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    xq = torch.randn(3, 3, generator=g, dtype=torch.float64)
    return x, y, xq, xq @ w + 0.3 * torch.randn(3, generator=g, dtype=torch.float64)


def mse(m, b):
    return ((m(b[0])[:, 0] - b[1]) ** 2).mean()


def per_sample(m, b):
    return (m(b[0])[:, 0] - b[1]) ** 2


@pytest.fixture(scope="module")
def linear():
    x, y, xq, yq = _regression()
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution[:, 0].float()[None])
    sets = dict(data=[(x.float(), y.float())], query=[(xq.float(), yq.float())], train=[(x[:8].float(), y[:8].float())])
    return model, (x, y, xq, yq), sets


def _exact(model, arrays):
    """(covariance, correlation) [3, 8] of the query and first 8 train losses under the chain's stationary law."""
    x, y, xq, yq = arrays
    n, w0 = x.shape[0], model.weight.detach().double()[0]
    H = NB * 2 / n * x.T @ x + GAMMA * torch.eye(3, dtype=torch.float64)
    m = w0 - torch.linalg.solve(H, NB * 2 / n * x.T @ (x @ w0 - y))  # w* in float32 is not exactly the minimum
    a, V = torch.linalg.eigh(H)
    S = V @ torch.diag(1 / (a * (1 - LR * a / 4))) @ V.T
    A, B = xq, x[:8]
    rq, rt = A @ m - yq, B @ m - y[:8]
    s = A @ S @ B.T
    cov = 2 * s ** 2 + 4 * rq[:, None] * rt[None, :] * s
    sq, st = torch.diag(A @ S @ A.T), torch.diag(B @ S @ B.T)
    var_q, var_t = 2 * sq ** 2 + 4 * rq ** 2 * sq, 2 * st ** 2 + 4 * rt ** 2 * st
    return cov.numpy(), (cov / torch.sqrt(var_q[:, None] * var_t[None, :])).numpy()


ORACLE = dict(lr=LR, nbeta=NB, gamma=GAMMA, num_chains=16, num_draws=2000, num_burnin_steps=300, progress=False)


@pytest.mark.parametrize("kind", ["covariance", "correlation"])
def test_linear_gaussian_oracle(linear, kind):
    model, arrays, sets = linear
    res = llc_fast.estimate_bif(model, sets["data"], mse, query=sets["query"], train=sets["train"],
                                per_sample_fn=per_sample, kind=kind, seed=3, **ORACLE)
    exact = _exact(model, arrays)[kind == "correlation"]
    bif, se = res["full"]
    assert bif.shape == (3, 8) and res.components == ["full"] and res.chains_used == [16]
    z = (bif - exact) / se
    assert np.all(np.abs(z) < 3), np.round(z, 2)
    assert np.median(se / np.abs(exact)) < 0.2  # resolved well within the values' size


def test_estimator_by_hand_and_streamed_in_blocks(linear):
    """The pooled covariance and the delete-one-chain jackknife from the stored losses, in float64; the same
    numbers when the sums are accumulated one draw and one query row at a time."""
    model, _, sets = linear
    res = llc_fast.estimate_bif(model, sets["data"], mse, query=sets["query"], train=sets["train"],
                                per_sample_fn=per_sample, kind="covariance", token_losses=True, lr=LR, nbeta=NB,
                                gamma=GAMMA, num_chains=4, num_draws=50, seed=1, progress=False)
    x, y = (res.token_losses[s][0].astype(np.float64) for s in ("query", "train"))
    assert x.shape == (4, 50, 3) and y.shape == (4, 50, 8)

    def cov(x, y):
        xc, yc = x - x.mean(axis=(0, 1)), y - y.mean(axis=(0, 1))
        return np.einsum("cdq,cdt->qt", xc, yc) / (x.shape[0] * x.shape[1])

    loo = np.stack([cov(np.delete(x, c, 0), np.delete(y, c, 0)) for c in range(4)])
    se = np.sqrt(3 / 4 * ((loo - loo.mean(axis=0)) ** 2).sum(axis=0))
    np.testing.assert_allclose(res.bif[0], cov(x, y), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(res.bif_stderr[0], se, rtol=1e-5, atol=1e-12)
    x0, y0 = x[0, 0], y[0, 0]
    for kind in ("covariance", "correlation"):
        whole, whole_se, tiny, tiny_se = (np.empty((3, 8)) for _ in range(4))
        component_bif(x, y, x0, y0, kind, whole, whole_se)
        component_bif(x, y, x0, y0, kind, tiny, tiny_se, block_bytes=1)
        np.testing.assert_allclose(tiny, whole, rtol=1e-9)
        np.testing.assert_allclose(tiny_se, whole_se, rtol=1e-8)


def test_self_influence_a_diverged_chain_and_one_chain():
    model, x, y = _linear_model()
    data = [(x.float(), y.float())]
    res = llc_fast.estimate_bif(model, data, mse, query=[(x[:5].float(), y[:5].float())], per_sample_fn=per_sample,
                                lr=LR, nbeta=NB, gamma=GAMMA, num_chains=3, num_draws=30, progress=False)
    np.testing.assert_allclose(np.diag(res.bif[0]), 1.0, rtol=1e-9)  # [Nq, Nq]: each sample with itself
    np.testing.assert_allclose(res.bif[0], res.bif[0].T, rtol=1e-9)
    losses = np.random.default_rng(0).normal(size=(3, 20, 4))
    losses[1, 7:] = np.nan  # a chain that diverged at draw 7 is left out
    out, se = np.empty((4, 4)), np.empty((4, 4))
    assert component_bif(losses, losses, np.zeros(4), np.zeros(4), "correlation", out, se) == 2
    keep = losses[[0, 2]].reshape(40, 4)
    np.testing.assert_allclose(out, np.corrcoef(keep.T), rtol=1e-9)
    assert component_bif(losses[:1], losses[:1], np.zeros(4), np.zeros(4), "covariance", out, se) == 1
    assert np.isnan(se).all() and np.isfinite(out).all()


def _linear_model():
    x, y, _, _ = _regression()
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y[:, None]).solution[:, 0].float()[None])
    return model, x, y


def test_tiny_gpt2_per_token_bif_of_two_heads(tmp_path):
    from llc_fast.integrations.hf import causal_lm_token_losses

    model, loader, loss_fn = gpt2_case()
    batches = list(loader)
    res = llc_fast.estimate_bif(model, loader, loss_fn, query=batches[:1], train=batches[1:3],
                                per_sample_fn=causal_lm_token_losses, components={"h0": ["transformer.h.0.*"],
                                                                                  "h1": ["transformer.h.1.*"]},
                                include_full=True, lr=1e-4, nbeta=10.0, gamma=100.0, num_chains=3, num_draws=10,
                                progress=False)
    tokens = 8 * 11  # 8 rows of 12 tokens: 11 predictions each
    assert res.components == ["full", "h0", "h1"] and res.bif.shape == (3, tokens, 2 * tokens)
    assert np.isfinite(res.bif).all() and np.isfinite(res.bif_stderr).all() and np.abs(res.bif).max() <= 1 + 1e-9
    assert not np.allclose(res.bif[1], res.bif[2])
    assert res.llcs.names == ["full", "h0", "h1"] and "fingerprint" in res.config
    assert res.summary().startswith("BIF (correlation) of 88 query x 176 train samples for 3 component(s)")
    # saved and read back: JSON, NetCDF, a heat map
    back = llc_fast.BIFResult.load(res.save(tmp_path / "bif.json"))
    np.testing.assert_allclose(back.bif, res.bif)
    assert back.llcs["h1"].config["fingerprint"] == res.llcs["h1"].config["fingerprint"]
    xr = pytest.importorskip("xarray")
    res.to_netcdf(tmp_path / "bif.nc")
    with xr.open_dataset(tmp_path / "bif.nc") as ds:
        assert ds.bif.dims == ("component", "query", "train") and list(ds.component.values) == res.components
        np.testing.assert_allclose(ds.bif_stderr.values, res.bif_stderr)
    pytest.importorskip("matplotlib")
    fig = res.plot(tmp_path / "bif.png", component="h0")
    assert (tmp_path / "bif.png").read_bytes()[:4] == b"\x89PNG"
    import matplotlib.pyplot as plt

    plt.close(fig)
    (t, value, _), *_ = res.top("h0", query=3, k=5)
    assert abs(value) == np.nanmax(np.abs(res["h0"][0][3]))


KW = dict(lr=1e-3, nbeta=30.0, gamma=100.0, num_chains=2, num_draws=15, seed=1, progress=False)


def _mlp_sets():
    from conftest import mlp_case

    model, loader, loss_fn = mlp_case()
    batches = list(loader)
    return model, loader, loss_fn, dict(query=batches[:1], train=batches[1:2], per_sample_fn=_ce_per_sample,
                                        components={"first": ["0.*"], "last": ["2.*"]})


def _ce_per_sample(m, b):
    return nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")


def test_checkpoint_and_resume_give_the_same_bif(tmp_path):
    model, loader, loss_fn, sets = _mlp_sets()
    full = llc_fast.estimate_bif(model, loader, loss_fn, **sets, **KW)
    path = tmp_path / "run.ckpt"
    recording, seen = checkpoint_recorder(path, loss_fn)
    llc_fast.estimate_bif(model, loader, recording, **sets, checkpoint=str(path), checkpoint_every=6, **KW)
    assert len(seen) >= 2
    copy_ = tmp_path / "copy.ckpt"
    copy_.write_bytes(seen[len(seen) // 2][1])
    again = llc_fast.estimate_bif(model, loader, loss_fn, **sets, resume=str(copy_), **KW)
    np.testing.assert_array_equal(again.bif, full.bif)
    np.testing.assert_array_equal(again.bif_stderr, full.bif_stderr)
    with pytest.raises(ValueError):  # another train set is another run: the checkpoint does not resume it
        llc_fast.estimate_bif(model, loader, loss_fn, **dict(sets, train=list(loader)[2:3]), resume=str(copy_), **KW)


def test_ctrl_c_keeps_a_partial_bif_and_resumes_to_the_full_run(tmp_path):
    model, loader, loss_fn, sets = _mlp_sets()
    full = llc_fast.estimate_bif(model, loader, loss_fn, **sets, **KW)
    calls = []

    def interrupting(m, b):
        calls.append(1)
        if len(calls) == 12:
            os.kill(os.getpid(), signal.SIGINT)
        return loss_fn(m, b)

    path = tmp_path / "run.ckpt"
    with pytest.raises(SamplingInterrupted) as info:
        llc_fast.estimate_bif(model, loader, interrupting, **sets, checkpoint=str(path), **KW)
    partial = info.value.result
    assert isinstance(partial, llc_fast.BIFResult) and partial.components == ["first", "last"]
    assert partial.config["partial"] and partial.bif.shape == full.bif.shape
    again = llc_fast.estimate_bif(model, loader, loss_fn, **sets, resume=str(path), **KW)
    np.testing.assert_array_equal(again.bif, full.bif)


@pytest.mark.parametrize("change, match", [
    (dict(per_sample_fn=None), "needs per_sample_fn"),
    (dict(per_sample_fn=lambda m, b: _ce_per_sample(m, b).sum()[None]), "per_sample_fn does not reduce to loss_fn"),
    (dict(kind="spearman"), "kind must be one of"),
    (dict(query=None), "query must be a loader or a list of batches"),
    (dict(train="train.npy"), "train must be a loader"),
    (dict(num_eval_batches=0), "num_eval_batches must be an integer >= 1"),
    (dict(components={"x": ["nothing.*"]}), "matches no parameter|match"),
    (dict(components=None, include_full=True), "include_full adds the whole model"),
    (dict(mask={}), "takes components, not mask"),
    (dict(refine={}), "unknown option"),
])
def test_bad_inputs_are_refused_before_sampling(change, match, monkeypatch):
    model, loader, loss_fn, sets = _mlp_sets()
    monkeypatch.setattr(llc_fast.studies.bif, "estimate_config", lambda *a, **k: pytest.fail("sampled"))
    kw = dict(sets, **KW)
    kw.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        llc_fast.estimate_bif(model, loader, loss_fn, **kw)


# --- llc_fast.compat.devinterp.bif / compute_bif against devinterp 2.0.1 ----------------------------------------


@pytest.fixture(scope="module")
def devinterp_bif():
    pytest.importorskip("devinterp")
    pytest.importorskip("datasets")
    try:
        import devinterp.slt.bif as dbif
        import devinterp.slt.sampler as dsampler
    except ImportError:
        pytest.skip("the installed devinterp has no BIF (not 2.x)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dsampler, "_gc_and_empty_cache", lambda: None)
        yield dbif


def _compat_case():
    import test_compat_susceptibilities as tcs

    observables = {"main-set": tcs.MAIN, "b.x": (tcs.B, 1), "a": tcs.A}
    kw = dict(lr=3e-3, n_beta=10.0, batch_size=4, batches_per_draw=2, num_init_loss_batches=4, localization=10.0,
              num_burnin_steps=1, num_steps_bw_draws=2, device="cpu", num_chains=2, num_draws=5, noise_level=0.0)
    return tcs._gpt2(), tcs.MAIN, observables, kw


OPTIONS = [dict(), dict(compute_covariance=True), dict(average_tokenwise_bif=True),
           dict(correlation_method="sequence"), dict(correlation_method="sequence", compute_covariance=True),
           dict(reduce_chain_dimension_method="mean", correlation_method="sequence"),
           dict(reduce_chain_dimension_method="mean", average_tokenwise_bif=True, compute_covariance=True),
           dict(batch_index_range_1=[0, 3], batch_index_range_2=[1, 2, 5], batch_size=2)]


def test_noise_free_bif_equals_devinterps(devinterp_bif):
    """No noise: devinterp's chains and ours are the same, so is every BIF; the layout is devinterp's."""
    from llc_fast.compat import devinterp as compat

    model, data, observables, kw = _compat_case()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = devinterp_bif.bif(copy.deepcopy(model), data, observables, bif_device="cpu", **kw)
        ours = compat.bif(model, data, observables, bif_device="cpu", progress=False, **kw)
        their_samples = compat.sample(copy.deepcopy(model), data, observables, progress=False, **kw)
    _same(ours, theirs, atol=1e-4)  # the chains agree to float rounding: correlations of 10 draws amplify it
    assert ours.influences.dims == ("batch_1", "batch_2", "target_position", "target_position_T")
    assert ours.sizes["batch_1"] == 8 + 4 + 8  # a: 2 batches of 4 rows, b_x: 1, main_set: 2
    for options in OPTIONS:  # the same samples: only the float32 arithmetic differs
        _same(compat.compute_bif(their_samples, device="cpu", **options),
              devinterp_bif.compute_bif(their_samples, device="cpu", **options), atol=1e-5)


def _same(ours, theirs, atol):
    assert dict(ours.sizes) == dict(theirs.sizes) and list(ours.data_vars) == list(theirs.data_vars)
    for name in ours.variables:
        assert ours[name].dims == theirs[name].dims and ours[name].dtype == theirs[name].dtype, name
    assert set(ours.coords) == set(theirs.coords)
    for name in ours.coords:
        np.testing.assert_array_equal(ours[name].values, theirs[name].values)
    np.testing.assert_array_equal(ours.input_ids.values, theirs.input_ids.values)
    got, want = ours.influences.values, theirs.influences.values
    assert np.isfinite(want).any() and np.nanmax(np.abs(want)) > 1e-6
    np.testing.assert_allclose(got, want, rtol=0, atol=atol)


def test_compat_refuses_bad_methods_before_sampling(devinterp_bif, monkeypatch):
    import importlib

    from llc_fast.compat import devinterp as compat

    compat_bif = importlib.import_module("llc_fast.compat.devinterp.bif")  # the module, not its function bif

    model, data, observables, kw = _compat_case()
    monkeypatch.setattr(compat_bif, "sample", lambda *a, **k: pytest.fail("sampled"))
    with pytest.raises(ValueError, match="Unknown correlation method: pairs"):
        compat.bif(model, data, observables, correlation_method="pairs", **kw)
    with pytest.raises(ValueError, match="Unknown method: median"):
        compat.bif(model, data, observables, reduce_chain_dimension_method="median", **kw)


def test_matrices_too_large_for_memory_go_to_npy_files(tmp_path, monkeypatch, capsys):
    import llc_fast.estimators.bif as native

    model, loader, loss_fn, sets = _mlp_sets()
    small = llc_fast.estimate_bif(model, loader, loss_fn, **sets, **KW)
    monkeypatch.setattr(native, "IN_MEMORY_LIMIT", 0)
    with pytest.raises(ValueError, match="pass token_losses_path=DIR"):
        llc_fast.estimate_bif(model, loader, loss_fn, **sets, **KW)
    res = llc_fast.estimate_bif(model, loader, loss_fn, **sets, token_losses=True, token_losses_path=tmp_path, **KW)
    assert "BIF matrix" in capsys.readouterr().err
    assert isinstance(res.bif, np.memmap) and res.bif.dtype == np.float32
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bif.npy", "bif_stderr.npy", "token_losses_query.npy",
                                                          "token_losses_train.npy"]
    np.testing.assert_allclose(res.bif, small.bif, rtol=1e-5, atol=1e-7)
    back = llc_fast.BIFResult.load(res.save(tmp_path / "bif.json"))
    assert json.loads((tmp_path / "bif.json").read_text())["bif"] == {"file": str(tmp_path / "bif.npy")}
    np.testing.assert_array_equal(back.bif_stderr, res.bif_stderr)
