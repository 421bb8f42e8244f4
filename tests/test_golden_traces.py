"""Every chain of the pinned runs is the chain recorded in tests/golden (see record.py there), to a stated
tolerance: refactors of the sampling path must not change a draw.

What is CPU-dependent, and so not pinned bit for bit: torch's float32 kernels. On x86-64 their last bits
depend on the CPU's vector width and vendor (measured with torch 2.13: MKL's GEMM and its vectorized
tanh/exp/log, and ATen's AVX2 / AVX-512 log_softmax and reductions each give other last bits on another
CPU or under ATEN_CPU_CAPABILITY / MKL_ENABLE_INSTRUCTIONS), so a model's loss and gradient, and with them
every trace, differ in their last bits between an AVX-512 Intel, an AVX-512 AMD and an AVX2 AMD machine.
The C++ update is not: the same inputs give the same bits for its AVX-512 and AVX2 builds (-march=native on
any x86-64 CPU with FMA; pinned in test_cpu_update_bits_are_pinned). The traces are therefore compared to
the tolerance derived in ``tolerances``, which still fails on any change of a draw (a changed lr, seed,
noise, batch order: see test_a_changed_lr_is_caught).
"""
import hashlib
import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import llc_fast
from llc_fast import LLCResult

GOLDEN = Path(__file__).parent / "golden"
_spec = importlib.util.spec_from_file_location("golden_cases", GOLDEN / "cases.py")
cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cases)

#: float32's unit roundoff.
U = 2.0 ** -24
#: The last-bit differences of a loss value between two CPUs, in units of U (times the loss scale). A loss
#: is a float32 mean of per-token losses whose kernels round differently on another CPU (a GEMM summed in
#: another order: up to a few U; tanh/exp/log within 1-2 ulp each), evaluated at weights that differ by what
#: the gradient's differences of the same size propagate over the <= 20 steps of a case, each step moving
#: the weights by lr * nbeta / 2 * grad (about 1e-2 * grad here): much less than one U of the loss.
#: Measured: at most 2.9 U (AVX-512 Intel vs the recording machine, also under ATEN_CPU_CAPABILITY=avx2 /
#: default and MKL_ENABLE_INSTRUCTIONS=AVX2; 1 U on an AVX2 AMD). 32 U leaves a margin of 10x and is 20x to
#: 600x smaller than what a 1% change of lr does to the draws of any case.
LOSS_ULPS = 32


def tolerances(got: dict, golden: dict, nbeta: float) -> dict:
    """Absolute tolerance of each pinned field (``cases.FIELDS``) of a run with largest nbeta ``nbeta``.

    * losses (init_loss, burn-in and draw traces): ``LOSS_ULPS * U * scale``, scale the largest |loss|;
    * llc_per_chain = nbeta * (mean of the draws - init_loss): the difference of two losses, each within
      the loss tolerance, times nbeta: ``2 * nbeta * loss_tol``;
    * mala_acceptance = min(1, exp(log ratio)) changes by at most the log ratio's error, which holds
      nbeta * (L(w) - L(w')) (2 losses) and the proposal densities, whose gradient terms differ by as much
      again: ``4 * nbeta * loss_tol``.
    """
    losses = [np.abs(golden[f]) for f in ("loss_trace", "burnin_loss_trace", "init_loss") if np.size(golden[f])]
    scale = max(float(np.nanmax(v)) for v in losses)
    loss_tol = LOSS_ULPS * U * scale
    tol = dict.fromkeys(("loss_trace", "burnin_loss_trace", "init_loss"), loss_tol)
    tol.update(llc_per_chain=2 * nbeta * loss_tol, mala_acceptance=4 * nbeta * loss_tol)
    assert set(tol) == set(got), f"a pinned field without a stated tolerance: {set(got) ^ set(tol)}"
    return tol


def differences(got: dict, golden: dict, nbeta: float) -> list[str]:
    """One line for each field of ``got`` that is not ``golden``'s within ``tolerances`` (NaN where NaN)."""
    out = []
    tol = tolerances(got, golden, nbeta)
    for field, value in got.items():
        want = golden[field]
        if value.shape != want.shape:
            out.append(f"{field}: shape {value.shape}, pinned {want.shape}")
            continue
        same_nan = np.isnan(value) == np.isnan(want)
        close = same_nan & ((np.abs(value - want) <= tol[field]) | np.isnan(want))
        if not close.all():
            worst = float(np.nanmax(np.abs(value - want)[~close])) if (~close & same_nan).any() else float("nan")
            out.append(f"{field}: {int((~close).sum())} values beyond {tol[field]:.3g} (worst |diff| {worst:.3g}; "
                       f"NaN where not pinned: {int((~same_nan).sum())}), e.g. {value[~close][:3]} vs {want[~close][:3]}")
    return out


def _pinned(golden, name: str) -> dict:
    return {f: golden[f"{name}/{f}"] for f in cases.FIELDS}


def _assert_same(name: str, result: LLCResult, golden) -> None:
    problems = differences(cases.arrays(result), _pinned(golden, name), float(np.max(result.config["nbeta"])))
    assert not problems, f"{name} is not the pinned run:\n" + "\n".join(problems)


def _run(name: str, **change) -> LLCResult:
    make_model, make_data, loss_fn, kwargs = cases.CASES[name]
    return llc_fast.estimate_llc(make_model(), make_data(), loss_fn, **{**kwargs, **change})


@pytest.mark.parametrize("name", sorted(cases.CASES))
def test_one_process_chain_is_unchanged(name):
    _assert_same(name, _run(name), np.load(GOLDEN / "traces.npz"))


