"""llc_fast.compat.devinterp against devinterp itself: 2.0.1 in-process (its `llc` API), 1.3.2 in a subprocess
(PYTHONPATH=.devinterp1; skipped if that folder is missing).

Two kinds of agreement: with noise_level=0 both libraries run the same deterministic chains over the same
batches, so every number must agree to float tolerance (this pins down batch order, draw placement, burn-in,
the initial loss, the update and the reductions); with noise, the estimates must agree within 3 combined
standard errors (the noise generators differ).
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import llc_fast
import llc_fast.oracles as oracles
from llc_fast.compat import devinterp as compat

xr = pytest.importorskip("xarray")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[1]
DEVINTERP1 = ROOT / ".devinterp1"

# ------------------------------------------------------------------------------------------------
# shared between this process and the devinterp 1.3.2 subprocess
# ------------------------------------------------------------------------------------------------
SHARED = r'''
import torch
from torch import nn


class Out:  # an object with a .loss attribute
    def __init__(self, loss):
        self.loss = loss


def ev_tensor(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y)


def ev_tuple(model, batch):
    x, y = batch
    return nn.functional.mse_loss(model(x), y), {"n": len(x)}


def ev_dict(model, batch):
    x, y = batch
    return {"loss": nn.functional.mse_loss(model(x), y)}


def ev_object(model, batch):
    ids = batch[0]
    logits = model(ids, return_dict=False, use_cache=False)[0]
    logp = torch.log_softmax(logits, dim=-1)[:, :-1]
    return Out(-logp.gather(-1, ids[:, 1:, None]).mean())
'''
exec(SHARED)  # noqa: S102 - defines ev_tensor, ev_tuple, ev_dict, ev_object, Out here too

CHILD = SHARED + r'''
import json, sys, warnings
warnings.simplefilter("ignore")
torch.set_num_threads(1)
from torch.utils.data import DataLoader
import devinterp
assert "devinterp1" in devinterp.__file__, devinterp.__file__
from devinterp.slt.sampler import estimate_learning_coeff_with_summary
from devinterp.optim import SGLD, SGMCMC
import llc_fast.compat.devinterp as compat

METHODS = {"devinterp.SGLD": SGLD, "devinterp.rmsprop_sgld": SGMCMC.rmsprop_sgld,
           "compat.SGLD": compat.SGLD, "compat.rmsprop_sgld": compat.SGMCMC.rmsprop_sgld}
out = {}
for case in torch.load(sys.argv[1], weights_only=False):
    loader = DataLoader(case["dataset"], batch_size=case["batch_size"], shuffle=False)
    r = estimate_learning_coeff_with_summary(
        case["model"], loader, evaluate=globals()[case["evaluate"]], sampling_method=METHODS[case["method"]],
        optimizer_kwargs=dict(case["optimizer_kwargs"]), verbose=False, **case["run"])
    out[case["id"]] = {"keys": list(r), "trace_dtype": str(r["loss/trace"].dtype),
                       **{k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in r.items()}}
with open(sys.argv[2], "w") as f:
    json.dump(out, f)
'''


def _gpt2(seed: int = 0, n_layer: int = 1) -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=n_layer, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(cfg)


def _tokens(n: int = 128, seq: int = 9, seed: int = 1) -> torch.Tensor:
    # a learnable-ish pattern plus noise, so the random model is not at a stationary point
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 32, (n, 1), generator=gen)
    ids = (start + torch.arange(seq)) % 32
    flip = torch.rand(n, seq, generator=gen) < 0.3
    return torch.where(flip, torch.randint(0, 32, (n, seq), generator=gen), ids)


def _hf_dataset(ids: torch.Tensor):
    return datasets.Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")


def _combined_se_ok(a_mean, a_std, a_n, b_mean, b_std, b_n, k=3.0):
    se = math.sqrt(a_std**2 / a_n + b_std**2 / b_n)
    return abs(a_mean - b_mean) <= k * se, f"{a_mean:.4g} vs {b_mean:.4g}, {k} combined SE = {k * se:.3g}"


# ------------------------------------------------------------------------------------------------
# devinterp 1.3.2 in a subprocess, started first and run while the in-process tests run
# ------------------------------------------------------------------------------------------------
def _v1_cases() -> list[dict]:
    cases = []
    gen = torch.Generator().manual_seed(3)
    # a regression (the least-squares line, targets with noise), λ = 1
    reg, reg_data = oracles.make_regression_example()
    x, y = reg_data.tensors
    reg_data = TensorDataset(x, y + 0.2 * torch.randn(y.shape, generator=gen))
    # a deep linear network at a rank-1 teacher, targets with noise
    dln = oracles.make_dln([4, 3, 4], 1, seed=0)
    dln_data = oracles.dln_dataset(dln, 256, seed=1, input_range=1.0)
    dln_data = TensorDataset(dln_data.tensors[0], dln_data.tensors[1] + 0.3 * torch.randn(256, 4, generator=gen))
    # an MLP trained (briefly, full batch) on a teacher MLP's noisy outputs
    with torch.random.fork_rng():
        torch.manual_seed(4)
        teacher = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        mlp = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    x = torch.randn(192, 3, generator=gen)
    with torch.no_grad():
        y = teacher(x) + 0.1 * torch.randn(192, 2, generator=gen)
    opt = torch.optim.Adam(mlp.parameters(), lr=0.03)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.mse_loss(mlp(x), y).backward()
        opt.step()
    mlp_data = TensorDataset(x, y)
    # a GPT-2 language model from a tiny config, random init
    gpt, gpt_data = _gpt2(), TensorDataset(_tokens())
    models = {
        "regression": (reg, reg_data, 20, "ev_tensor", dict(lr=2e-3, nbeta=100 / math.log(100), localization=1.0)),
        "dln": (dln, dln_data, 32, "ev_tuple", dict(lr=1e-3, nbeta=50.0, localization=10.0)),
        "mlp": (mlp, mlp_data, 32, "ev_dict", dict(lr=1e-3, nbeta=50.0, localization=10.0)),
        "gpt2": (gpt, gpt_data, 16, "ev_object", dict(lr=1e-3, nbeta=10.0, localization=20.0)),
    }
    exact = dict(num_chains=2, num_draws=25, num_burnin_steps=5, num_steps_bw_draws=2, seed=1)
    stat = dict(num_chains=6, num_draws=100, num_burnin_steps=30, num_steps_bw_draws=1, seed=2)
    for name, (model, data, bs, ev, okw) in models.items():
        base = dict(model=model, dataset=data, batch_size=bs, evaluate=ev, method="devinterp.SGLD")
        cases.append(dict(base, id=f"{name}/exact", optimizer_kwargs=dict(okw, noise_level=0.0), run=exact))
        cases.append(dict(base, id=f"{name}/stat", optimizer_kwargs=okw, run=stat))
    # llc_fast's samplers passed to devinterp 1.3.2 itself
    dln_case = dict(model=dln, dataset=dln_data, batch_size=32, evaluate="ev_tuple")
    okw = models["dln"][4]
    for method in ("compat.SGLD", "compat.rmsprop_sgld", "devinterp.rmsprop_sgld"):
        cases.append(dict(dln_case, id=f"{method}/exact", method=method, optimizer_kwargs=dict(okw, noise_level=0.0),
                          run=exact))
        cases.append(dict(dln_case, id=f"{method}/stat", method=method, optimizer_kwargs=okw, run=stat))
    return cases


class _Child:
    def __init__(self, tmp: Path):
        self.cases = _v1_cases()
        torch.save(self.cases, tmp / "cases.pt")
        self.out = tmp / "out.json"
        env = dict(os.environ, PYTHONPATH=str(DEVINTERP1), OMP_NUM_THREADS="1")
        (tmp / "child.py").write_text(CHILD)
        self.proc = subprocess.Popen([sys.executable, str(tmp / "child.py"), str(tmp / "cases.pt"), str(self.out)],
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._results = None

    def results(self) -> dict:
        if self._results is None:
            _, err = self.proc.communicate(timeout=300)
            assert self.proc.returncode == 0, f"devinterp 1.3.2 subprocess failed:\n{err[-4000:]}"
            self._results = json.loads(self.out.read_text())
        return self._results

    def case(self, case_id: str) -> dict:
        return next(c for c in self.cases if c["id"] == case_id)


@pytest.fixture(scope="module", autouse=True)
def v1_child(tmp_path_factory):
    if not DEVINTERP1.joinpath("devinterp").is_dir():
        yield None
        return
    child = _Child(tmp_path_factory.mktemp("devinterp1"))
    yield child
    if child.proc.poll() is None:
        child.proc.kill()
        child.proc.communicate()


@pytest.fixture
def devinterp1(v1_child):
    if v1_child is None:
        pytest.skip(f"devinterp 1.3.2 is not installed in {DEVINTERP1} (pip install --no-deps --target .devinterp1 "
                    "devinterp==1.3.2 einops cloudpickle)")
    return v1_child


def _ours_v1(case: dict, method=None) -> dict:
    loader = DataLoader(case["dataset"], batch_size=case["batch_size"], shuffle=False)
    methods = {"devinterp.SGLD": compat.SGLD, "compat.SGLD": compat.SGLD,
               "compat.rmsprop_sgld": compat.SGMCMC.rmsprop_sgld, "devinterp.rmsprop_sgld": compat.RMSpropSGLD}
    return compat.estimate_learning_coeff_with_summary(
        copy.deepcopy(case["model"]), loader, evaluate=globals()[case["evaluate"]],
        sampling_method=method or methods[case["method"]], optimizer_kwargs=dict(case["optimizer_kwargs"]),
        verbose=False, **case["run"])


# ------------------------------------------------------------------------------------------------
# devinterp 2.x API (in-process against devinterp 2.0.1)
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dv2():
    pytest.importorskip("devinterp")
    import devinterp.slt.llc as dllc
    import devinterp.slt.sampler as dsampler
    import devinterp.slt.weight_restrictions as dwr

    if not hasattr(dllc, "llc"):
        pytest.skip("the installed devinterp is not 2.x")
    # devinterp runs gc.collect() twice per chain (memory hygiene, no effect on the numbers); with pytest's heap
    # that costs seconds per chain
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dsampler, "_gc_and_empty_cache", lambda: None)
        yield dllc, dwr, dsampler


def _structure(ds) -> dict:
    return {k: (v.dims, v.dtype, v.shape) for k, v in ds.data_vars.items()}


V2_EXACT = {
    "sgld": dict(sampling_method="sgmcmc_sgld", num_burnin_steps=3, localization=10.0),
    "rmsprop+mask+accum": dict(sampling_method="rmsprop_sgld", rmsprop_alpha=0.9, num_burnin_steps=2,
                               num_steps_bw_draws=2, gradient_accumulation_steps=2, localization=5.0,
                               llc_weight_decay=0.01, bounding_box_size=0.5, restriction="l0h1"),
}


@pytest.mark.parametrize("name", list(V2_EXACT))
def test_v2_llc_equals_devinterp_without_noise(dv2, name):
    dllc, dwr, _ = dv2
    kw = dict(V2_EXACT[name])
    restriction = kw.pop("restriction", None)
    model, ds = _gpt2(), _hf_dataset(_tokens())
    common = dict(lr=2e-3, n_beta=10.0, num_chains=2, num_draws=15, batch_size=8, num_init_loss_batches=8,
                  noise_level=0.0, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dllc.llc(copy.deepcopy(model), ds, {}, param_masks=restriction and dwr.create_param_masks(model, restriction),
                          **common)
        ours = compat.llc(model, ds, {}, param_masks=restriction and compat.create_param_masks(model, restriction),
                          progress=False, **common)
    assert _structure(ours) == _structure(theirs)
    assert list(ours.data_vars) == list(theirs.data_vars)
    np.testing.assert_allclose(float(ours.init_loss), float(theirs.init_loss), rtol=1e-6)
    np.testing.assert_allclose(ours.loss_trace.values, theirs.loss_trace.values, rtol=0, atol=2e-5)
    np.testing.assert_allclose(ours.llc_per_chain.values, theirs.llc_per_chain.values, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(float(ours.llc_mean), float(theirs.llc_mean), rtol=1e-4, atol=2e-4)
    assert abs(float(ours.llc_mean)) > 1e-3  # the chains moved: the comparison is not vacuous


def test_v2_llc_agrees_with_devinterp_with_noise(dv2):
    dllc, _, _ = dv2
    model, ds = _gpt2(), _hf_dataset(_tokens())
    kw = dict(lr=1e-3, n_beta=10.0, localization=20.0, num_chains=6, num_draws=100, batch_size=16,
              num_init_loss_batches=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dllc.llc(copy.deepcopy(model), ds, {}, **kw)
        ours = compat.llc(model, ds, {}, progress=False, **kw)
    n = kw["num_chains"]
    ddof1 = math.sqrt(n / (n - 1))  # 2.x's llc_std has ddof=0
    ok, msg = _combined_se_ok(float(ours.llc_mean), float(ours.llc_std) * ddof1, n,
                              float(theirs.llc_mean), float(theirs.llc_std) * ddof1, n)
    assert ok, msg
    assert float(ours.llc_mean) > 0.5


def test_v2_sample_structure_and_devinterp_compute_llc(dv2):
    dllc, _, _ = dv2
    from devinterp.slt.sampling import sample as dsample

    model, ds = _gpt2(), _hf_dataset(_tokens(64))
    kw = dict(lr=1e-3, n_beta=10.0, num_chains=2, num_draws=6, batch_size=8, num_burnin_steps=2, num_steps_bw_draws=2,
              localization=10.0, num_init_loss_batches=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dsample(copy.deepcopy(model), ds, {}, **kw)
        ours = compat.sample(model, ds, {}, progress=False, **kw)
        ours_by_devinterp = dllc.compute_llc(ours)  # devinterp's own reduction reads our DataTree
        ours_by_us = compat.compute_llc(ours)
    # same variables (sampling_input_ids_micro aside: llc_fast does not record the batches) and dim names;
    # the batch and token dims have size 1 (the mean loss of each step)
    theirs_vars = {k: v.dims for k, v in theirs.dataset.data_vars.items() if k != "sampling_input_ids_micro"}
    assert {k: v.dims for k, v in ours.dataset.data_vars.items()} == theirs_vars
    for k in theirs_vars:
        assert ours.dataset[k].sizes["chain"] == theirs.dataset[k].sizes["chain"]
    assert ours.dataset.sizes["step"] == theirs.dataset.sizes["step"] == 6 * 2 + 2
    assert ours.dataset.sizes["draw"] == theirs.dataset.sizes["draw"] == 6
    assert ours.attrs["metadata"]["config"]["sampler"] == theirs.attrs["metadata"]["config"]["sampler"]
    xr.testing.assert_allclose(ours_by_devinterp, ours_by_us)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        xr.testing.assert_allclose(compat.compute_llc(theirs), dllc.compute_llc(theirs))  # and ours reads theirs
    # draws are the steps num_burnin_steps + d * num_steps_bw_draws
    steps = ours.dataset.sampling_loss_micro.values[:, :, 0, 0]
    np.testing.assert_array_equal(ours.dataset.sampling_loss.values[:, :, 0, 0], steps[:, 2::2])


def test_v2_output_path_is_a_cache(tmp_path):
    model, ds = _gpt2(), _hf_dataset(_tokens(64))
    path = tmp_path / "samples.zarr"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compat.DevinterpCompatWarning)
        first = compat.sample(model, ds, {}, output_path=path, **_small_v2())
        again = compat.sample(model, ds, {}, output_path=path, **_small_v2())  # read back, not re-run
        xr.testing.assert_identical(compat.compute_llc(first), compat.compute_llc(again))
    assert again.attrs["completed"] == 1
    with pytest.raises(RuntimeError, match="different sampler config"):
        compat.sample(model, ds, {}, output_path=path, **_small_v2(lr=2e-3))


def test_v2_sampler_classes_in_devinterp_chain_runner(dv2):
    """devinterp 2.0.1's chain runner (sample_single_chain) takes an optimizer class: ours steps like its own."""
    _, _, dsampler = dv2
    from devinterp.optim import SGMCMC as DSGMCMC
    from devinterp.slt.lm_loss import make_evaluate_fn

    model, ds = _gpt2(), _hf_dataset(_tokens(64))
    traces = {}
    for name, method in (("devinterp", DSGMCMC.sgld), ("llc_fast", compat.SGMCMC.sgld)):
        losses = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dsampler.sample_single_chain(
                model, ds, make_evaluate_fn(None), {n: None for n, _ in model.named_parameters()}, num_draws=12,
                sampling_method=method, sampling_method_kwargs=dict(lr=2e-3, nbeta=10.0, localization=10.0,
                                                                    noise_level=0.0, weight_decay=0.0,
                                                                    bounding_box_size=None, save_metrics=False),
                seed=3, dataloader_seed=3, batch_size=8, callbacks=[lambda loss, **_: losses.append(float(loss.mean()))])
        traces[name] = np.array(losses)
    np.testing.assert_allclose(traces["llc_fast"], traces["devinterp"], rtol=0, atol=2e-5)
    assert np.ptp(traces["llc_fast"]) > 1e-3


