"""The multi-segment update (a sharded rank's local shards in one call) against its definition:
one single-buffer reference update per segment (``reference.reference_update_segments``).

Each backend's ``update_segments`` runs on segments of odd sizes (1, 3, 4097, ...), local starts
with gaps between them, global offsets not multiples of four and past 2**31 / 2**32, every
sampler, a mask, per-chain hyperparameters, float32 and bfloat16; and it is ONE kernel call (C++)
or launch (Triton, CUDA). Tolerances as in test_cpp_update.py / test_triton_update.py: the
statistic is bit-exact, float32 weights within the normals' 1e-5 times the noise scale plus
rounding, bfloat16 weights within one bf16 ulp on a few elements (a stochastic-rounding
threshold crossed by the normals' last bits).
"""
import shutil

import pytest
import torch

from llc_fast.kernels import dispatch
from llc_fast.kernels.backend import NotSupportedError, pack_call
from llc_fast.kernels.reference import compute_dtype, reference_update, reference_update_segments
from llc_fast.kernels.update_spec import SAMPLERS, SamplerSettings, StepCounters

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# (n, local_start, global_offset): gaps in the local buffers, offsets not multiples of four and past 2**31
SEGMENTS = [(3, 1, 2**33 + 5), (1, 5, 7), (4097, 6, 2**31 + 1), (2, 4104, 0), (5, 4110, 2**32 - 2)]
N_LOCAL = 4117
CHAIN_IDS = [3, 0, 11]


def _backend(name):
    if name == "cpu":
        from llc_fast.kernels.cpp_update import load_cpu_update

        try:
            return load_cpu_update(), torch.device("cpu")
        except RuntimeError as e:  # pragma: no cover - no compiler
            pytest.skip(f"the C++ update cannot be built here: {e}")
    if name == "triton":
        from llc_fast.kernels.triton_update import triton_update

        return triton_update, DEVICE
    if name == "cuda":
        if not ON_GPU:
            pytest.skip("no CUDA GPU")
        from llc_fast.kernels.cuda_update import load_cuda_update

        return load_cuda_update(), DEVICE
    raise AssertionError(name)


def _case(dtype, sampler, chains, *, per_chain, mask, seed=0, segments=SEGMENTS, n_local=N_LOCAL):
    g = torch.Generator().manual_seed(seed)
    cdt = compute_dtype(dtype)
    w_star = torch.randn(n_local, generator=g, dtype=torch.float64).to(dtype)
    segs = []
    for n, start, offset in segments:
        w = (w_star[start:start + n].double() + 0.1 * torch.randn(chains, n, generator=g, dtype=torch.float64))
        grad = 2 * torch.randn(chains, n, generator=g, dtype=torch.float64)
        segs.append((w.to(dtype), grad.to(dtype), start, offset))
    stat = None
    if sampler != "sgld":
        stat = (torch.rand(chains, n_local, generator=g, dtype=torch.float64) ** 3 * 4).to(cdt)
    m = (torch.arange(n_local) % 3 != 1).to(torch.float32) if mask else None
    if per_chain:
        hyper = dict(lr=torch.tensor([1e-3, 3e-3, 1e-2][:chains]), nbeta=torch.tensor([10.0, 30.0, 3.0][:chains]),
                     gamma=torch.tensor([100.0, 1000.0, 1.0][:chains]))
    else:
        hyper = dict(lr=2e-3, nbeta=20.0, gamma=300.0)
    return segs, w_star, stat, m, hyper


def _run(update_segments, device, segs, w_star, stat, m, hyper, kwargs):
    to = (lambda t: None if t is None else t.to(device))
    mine = [(to(w.clone()), to(g), s, o) for w, g, s, o in segs]
    st = None if stat is None else to(stat.clone())
    update_segments(mine, to(w_star), st, mask=to(m), **{k: to(v) if isinstance(v, torch.Tensor) else v
                                                          for k, v in hyper.items()}, **kwargs)
    return [w.cpu() for w, _, _, _ in mine], None if st is None else st.cpu()


