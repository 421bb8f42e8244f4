"""llc_fast.compat.devinterp's ``susceptibilities``/``compute_susceptibilities`` and ``sample(observables=...)``
against devinterp 2.0.1: the same output layout, the same numbers on noise-free chains, devinterp's formula
on llc_fast's chains, one batched run for all weight restrictions, devinterp's errors and observable rows."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import llc_fast.compat.devinterp.runs as compat_runs
from llc_fast.compat import devinterp as compat

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
xr = pytest.importorskip("xarray")

SEQ = 9  # tokens per row: 8 predicted positions


def _gpt2() -> torch.nn.Module:
    cfg = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                  attn_implementation="eager")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg)


def _dataset(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict({"input_ids": torch.randint(0, 50, (n, SEQ), generator=gen).tolist()}) \
        .with_format("torch")


MAIN, A, B = _dataset(64, 1), _dataset(40, 2), _dataset(30, 3)
# ids after to_obs_id: main_set, b_x, a (sorted: a, b_x); b.x reads 1 batch per draw, the others batches_per_draw
OBSERVABLES = {"main-set": MAIN, "b.x": (B, 1), "a": A}
PROBES = ["a", "b_x"]


def _restrictions(model) -> dict:
    # dict order is not sorted order; "mix" has masked (l0h1) and whole (l0 mlp) parameters
    return {"full": None, "mix": compat.create_param_masks(model, ["l0h1", "l0 mlp"]),
            "embed": compat.create_param_masks(model, "embed")}


COMMON = dict(sampling_task="main-set", lr=3e-3, n_beta=10.0, batch_size=4, batches_per_draw=2,
              num_init_loss_batches=4, localization=10.0, num_burnin_steps=1, num_steps_bw_draws=2, device="cpu")


@pytest.fixture(scope="module")
def devinterp_slt():
    pytest.importorskip("devinterp")
    import devinterp.slt.sampler as dsampler

    try:
        import devinterp.slt.observables as dobservables
        import devinterp.slt.sampling as dsampling
        import devinterp.slt.susceptibilities as dsus
    except ImportError:
        pytest.skip("the installed devinterp is not 2.x")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dsampler, "_gc_and_empty_cache", lambda: None)  # two gc.collect() per chain: seconds under pytest
        yield dsus, dsampling, dobservables


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    """Our susceptibilities with noise, the per-restriction sample trees (output_path), and the llc_fast runs."""
    model = _gpt2()
    path = tmp_path_factory.mktemp("sus") / "samples.zarr"
    calls = []
    real = compat_runs.estimate_config

    def spy(model, data, loss_fn, config, observers=None):
        calls.append(config)
        return real(model, data, loss_fn, config, observers)

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.setattr(compat_runs, "estimate_config", spy)
        out = compat.susceptibilities(model, MAIN, OBSERVABLES, _restrictions(model), num_chains=3, num_draws=6,
                                      output_path=path, progress=False, **COMMON)
        runs = list(calls)
        again = compat.susceptibilities(model, MAIN, OBSERVABLES, _restrictions(model), num_chains=3, num_draws=6,
                                        output_path=path, progress=False, **COMMON)
    trees = {name: xr.open_datatree(str(path.parent / f"samples_{name}.zarr"), engine="zarr", consolidated=False)
             for name in _restrictions(model)}
    return dict(out=out, again=again, trees=trees, runs=runs, reruns=calls[len(runs):])


def _layout(tree) -> dict:
    out = {}
    for group in ("susceptibilities", "context"):
        ds = tree[group].dataset
        out[group] = dict(
            dims=dict(ds.sizes), attrs=ds.attrs,
            vars={k: (v.dims, v.dtype) for k, v in ds.data_vars.items()},
            coords={k: (v.dims, v.dtype, v.values.tolist()) for k, v in ds.coords.items()})
    return out


def test_layout_and_noise_free_values_equal_devinterps(devinterp_slt):
    """No noise: devinterp's chains and ours are the same, so is every number; the layout is devinterp's."""
    dsus, _, _ = devinterp_slt
    model = _gpt2()
    kw = dict(COMMON, num_chains=1, num_draws=4, noise_level=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dsus.susceptibilities(copy.deepcopy(model), MAIN, OBSERVABLES, _restrictions(model), **kw)
        ours = compat.susceptibilities(model, MAIN, OBSERVABLES, _restrictions(model), progress=False, **kw)
    assert set(ours.children) == set(theirs.children) == {"susceptibilities", "context"}
    assert _layout(ours) == _layout(theirs)
    sus = ours["susceptibilities"]
    assert sus.sus.dims == ("sus_flat", "wr") and sus.sus.dtype == np.float32
    assert list(sus.wr.values) == ["mix", "embed"] and sus.attrs["dataset_id_to_name"] == PROBES
    assert sus.sizes["sus_flat"] == (8 + 4) * (SEQ - 1)  # a: 2 batches x 4 rows, b_x: 1 x 4; 8 target positions
    assert list(np.unique(sus.target_position.values)) == list(range(1, SEQ))
    np.testing.assert_array_equal(ours["context"].input_ids.values, theirs["context"].input_ids.values)
    got, want = ours["susceptibilities"].sus.values, theirs["susceptibilities"].sus.values
    assert np.abs(want).max() > 1e-5  # not vacuous
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_all_restrictions_are_one_batched_run(noisy):
    (config,) = noisy["runs"]
    assert config.component_names == ["full", "mix", "embed"] and config.num_chains == 3
    assert dict(config.components)["full"] is None
    assert not noisy["reruns"]  # the second call read every restriction back from its zarr
    xr.testing.assert_identical(noisy["again"], noisy["out"])
    trees = noisy["trees"]
    for name in ("mix", "embed"):  # chains differ by restriction; observable rows do not
        assert not np.allclose(trees[name].dataset.loss_a.values, trees["full"].dataset.loss_a.values)
        np.testing.assert_array_equal(trees[name].dataset.input_ids_a.values, trees["full"].dataset.input_ids_a.values)


def test_devinterps_compute_susceptibilities_on_our_samples(noisy, devinterp_slt):
    dsus, _, _ = devinterp_slt
    theirs = dsus.compute_susceptibilities(noisy["trees"], "main-set")
    assert _layout(theirs) == _layout(noisy["out"])
    np.testing.assert_allclose(noisy["out"]["susceptibilities"].sus.values, theirs["susceptibilities"].sus.values,
                               rtol=0, atol=1e-6)
    for kw in (dict(include_sampling_task=True), dict(observable_names=["b.x"])):
        ours, ref = compat.compute_susceptibilities(noisy["trees"], "main-set", **kw), \
            dsus.compute_susceptibilities(noisy["trees"], "main-set", **kw)
        assert _layout(ours) == _layout(ref)
        np.testing.assert_allclose(ours["susceptibilities"].sus.values, ref["susceptibilities"].sus.values, atol=1e-6)
    with pytest.raises(ValueError) as ours_err:
        compat.compute_susceptibilities(noisy["trees"], "main-set", observable_names=[])
    with pytest.raises(ValueError) as their_err:
        dsus.compute_susceptibilities(noisy["trees"], "main-set", observable_names=[])
    assert str(ours_err.value) == str(their_err.value)


def test_susceptibility_by_hand(noisy):
    """sus[b, t] = A(phi (L - l[b, t])) - A(phi) (A_full(L) - A_full(l[b, t])), phi = L - L_full(w*), from the
    per-token losses of the samples, in float64."""
    trees = {k: t.dataset for k, t in noisy["trees"].items()}
    full = trees["full"]
    init = full.init_loss.values.astype(np.float64).mean()
    sus = noisy["out"]["susceptibilities"]
    assert sus.attrs["dataset_id_to_name"] == PROBES
    for wr in ("mix", "embed"):
        L = trees[wr].loss_main_set.values.astype(np.float64).mean(axis=(2, 3))  # [chain, draw]
        phi = L - init
        assert L.shape == (3, 6) and np.ptp(phi) > 0
        want = {}
        for oid in PROBES:
            loss = trees[wr][f"loss_{oid}"].values.astype(np.float64)
            full_gap = full.loss_main_set.values.astype(np.float64).mean() - \
                full[f"loss_{oid}"].values.astype(np.float64).mean(axis=(0, 1))
            want[oid] = np.einsum("cd,cdbt->bt", phi, L[:, :, None, None] - loss) / phi.size - phi.mean() * full_gap
        ids, batch, pos = (sus[k].values for k in ("dataset_id", "batch", "target_position"))
        expected = np.array([want[PROBES[i]][b, p - 1] for i, b, p in zip(ids, batch, pos)])
        got = sus.sus.sel(wr=wr).values
        assert np.abs(expected).max() > 1e-5
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-7)


def test_bad_inputs_raise_devinterps_errors(devinterp_slt):
    dsus, _, _ = devinterp_slt
    model = _gpt2()
    cases = [
        (dict(weight_restrictions={"mix": _restrictions(model)["mix"]}), dict(COMMON)),
        (dict(weight_restrictions=_restrictions(model)), dict(COMMON, sampling_task="pile")),
        (dict(weight_restrictions=_restrictions(model), observables={"main-set": MAIN}), dict(COMMON)),
    ]
    for args, kw in cases:
        call = dict(dict(observables=OBSERVABLES), **args)
        with pytest.raises(ValueError) as ours:
            compat.susceptibilities(model, MAIN, **call, **kw)
        with pytest.raises(ValueError) as theirs:
            dsus.susceptibilities(model, MAIN, **call, **kw)
        assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="must include a 'full' key"):
        compat.susceptibilities(model, MAIN, OBSERVABLES, {"mix": None}, **COMMON)
    with pytest.raises(ValueError, match="sampling_task 'pile' not found in observables"):
        compat.susceptibilities(model, MAIN, OBSERVABLES, {"full": None}, **dict(COMMON, sampling_task="pile"))
    with pytest.raises(TypeError, match="param_masks"):
        compat.susceptibilities(model, MAIN, OBSERVABLES, {"full": None}, param_masks={}, **COMMON)
    with pytest.raises(ValueError, match=r"Dataset size \(30\) must be >= num_samples \(32\)"):
        compat.sample(model, MAIN, {"b": (B, 8)}, lr=1e-3, n_beta=10.0, batch_size=4)


def test_sample_observables_rows_and_noise_free_losses_equal_devinterps(devinterp_slt, tmp_path, monkeypatch):
    """sample(observables=): devinterp's rows (its DeterministicShuffledSampler with obs_seed) and, without
    noise, its per-token losses at every draw (taken after the draw's step), here with a restriction and the
    losses in .npy files (the in-memory limit set to 0)."""
    import tempfile

    import llc_fast.estimators.susceptibility as native

    _, dsampling, dobservables = devinterp_slt
    monkeypatch.setattr(native, "IN_MEMORY_LIMIT", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = _gpt2()
    observables = {"a": A, "b.x": (B, 1)}
    kw = dict(lr=3e-3, n_beta=10.0, num_chains=1, num_draws=3, batch_size=4, batches_per_draw=2, obs_seed=7,
              num_init_loss_batches=4, localization=10.0, num_burnin_steps=1, num_steps_bw_draws=2, noise_level=0.0,
              device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = dsampling.sample(copy.deepcopy(model), MAIN, observables,
                                  param_masks=_restrictions(model)["mix"], **kw).dataset
        ours = compat.sample(model, MAIN, observables, param_masks=_restrictions(model)["mix"],
                             progress=False, **kw).dataset
    for oid, ds, bpd in (("a", A, 2), ("b_x", B, 1)):
        picked = dobservables.Observable(dataset=ds, task_name=oid, batches_per_draw=bpd, batch_size=4,
                                         context_length=SEQ - 1, device=torch.device("cpu"), seed=7).input_ids
        assert ours[f"input_ids_{oid}"].dims == (f"batch_{oid}", "token")
        np.testing.assert_array_equal(ours[f"input_ids_{oid}"].values, picked.numpy())
        loss = ours[f"loss_{oid}"]
        assert loss.dims == ("chain", "draw", f"batch_{oid}", "token_pos") and loss.dtype == np.float32
        assert loss.shape == (1, 3, 4 * bpd, SEQ - 1)
        np.testing.assert_allclose(loss.values, theirs[f"loss_{oid}"].values, rtol=0, atol=2e-5)
    assert np.ptp(ours.loss_a.values.mean(axis=(2, 3))) > 1e-4  # the draws differ: the alignment is tested
    assert sorted(p.name for p in tmp_path.glob("llc_fast_observables_*/*.npy")) == ["token_losses_a.npy",
                                                                                    "token_losses_b_x.npy"]
    want = {k: v.dims for k, v in theirs.data_vars.items() if k != "sampling_input_ids_micro"}
    assert {k: v.dims for k, v in ours.data_vars.items()} == want
    assert ours.sizes["token_pos"] == SEQ - 1 and ours.sizes["draw"] == 3 and ours.sizes["step"] == 7
    assert ours.attrs["metadata"]["config"]["observables"] == theirs.attrs["metadata"]["config"]["observables"]
    np.testing.assert_allclose(ours.sampling_loss.values.mean(axis=(2, 3)), theirs.sampling_loss.values.mean(axis=(2, 3)),
                               atol=2e-5)
    np.testing.assert_allclose(float(ours.init_loss.mean()), float(theirs.init_loss.mean()), rtol=1e-6)