def test_create_param_masks_matches_devinterp(dv2):
    _, dwr, _ = dv2
    gpt = _gpt2(n_layer=2)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4))
    specs = ["full", "embed", "l1", "l0 attn", "l1 mlp", "l0h1", "l1h0", "l0g1", ["l0h0", "l0h1"], ["l0 mlp", "embed"],
             "transformer.h.0.ln_1.weight"]
    for model in (gpt, llama, neox):
        for spec in specs:
            if isinstance(spec, str) and spec.startswith("transformer.") and model is not gpt:
                continue
            theirs, ours = dwr.create_param_masks(model, spec), compat.create_param_masks(model, spec)
            assert list(ours) == list(theirs), (type(model).__name__, spec)
            for name in theirs:
                if theirs[name] is None:
                    assert ours[name] is None, (spec, name)
                else:
                    assert torch.equal(ours[name], theirs[name]), (type(model).__name__, spec, name)
        assert list(compat.create_param_masks(model, "unembed")) in ([n for n, _ in model.named_parameters()
                                                                       if n.endswith(k)] for k in
                                                                      ("lm_head.weight", "embed_out.weight", "wte.weight"))
    with pytest.raises(ValueError, match="out of range"):
        compat.create_param_masks(gpt, "l5")
    with pytest.raises(ValueError, match="Unknown restriction"):
        compat.create_param_masks(gpt, "l0 foo")