def _compare(dtype, segs, ws_ref, ws_new, stat_ref, stat_new, stat_old, m):
    if stat_ref is not None:
        assert torch.equal(stat_new, stat_ref)  # no noise in V: bit-exact (columns outside segments untouched)
        covered = torch.zeros(N_LOCAL, dtype=torch.bool)
        for w, _, start, _ in segs:
            covered[start:start + w.shape[1]] = True
        assert torch.equal(stat_new[:, ~covered], stat_old[:, ~covered])
    flips = 0
    for (w0, _, start, _), w_ref, w_new in zip(segs, ws_ref, ws_new):
        if dtype == torch.bfloat16:
            bk, br = w_new.view(torch.int16).int(), w_ref.view(torch.int16).int()
            assert ((bk - br).abs() <= 1).all()
            flips += (bk != br).sum().item()
        else:
            err = (w_new.double() - w_ref.double()).abs()
            assert (err <= 1e-6 + 4e-7 * (w0.double().abs() + w_ref.double().abs())).all(), err.max().item()
        if m is not None:  # masked weights never move (no box here)
            frozen = m[start:start + w0.shape[1]] == 0
            assert torch.equal(w_new[:, frozen], w0[:, frozen])
        assert not torch.equal(w_new, w0) or w0.shape[1] == 1  # the segment was updated
    assert flips <= 4


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_match_reference_loop(backend, sampler, dtype):
    update, device = _backend(backend)
    per_chain = sampler != "rmsprop_sgld"
    chains = 3 if sampler != "sgld" else 1
    segs, w_star, stat, m, hyper = _case(dtype, sampler, chains, per_chain=per_chain, mask=sampler != "sgld",
                                         seed=SAMPLERS.index(sampler))
    settings = SamplerSettings(sampler=sampler, weight_decay=1e-2 if sampler == "sgld" else 0.0)
    kwargs = dict(settings=settings, counters=StepCounters(step=5, update_statistic=True, stat_step=5), seed=2**40 + 3,
                  chain_ids=torch.tensor(CHAIN_IDS[:chains]))
    ws_ref, stat_ref = _run(reference_update_segments, torch.device("cpu"), segs, w_star, stat, m, hyper, kwargs)
    ws_new, stat_new = _run(update.update_segments, device, segs, w_star, stat, m, hyper, kwargs)
    _compare(dtype, segs, ws_ref, ws_new, stat_ref, stat_new, stat, m)


def test_reference_loop_is_one_update_per_segment():
    """The definition: segment k = reference_update on w*/stat/mask sliced, index_offset = its global offset."""
    segs, w_star, stat, m, hyper = _case(torch.float32, "rmsprop_sgld_bc", 2, per_chain=True, mask=True)
    kwargs = dict(settings=SamplerSettings(sampler="rmsprop_sgld_bc", box=0.05), counters=StepCounters(step=2),
                  seed=9, chain_ids=torch.tensor([1, 4]))
    ws_ref, stat_ref = _run(reference_update_segments, torch.device("cpu"), segs, w_star, stat, m, hyper, kwargs)
    st = stat.clone()
    for (w, g, start, offset), w_ref in zip(segs, ws_ref):
        w = w.clone()
        sl = slice(start, start + w.shape[1])
        v = st[:, sl].contiguous()
        reference_update(w, g, w_star[sl], v, mask=m[sl], index_offset=offset, **hyper, **kwargs)
        st[:, sl] = v
        assert torch.equal(w, w_ref)
    assert torch.equal(st, stat_ref)