@pytest.mark.parametrize("name", ["sgld_torch", "tied_cpu"])
def test_a_changed_lr_is_caught(name):
    """The tolerance is far below what a change of the question does: 1% more lr fails the comparison."""
    lr = np.asarray(cases.CASES[name][3]["lr"], dtype=np.float64) * 1.01
    result = _run(name, lr=lr.tolist() if lr.ndim else float(lr))
    golden = _pinned(np.load(GOLDEN / "traces.npz"), name)
    problems = differences(cases.arrays(result), golden, float(np.max(result.config["nbeta"])))
    assert any(p.startswith("loss_trace") for p in problems) and any(p.startswith("llc_per_chain") for p in problems)


#: sha256 (first 16 hex digits) of the C++ update's weights after 3 steps of ``_cpu_update_bits``, per
#: (dtype, sampler). Elementwise IEEE operations and explicit fused multiply-adds: the same bits for every
#: x86-64 build with FMA, whatever its vector width (AVX-512 and AVX2 builds checked); a build without FMA
#: ($LLC_FAST_MARCH=none or x86-64-v2) rounds the noise's polynomials twice and is not pinned.
CPU_UPDATE_BITS = {
    ("float32", "sgld"): "1ab49a13a3",
    ("float32", "rmsprop_sgld"): "8af757c7f0",
    ("bfloat16", "sgld"): "cbfea536ee",
    ("bfloat16", "rmsprop_sgld"): "d121a50c67",
    ("float64", "sgld"): "1d23540be1",
    ("float64", "rmsprop_sgld"): "6db1709946",
}


def _exact_inputs(dtype: torch.dtype, sampler: str, n: int = 4099, chains: int = 3):
    """Inputs that are the same bits on every CPU: integers times powers of two (no float kernel of torch)."""
    g = torch.Generator().manual_seed(3)

    def grid(*shape, scale):
        return torch.randint(-(2**20), 2**20, shape, generator=g).to(torch.float64) * scale

    w_star = grid(n, scale=2.0**-20)
    w = (w_star + grid(chains, n, scale=2.0**-24)).to(dtype)
    grad = grid(chains, n, scale=2.0**-19).to(dtype)
    stat = None
    if sampler != "sgld":
        stat = (grid(chains, n, scale=2.0**-20).abs() + 2.0**-10).to(torch.float64 if dtype == torch.float64
                                                                      else torch.float32)
    return w, grad, w_star.to(dtype), stat


def _cpu_update_bits(dtype: torch.dtype, sampler: str) -> str:
    from llc_fast.kernels.cpu_update import load_cpu_update
    from llc_fast.kernels.update_spec import SamplerSettings, StepCounters

    update = load_cpu_update()
    w, grad, w_star, stat = _exact_inputs(dtype, sampler)
    for step in range(3):
        update.update(w, grad, w_star, stat, lr=torch.tensor([1e-3, 3e-3, 1e-2]),
                      nbeta=torch.tensor([10.0, 30.0, 3.0]), gamma=torch.tensor([100.0, 1000.0, 1.0]),
                      settings=SamplerSettings(sampler),
                      counters=StepCounters(step=step), seed=5, chain_ids=torch.tensor([0, 1, 2]))
    raw = w.view(torch.int16) if dtype == torch.bfloat16 else w
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()[:10]


def _cpu_build_has_fma() -> bool:
    from llc_fast.kernels import build

    cxx = os.environ.get("CXX", "c++")
    return "__FMA__" in (build.target_macros(cxx, build.cpu_build_config(cxx)[1]) or "")


@pytest.mark.parametrize("dtype,sampler", sorted(CPU_UPDATE_BITS))
def test_cpu_update_bits_are_pinned(dtype, sampler):
    from conftest import update_backend

    update_backend("cpu")  # skips where the C++ update cannot be built
    if not _cpu_build_has_fma():
        pytest.skip("the C++ update is built without FMA here ($LLC_FAST_MARCH): its noise rounds differently")
    assert _cpu_update_bits(getattr(torch, dtype), sampler) == CPU_UPDATE_BITS[dtype, sampler]


def test_torchrun_chains_are_unchanged(tmp_path):
    from test_distributed import _can_launch, torchrun

    if _can_launch():
        pytest.skip(_can_launch())
    proc = torchrun("run_cases.py", str(tmp_path), *cases.DIST_SPECS)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    golden = np.load(GOLDEN / "dist_traces.npz")
    for spec in cases.DIST_SPECS:
        name, _, s = spec.partition(":")
        _assert_same(spec, LLCResult.load(tmp_path / f"{name}{'_S' + s if s else ''}.json"), golden)


@pytest.mark.parametrize("name", ["vmap_extras_torch", "sequential_extras_cpu"])
def test_a_sparse_row_restricted_run_is_the_pinned_masked_run(name):
    """The masked cases as the one component of a restricted run on sparse rows (docs/restricted.md): its chains
    are the pinned ones (the engine is the nested vmap, whatever the case's chain_batching)."""
    make_model, make_data, loss_fn, kwargs = cases.CASES[name]
    kw = {k: v for k, v in kwargs.items() if k not in ("mask", "chain_batching")}
    res = llc_fast.estimate_restricted_llcs(make_model(), make_data(), loss_fn, {"m": kwargs["mask"]},
                                            sparse_rows="on", **kw)
    assert res.facts["row_storage"] == "sparse"
    _assert_same(name, res["m"], np.load(GOLDEN / "traces.npz"))