# ------------------------------------------------------------------------------------------------
# conventions and the once-only warning
# ------------------------------------------------------------------------------------------------
def _small_v2(**kw):
    args = dict(lr=1e-3, n_beta=10.0, num_chains=3, num_draws=8, batch_size=8, num_burnin_steps=4,
                localization=10.0, num_init_loss_batches=4, progress=False)
    args.update(kw)
    return args


def test_v2_conventions_and_warning_once():
    model, ds = _gpt2(), _hf_dataset(_tokens(64))
    compat.reset_warnings()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = compat.llc(model, ds, {}, **_small_v2())
        compat.llc(model, ds, {}, **_small_v2(num_chains=2))
        samples = compat.sample(model, ds, {}, **_small_v2())
        b = compat.compute_llc(samples)
        native = compat.compute_llc(samples, conventions="llc_fast")
    ours = [w for w in caught if issubclass(w.category, compat.DevinterpCompatWarning)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "burn-in" in str(ours[0].message) and "llc_fast.estimate_llc" in str(ours[0].message)
    assert ours[0].filename == __file__  # points at the caller
    xr.testing.assert_identical(a, b)  # same seed, same batches: the same run
    trace = samples.dataset.sampling_loss_micro.values[:, :, 0, 0].astype(np.float64)
    init = float(samples.dataset.init_loss.mean())
    per_chain = 10.0 * (trace[:, 4:].mean(axis=1) - init)  # draws only
    np.testing.assert_allclose(native.llc_per_chain.values, per_chain, rtol=1e-5)
    np.testing.assert_allclose(float(native.llc_std), per_chain.std(ddof=1), rtol=1e-4)
    devinterp_per_chain = 10.0 * (trace.mean(axis=1) - init)  # burn-in averaged in
    np.testing.assert_allclose(b.llc_per_chain.values, devinterp_per_chain, rtol=1e-5)
    np.testing.assert_allclose(float(b.llc_std), devinterp_per_chain.std(ddof=0), rtol=1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compat.reset_warnings()
        compat.llc(model, ds, {}, conventions="llc_fast", **_small_v2(num_chains=2))
    assert not [w for w in caught if issubclass(w.category, compat.DevinterpCompatWarning)]


def _diverging_loss(threshold):
    def loss_fn(model, input_ids):
        per_token = compat.per_token_loss(model, input_ids)
        return torch.where(per_token.mean() > threshold, torch.full_like(per_token, math.nan), per_token)
    return loss_fn


def test_v2_diverged_chain_keeps_the_steps_it_ran():
    model, ds = _gpt2(), _hf_dataset(_tokens(64))
    with torch.no_grad():
        init = float(compat.per_token_loss(model, ds[:64]["input_ids"]).mean())
    kw = _small_v2(num_chains=6, num_draws=40, num_burnin_steps=0, lr=1e-3, n_beta=10.0, localization=1.0,
                   loss_fn=_diverging_loss(init + 0.52))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = compat.sample(model, ds, {}, **kw)
        dv = compat.compute_llc(samples)
        native = compat.compute_llc(samples, conventions="llc_fast")
    trace = samples.dataset.sampling_loss_micro.values[:, :, 0, 0].astype(np.float64)
    diverged = [c for c in range(6) if np.isnan(trace[c]).any()]
    assert 0 < len(diverged) < 6, "the test needs some chains to diverge and some not"
    failed = [w for w in caught if "Chain failed" in str(w.message)]
    assert len(failed) == len(diverged)
    for c in diverged:  # NaN from the failure on, like devinterp's unfilled zarr rows
        first = np.flatnonzero(np.isnan(trace[c]))[0]
        assert np.isnan(trace[c, first:]).all() and np.isfinite(trace[c, :first]).all()
    init_loss = float(samples.dataset.init_loss.mean())
    np.testing.assert_allclose(dv.llc_per_chain.values, 10.0 * (np.nanmean(trace, axis=1) - init_loss), rtol=1e-5)
    assert np.isfinite(float(dv.llc_mean))  # devinterp 2.x: a finite estimate, diverged chains shortened
    assert np.isnan(native.llc_per_chain.values[diverged]).all()  # native rules: left out
    ok = [c for c in range(6) if c not in diverged]
    np.testing.assert_allclose(float(native.llc_mean), native.llc_per_chain.values[ok].mean(), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# devinterp 1.x API against devinterp 1.3.2
# ------------------------------------------------------------------------------------------------
V1_MODELS = ["regression", "dln", "mlp", "gpt2"]


@pytest.mark.parametrize("name", V1_MODELS)
def test_v1_equals_devinterp_132_without_noise(devinterp1, name):
    case = devinterp1.case(f"{name}/exact")
    ours = _ours_v1(case)
    theirs = devinterp1.results()[case["id"]]
    assert list(ours) == theirs["keys"] == ["llc/mean", "llc/std", "llc-chain/0", "llc-chain/1", "loss/trace"]
    assert str(ours["loss/trace"].dtype) == theirs["trace_dtype"]
    np.testing.assert_allclose(ours["loss/trace"], np.array(theirs["loss/trace"]), rtol=2e-5, atol=1e-6)
    for k in ("llc/mean", "llc-chain/0", "llc-chain/1"):
        assert isinstance(ours[k], float)
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-4, atol=1e-4)
    assert np.ptp(ours["loss/trace"]) > 1e-4  # the chains moved


@pytest.mark.parametrize("name", V1_MODELS)
def test_v1_agrees_with_devinterp_132_with_noise(devinterp1, name):
    case = devinterp1.case(f"{name}/stat")
    ours = _ours_v1(case)
    theirs = devinterp1.results()[case["id"]]
    n = case["run"]["num_chains"]
    ok, msg = _combined_se_ok(ours["llc/mean"], ours["llc/std"], n, theirs["llc/mean"], theirs["llc/std"], n)
    assert ok, f"{name}: {msg}"
    assert ours["loss/trace"].shape == np.array(theirs["loss/trace"]).shape == (n, case["run"]["num_draws"])


@pytest.mark.parametrize("method", ["compat.SGLD", "compat.rmsprop_sgld"])
def test_v1_sampler_classes_inside_devinterp_132(devinterp1, method):
    """llc_fast's optimizers passed as sampling_method to devinterp 1.3.2's own estimator."""
    reference = "devinterp.SGLD" if method == "compat.SGLD" else "devinterp.rmsprop_sgld"
    results = devinterp1.results()
    exact_ref = results["dln/exact"] if reference == "devinterp.SGLD" else results[f"{reference}/exact"]
    exact = results[f"{method}/exact"]
    np.testing.assert_allclose(exact["loss/trace"], exact_ref["loss/trace"], rtol=2e-5, atol=1e-6)
    stat_ref = results["dln/stat"] if reference == "devinterp.SGLD" else results[f"{reference}/stat"]
    stat = results[f"{method}/stat"]
    n = devinterp1.case(f"{method}/stat")["run"]["num_chains"]
    ok, msg = _combined_se_ok(stat["llc/mean"], stat["llc/std"], n, stat_ref["llc/mean"], stat_ref["llc/std"], n)
    assert ok, msg
    # and our estimator with the same sampler agrees with devinterp running it
    ours = _ours_v1(devinterp1.case(f"{method}/stat"))
    ok, msg = _combined_se_ok(ours["llc/mean"], ours["llc/std"], n, stat["llc/mean"], stat["llc/std"], n)
    assert ok, msg


# ------------------------------------------------------------------------------------------------
# 1.x API on its own
# ------------------------------------------------------------------------------------------------
def _dln_loader(bs=32):
    model = oracles.make_dln([4, 3, 4], 1, seed=0)
    data = oracles.dln_dataset(model, 128, seed=1, input_range=1.0)
    gen = torch.Generator().manual_seed(9)
    data = TensorDataset(data.tensors[0], data.tensors[1] + 0.3 * torch.randn(128, 4, generator=gen))
    return model, DataLoader(data, batch_size=bs, shuffle=False)


V1_FAST = dict(optimizer_kwargs=dict(lr=1e-3, nbeta=50.0, localization=10.0), num_chains=3, num_draws=10, seed=0,
               verbose=False)


def test_v1_evaluate_return_types_and_online_keys():
    model, loader = _dln_loader()
    results = [compat.estimate_learning_coeff_with_summary(model, loader, evaluate=ev, **V1_FAST)
               for ev in (ev_tensor, ev_tuple, ev_dict, lambda m, b: Out(ev_tensor(m, b)))]
    for r in results[1:]:
        assert r["llc/mean"] == results[0]["llc/mean"]
        np.testing.assert_array_equal(r["loss/trace"], results[0]["loss/trace"])
    # evaluate=None: the model returns the loss itself
    wrapped = nn.Module()
    wrapped.net = copy.deepcopy(model)
    wrapped.forward = lambda batch: ev_tensor(wrapped.net, batch)
    assert compat.estimate_learning_coeff_with_summary(wrapped, loader, **V1_FAST)["llc/mean"] == results[0]["llc/mean"]
    assert compat.estimate_learning_coeff(model, loader, evaluate=ev_tensor, **V1_FAST) == results[0]["llc/mean"]
    online = compat.estimate_learning_coeff_with_summary(model, loader, evaluate=ev_tensor, online=True, **V1_FAST)
    assert list(online) == ["init_loss", "llc/means", "llc/stds", "llc/trace", "loss/trace"]
    assert online["llc/trace"].shape == (3, 10) and online["llc/means"].shape == (10,)
    np.testing.assert_allclose(online["llc/trace"].mean(axis=1).mean(), results[0]["llc/mean"], rtol=1e-5)
    # grad_accum_steps: 2 micro-batches of 16 per step == 1 batch of 32 (mean losses, equal sizes)
    _, loader16 = _dln_loader(16)
    accum = compat.estimate_learning_coeff_with_summary(model, loader16, evaluate=ev_tensor, grad_accum_steps=2,
                                                        **V1_FAST)
    np.testing.assert_allclose(accum["loss/trace"], results[0]["loss/trace"], rtol=1e-5, atol=1e-6)


def test_sampler_classes_map_onto_estimate_llc_samplers(dv2):
    """sampling_method: ours or devinterp's classes and factories, recognised and mapped onto estimate_llc."""
    from devinterp.optim import SGLD as DSGLD
    from devinterp.optim import SGMCMC as DSGMCMC

    model, loader = _dln_loader()

    def run(method, **okw):
        kw = dict(V1_FAST, optimizer_kwargs=dict(V1_FAST["optimizer_kwargs"], **okw))
        return compat.estimate_learning_coeff_with_summary(model, loader, evaluate=ev_tensor, sampling_method=method,
                                                           **kw)["llc/mean"]

    sgld, rmsprop = run(compat.SGLD), run(compat.RMSpropSGLD)
    assert sgld != rmsprop
    assert run(DSGLD) == run(DSGMCMC.sgld) == run(compat.SGMCMC.sgld) == run("sgld") == sgld
    assert run(DSGMCMC.rmsprop_sgld) == run(compat.SGMCMC.rmsprop_sgld) == rmsprop
    assert run(compat.SGMCMC, preconditioner="rmsprop") == rmsprop
    assert run(compat.RMSpropSGLD, alpha=0.9) != rmsprop
    gpt, ds = _gpt2(), _hf_dataset(_tokens(32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", compat.DevinterpCompatWarning)
        a = compat.llc(gpt, ds, {}, **_small_v2(sampling_method=compat.RMSpropSGLD))
        b = compat.llc(gpt, ds, {}, **_small_v2(sampling_method="rmsprop_sgld"))
    xr.testing.assert_identical(a, b)


def test_v1_nbeta_default_warns_once_and_uses_batch_size():
    model, loader = _dln_loader()
    compat.reset_warnings()
    kw = dict(V1_FAST, optimizer_kwargs=dict(lr=1e-3, localization=10.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = compat.estimate_learning_coeff_with_summary(model, loader, evaluate=ev_tensor, **kw)
        compat.estimate_learning_coeff_with_summary(model, loader, evaluate=ev_tensor, **kw)
    ours = [w for w in caught if issubclass(w.category, compat.DevinterpCompatWarning)]
    assert len(ours) == 1 and "B/log(B)" in str(ours[0].message)
    b = compat.estimate_learning_coeff_with_summary(
        model, loader, evaluate=ev_tensor, **dict(V1_FAST, optimizer_kwargs=dict(lr=1e-3, localization=10.0,
                                                                                  nbeta=32 / math.log(32))))
    assert a["llc/mean"] == b["llc/mean"]


def test_v1_restriction_freezes_weights():
    model, loader = _dln_loader()
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in model.named_parameters()}
    # devinterp samples nothing and reports the minibatch noise of the loss at w* as an LLC; llc_fast refuses
    with pytest.raises(ValueError, match="the mask samples nothing"):
        compat.estimate_learning_coeff_with_summary(model, loader, evaluate=ev_tensor,
                                                    optimize_over_per_model_param=masks, **V1_FAST)
    masks["0.weight"][0, 0] = True  # one weight free: only it moves
    one = compat.estimate_learning_coeff_with_summary(model, loader, evaluate=ev_tensor,
                                                      optimize_over_per_model_param=masks, **V1_FAST)
    assert np.isfinite(one["llc/mean"])
    with pytest.raises(ValueError, match="every parameter"):
        compat.estimate_learning_coeff_with_summary(model, loader, evaluate=ev_tensor,
                                                    optimize_over_per_model_param={"0.weight": masks["0.weight"]},
                                                    **V1_FAST)


def test_v1_diverged_chain_raises_like_devinterp():
    model, loader = _dln_loader()
    with pytest.raises(compat.ChainDivergedError, match="(NaN|Inf) detected in loss at chain") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compat.estimate_learning_coeff_with_summary(model, loader, evaluate=ev_tensor,
                                                        **dict(V1_FAST, optimizer_kwargs=dict(lr=10.0, nbeta=1e4)))
    assert info.value.result.diverged_chains


def test_bad_input_gives_clear_errors():
    model, loader = _dln_loader()
    call = compat.estimate_learning_coeff_with_summary
    with pytest.raises(ValueError, match="optimizer_kwargs is required"):
        call(model, loader, evaluate=ev_tensor)
    with pytest.raises(NotImplementedError, match="callbacks"):
        call(model, loader, callbacks=[object()], evaluate=ev_tensor, **V1_FAST)
    with pytest.raises(ValueError, match="evaluate must return"):
        call(model, loader, evaluate=lambda m, b: "loss", **V1_FAST)
    with pytest.raises(ValueError, match="scalar mean loss"):
        call(model, loader, evaluate=lambda m, b: (m(b[0]) - b[1]) ** 2, **V1_FAST)
    with pytest.raises(TypeError, match="does not take"):
        call(model, loader, evaluate=ev_tensor, **dict(V1_FAST, optimizer_kwargs=dict(lr=1e-3, nbeta=5.0, alpha=0.9)))
    gpt, ds = _gpt2(), _hf_dataset(_tokens(32))
    with pytest.raises(ValueError, match="Unknown sampling method"):
        compat.llc(gpt, ds, {}, lr=1e-3, n_beta=10.0, sampling_method="sgnht")
    with pytest.raises(ValueError, match="rmsprop_eps can only be set"):
        compat.llc(gpt, ds, {}, lr=1e-3, n_beta=10.0, rmsprop_eps=0.1)
    with pytest.raises(ValueError, match="must be >= num_samples"):  # devinterp's check of an observable's size
        compat.sample(gpt, ds, {"other": ds}, lr=1e-3, n_beta=10.0)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        compat.llc(gpt, ds, {}, lr=1e-3, n_beta=10.0, param_masks={"nope": None})
    with pytest.raises(ValueError, match="per-token loss of shape"):
        compat.llc(gpt, ds, {}, lr=1e-3, n_beta=10.0, batch_size=8, progress=False,
                   loss_fn=lambda m, ids: compat.per_token_loss(m, ids).mean())


# ------------------------------------------------------------------------------------------------
# the optimizer classes
# ------------------------------------------------------------------------------------------------
def _mlp_and_batches():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 3, generator=gen), torch.randn(96, 2, generator=gen)
    return model, [(x[i:i + 16], y[i:i + 16]) for i in range(0, 96, 16)]


@pytest.mark.parametrize("make", [
    lambda ps, c: compat.SGLD(ps, lr=1e-3, nbeta=50.0, localization=5.0, seed=7, chain=c),
    lambda ps, c: compat.SGMCMC.sgld(ps, lr=1e-3, nbeta=50.0, localization=5.0, seed=7, chain=c),
    lambda ps, c: compat.RMSpropSGLD(ps, lr=1e-3, nbeta=50.0, localization=5.0, seed=7, chain=c),
], ids=["SGLD", "SGMCMC.sgld", "RMSpropSGLD"])
def test_manual_loop_reproduces_estimate_llc(make):
    """A 1.x-style loop with the optimizer class gives estimate_llc's chains (same noise keys, same batches)."""
    model, batches = _mlp_and_batches()
    sampler = "rmsprop_sgld" if isinstance(make([nn.Parameter(torch.zeros(1))], 0), compat.RMSpropSGLD) else "sgld"
    ref = llc_fast.estimate_llc(model, batches, oracles.mse_loss, sampler=sampler, lr=1e-3, nbeta=50.0, gamma=5.0,
                                num_chains=3, num_draws=30, seed=7, progress=False, chain_batching="sequential")
    traces = []
    for c in range(3):
        m = copy.deepcopy(model)
        opt = make(m.parameters(), c)
        trace = []
        for t in range(30):
            opt.zero_grad()
            loss = oracles.mse_loss(m, batches[t % len(batches)])
            loss.backward()
            trace.append(loss.item())
            opt.step()
        traces.append(trace)
    np.testing.assert_allclose(np.array(traces), ref.loss_trace, rtol=1e-6, atol=1e-7)
    per_chain = 50.0 * (np.array(traces).mean(axis=1) - ref.init_loss)
    np.testing.assert_allclose(per_chain.mean(), ref.llc_mean, rtol=1e-5)
    np.testing.assert_allclose(per_chain.std(ddof=1), ref.llc_std, rtol=1e-4)


def test_optimizer_is_one_fused_call_over_flat_buffers(monkeypatch):
    model, batches = _mlp_and_batches()
    params = list(model.parameters())
    masks = {n: (torch.rand(p.shape) > 0.5) for n, p in model.named_parameters()}
    groups = [{"params": p, "optimize_over": masks[n]} for n, p in model.named_parameters()]  # 1.x's layout
    opt = compat.SGLD(groups, lr=1e-3, nbeta=50.0, localization=5.0, seed=1)
    assert isinstance(opt, torch.optim.Optimizer)
    (buf,) = opt.flat_buffers()
    storage = buf["w"].untyped_storage().data_ptr()
    assert all(p.untyped_storage().data_ptr() == storage for p in params)  # params are views of one buffer
    calls = []
    update = opt._update[torch.device("cpu")]
    opt._update[torch.device("cpu")] = lambda *a, **k: (calls.append(k["index_offset"]), update(*a, **k))
    w0 = [p.detach().clone() for p in params]
    for t in range(3):
        model.zero_grad()  # set_to_none: the optimizer re-attaches the flat gradient views
        oracles.mse_loss(model, batches[t]).backward()
        opt.step()
    assert calls == [0, 0, 0]  # one kernel call per step for the four param groups
    for p, p0, m in zip(params, w0, masks.values()):
        assert torch.equal(p.detach()[~m], p0[~m])  # masked entries never move
        assert not torch.equal(p.detach()[m], p0[m])
        assert p.grad.untyped_storage().data_ptr() == buf["grad"].untyped_storage().data_ptr()
    # groups with different hyperparameters: one call per run of equal groups, noise keyed by global index
    model2, _ = _mlp_and_batches()
    ps = list(model2.parameters())
    opt2 = compat.SGLD([{"params": ps[:2]}, {"params": ps[2:], "lr": 2e-3}], lr=1e-3, nbeta=50.0, seed=1)
    calls.clear()
    update2 = opt2._update[torch.device("cpu")]
    opt2._update[torch.device("cpu")] = lambda *a, **k: (calls.append(k["index_offset"]), update2(*a, **k))
    oracles.mse_loss(model2, batches[0]).backward()
    opt2.step()
    assert calls == [0, ps[0].numel() + ps[1].numel()]
    with pytest.raises(NotImplementedError, match="save_metrics"):  # metrics=[...] is computed (test_compat_optim_metrics)
        compat.SGLD(model.parameters(), save_metrics=True)


def test_compat_optimizers_validate_their_hyperparameters():
    from llc_fast.compat import devinterp as compat

    params = nn.Linear(3, 1).parameters
    for kw, message in [(dict(lr=-1e-3), "lr must be a finite number >= 0"), (dict(lr=float("nan")), "lr must be"),
                        (dict(nbeta=-1.0), "nbeta must be a finite number > 0"),
                        (dict(localization=-1.0), "localization must be a finite number >= 0")]:
        with pytest.raises(ValueError, match=message):
            compat.SGLD(params(), **kw)
        with pytest.raises(ValueError, match=message):
            compat.SGMCMC.rmsprop_sgld(params(), **kw)