def test_float64_and_one_segment_cpu():
    """float64, and a single segment equal to the single-buffer update."""
    update, _ = _backend("cpu")
    segs, w_star, stat, m, hyper = _case(torch.float64, "rmsprop_sgld", 2, per_chain=True, mask=False,
                                         segments=[(4099, 0, 2**31 + 3)], n_local=4099)
    kwargs = dict(settings=SamplerSettings(sampler="rmsprop_sgld"), counters=StepCounters(step=1), seed=1,
                  chain_ids=torch.tensor([0, 1]))
    (w_seg,), st_seg = _run(update.update_segments, torch.device("cpu"), segs, w_star, stat, m, hyper, kwargs)
    w, g, _, offset = segs[0]
    w, st = w.clone(), stat.clone()
    update(w, g, w_star, st, index_offset=offset, **hyper, **kwargs)
    assert torch.equal(w_seg, w) and torch.equal(st_seg, st)


def test_cpu_segments_are_one_kernel_call(monkeypatch):
    from llc_fast.kernels import cpp_update

    update, _ = _backend("cpu")
    ext = cpp_update.load_cpu_extension()
    calls = []

    class Counting:
        def __getattr__(self, name):
            fn = getattr(ext, name)
            return lambda *a, **k: (calls.append(name), fn(*a, **k))[1]

    monkeypatch.setattr(cpp_update, "load_cpu_extension", lambda: Counting())
    segs, w_star, stat, m, hyper = _case(torch.float32, "rmsprop_sgld", 2, per_chain=False, mask=True)
    kwargs = dict(settings=SamplerSettings(sampler="rmsprop_sgld"), counters=StepCounters(step=1), seed=1,
                  chain_ids=torch.tensor([0, 1]))
    _run(update.update_segments, torch.device("cpu"), segs, w_star, stat, m, hyper, kwargs)
    assert calls == ["sgld_update_segments"]


def test_triton_segments_are_one_launch(monkeypatch):
    from llc_fast.kernels import triton_kernels as module
    from llc_fast.kernels.triton_update import triton_update

    launches = []
    kernel = module._sgld_update_segments_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    def no_single(*a, **k):
        raise AssertionError("the single-buffer kernel was launched")

    monkeypatch.setattr(module, "_sgld_update_segments_kernel", Counting())
    monkeypatch.setattr(module, "_sgld_update_kernel", type("NoLaunch", (), {"__getitem__": no_single})())
    segs, w_star, stat, m, hyper = _case(torch.float32, "rmsprop_sgld_bc", 3, per_chain=True, mask=True)
    kwargs = dict(settings=SamplerSettings(sampler="rmsprop_sgld_bc"), counters=StepCounters(step=1), seed=1,
                  chain_ids=torch.tensor([0, 1, 2]))
    _run(triton_update.update_segments, DEVICE, segs, w_star, stat, m, hyper, kwargs)
    assert len(launches) == 1


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_bad_segments_raise_value_error(backend):
    update = reference_update if backend == "torch" else _backend(backend)[0]
    segs, w_star, stat, m, hyper = _case(torch.float32, "rmsprop_sgld", 1, per_chain=False, mask=True)
    kwargs = dict(settings=SamplerSettings(sampler="rmsprop_sgld"), counters=StepCounters(step=1), seed=1,
                  chain_ids=torch.tensor([0]), **hyper)
    overlap = [segs[0], (segs[1][0], segs[1][1], segs[0][2] + 1, 100)]
    with pytest.raises(ValueError, match="overlap"):
        update.update_segments(overlap, w_star, stat, mask=m, **kwargs)
    outside = [(segs[0][0], segs[0][1], N_LOCAL - 1, 0)]
    with pytest.raises(ValueError, match="outside"):
        update.update_segments(outside, w_star, stat, mask=m, **kwargs)
    with pytest.raises(ValueError, match="stat"):
        update.update_segments(segs, w_star, stat[:, :-1].contiguous(), mask=m, **kwargs)
    with pytest.raises(ValueError, match="global_offset"):
        update.update_segments([(segs[0][0], segs[0][1], 0, -1)], w_star, stat, mask=m, **kwargs)
    update.update_segments([], w_star, stat, mask=m, **kwargs)  # nothing to do


def test_every_backend_is_one_object_with_both_entries():
    """select_backend gives the backend object; its single-buffer update is its one-segment update,
    whether the segment covers the flat buffers (the single-buffer kernel) or not (the segments kernel)."""
    segs, w_star, stat, m, hyper = _case(torch.float32, "rmsprop_sgld", 2, per_chain=True, mask=True,
                                         segments=[(4099, 1, 2**31 + 3)], n_local=4101)
    kwargs = dict(settings=SamplerSettings(sampler="rmsprop_sgld"), counters=StepCounters(step=3), seed=7,
                  chain_ids=torch.tensor([4, 1]))
    (w, g, _, offset), cols = segs[0], slice(1, 4100)
    for info in dispatch.backends():
        if not info.available or "cpu" not in info.devices:
            continue
        backend = dispatch.select_backend(info.name, torch.device("cpu"))
        assert backend.name == info.name and backend.update.__self__ is backend
        w_one, st_one = w.clone(), stat[:, cols].contiguous()
        backend.update(w_one, g, w_star[cols], st_one, mask=m[cols], index_offset=offset, **hyper, **kwargs)
        (w_seg,), st_seg = _run(backend.update_segments, torch.device("cpu"), segs, w_star, stat, m, hyper, kwargs)
        assert torch.equal(w_seg, w_one) and torch.equal(st_seg[:, cols], st_one), info.name
        whole = [(w.clone(), g, 0, offset)]
        st_whole = stat[:, cols].contiguous()
        backend.update_segments(whole, w_star[cols], st_whole, mask=m[cols], **hyper, **kwargs)
        assert torch.equal(whole[0][0], w_one) and torch.equal(st_whole, st_one), info.name


def test_unsupported_calls_list_the_reasons():
    """The checks a backend makes before launch come as one NotSupportedError (a ValueError)."""
    segs, w_star, stat, m, hyper = _case(torch.float32, "sgld", 1, per_chain=False, mask=False)
    kwargs = dict(settings=SamplerSettings(), counters=StepCounters(step=1), seed=1, chain_ids=torch.tensor([0]),
                  **hyper)
    meta = [(torch.zeros(1, 3, device="meta"), torch.zeros(1, 3, device="meta"), 0, 0)]
    with pytest.raises(NotSupportedError, match="cpu backend cannot run this update: the tensors are on meta"):
        _backend("cpu")[0].update_segments(meta, torch.zeros(N_LOCAL, device="meta"), None, **kwargs)
    from llc_fast.kernels.triton_update import triton_update

    far = [(segs[0][0], segs[0][1], 0, 2**62 - 1)]
    with pytest.raises(NotSupportedError, match=r"below 2\*\*62"):
        triton_update.update_segments(far, w_star, None, **kwargs)
    to = (lambda t: t.to(DEVICE))
    call = pack_call([(to(w), to(g), a, b) for w, g, a, b in segs], to(w_star), None, mask=None, **kwargs)
    assert triton_update.not_supported_reasons(call) == []


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
def test_cuda_segments_entry_is_exported(tmp_path):
    """The multi-segment launcher links into the shared library the CUDA backend loads (no GPU needed)."""
    import subprocess

    from llc_fast.kernels.build import CUDA_SOURCE, NVCC_FLAGS, csrc_dir

    out = tmp_path / "lib.so"
    cmd = ["nvcc", *NVCC_FLAGS, "-arch=sm_90", f"-I{csrc_dir()}", str(csrc_dir() / CUDA_SOURCE), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    syms = subprocess.run(["nm", "-D", str(out)], capture_output=True, text=True).stdout
    assert "llc_sgld_update_segments_cuda" in syms and "llc_cuda_segment_block_groups" in syms
