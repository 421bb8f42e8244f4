"""The multi-segment update (a sharded rank's local shards in one call) against its definition:
one single-buffer reference update per segment.

Each backend's ``prepare`` + ``launch`` (``update_segments`` below) runs on segments of odd sizes (1, 3, 4097, ...), local starts
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
from llc_fast.kernels.backend import Backend, NotSupportedError, PreparedUpdate
from llc_fast.kernels.torch_update import reference_update
from llc_fast.kernels.update_call import Segment, pack_call
from llc_fast.kernels.update_spec import KERNEL_SAMPLERS as SAMPLERS, SamplerSettings, StepCounters, compute_dtype

from conftest import update_backend

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

# (n, local_start, global_offset): gaps in the local buffers, offsets not multiples of four and past 2**31
SEGMENTS = [(3, 1, 2**33 + 5), (1, 5, 7), (4097, 6, 2**31 + 1), (2, 4104, 0), (5, 4110, 2**32 - 2)]
N_LOCAL = 4117
CHAIN_IDS = [3, 0, 11]


def update_segments(backend, segments, w_star, stat, *, counters, **kwargs):
    """One step of ``backend`` over ``segments``: ``prepare``, then ``launch`` at ``counters``."""
    backend.prepare(segments, w_star, stat, **kwargs).launch(counters)


def _case(dtype, sampler, chains, *, per_chain, mask, seed=0, segments=SEGMENTS, n_local=N_LOCAL):
    g = torch.Generator().manual_seed(seed)
    cdt = compute_dtype(dtype)
    w_star = torch.randn(n_local, generator=g, dtype=torch.float64).to(dtype)
    segs = []
    for n, start, offset in segments:
        w = (w_star[start:start + n].double() + 0.1 * torch.randn(chains, n, generator=g, dtype=torch.float64))
        grad = 2 * torch.randn(chains, n, generator=g, dtype=torch.float64)
        segs.append(Segment(w.to(dtype), grad.to(dtype), start, offset))
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


def _run(backend, device, segs, w_star, stat, m, hyper, kwargs):
    to = (lambda t: None if t is None else t.to(device))
    mine = [(to(w.clone()), to(g), s, o) for w, g, s, o in segs]
    st = None if stat is None else to(stat.clone())
    update_segments(backend, mine, to(w_star), st, mask=to(m), **{k: to(v) if isinstance(v, torch.Tensor) else v
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


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.gpu),
                                     pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_segments_match_reference_loop(backend, sampler, dtype):
    update, device = update_backend(backend)
    per_chain = sampler != "rmsprop_sgld"
    chains = 3 if sampler != "sgld" else 1
    segs, w_star, stat, m, hyper = _case(dtype, sampler, chains, per_chain=per_chain, mask=sampler != "sgld",
                                         seed=SAMPLERS.index(sampler))
    settings = SamplerSettings(sampler=sampler, weight_decay=1e-2 if sampler == "sgld" else 0.0)
    kwargs = dict(settings=settings, counters=StepCounters(step=5, update_statistic=True, stat_step=5), seed=2**40 + 3,
                  chain_ids=torch.tensor(CHAIN_IDS[:chains]))
    ws_ref, stat_ref = _run(reference_update, torch.device("cpu"), segs, w_star, stat, m, hyper, kwargs)
    ws_new, stat_new = _run(update, device, segs, w_star, stat, m, hyper, kwargs)
    _compare(dtype, segs, ws_ref, ws_new, stat_ref, stat_new, stat, m)


def test_reference_loop_is_one_update_per_segment():
    """The definition: segment k = reference_update on w*/stat/mask sliced, index_offset = its global offset."""
    segs, w_star, stat, m, hyper = _case(torch.float32, "rmsprop_sgld_bc", 2, per_chain=True, mask=True)
    kwargs = dict(settings=SamplerSettings(sampler="rmsprop_sgld_bc", box=0.05), counters=StepCounters(step=2),
                  seed=9, chain_ids=torch.tensor([1, 4]))
    ws_ref, stat_ref = _run(reference_update, torch.device("cpu"), segs, w_star, stat, m, hyper, kwargs)
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
    update, _ = update_backend("cpu")
    segs, w_star, stat, m, hyper = _case(torch.float64, "rmsprop_sgld", 2, per_chain=True, mask=False,
                                         segments=[(4099, 0, 2**31 + 3)], n_local=4099)
    kwargs = dict(settings=SamplerSettings(sampler="rmsprop_sgld"), counters=StepCounters(step=1), seed=1,
                  chain_ids=torch.tensor([0, 1]))
    (w_seg,), st_seg = _run(update, torch.device("cpu"), segs, w_star, stat, m, hyper, kwargs)
    w, g, _, offset = segs[0]
    w, st = w.clone(), stat.clone()
    update(w, g, w_star, st, index_offset=offset, **hyper, **kwargs)
    assert torch.equal(w_seg, w) and torch.equal(st_seg, st)


def test_cpu_segments_are_one_kernel_call(monkeypatch):
    from llc_fast.kernels import cpu_update

    update, _ = update_backend("cpu")
    ext = cpu_update.load_cpu_extension()
    calls = []

    class Counting:
        def __getattr__(self, name):
            fn = getattr(ext, name)
            return lambda *a, **k: (calls.append(name), fn(*a, **k))[1]

    monkeypatch.setattr(cpu_update, "load_cpu_extension", lambda: Counting())
    segs, w_star, stat, m, hyper = _case(torch.float32, "rmsprop_sgld", 2, per_chain=False, mask=True)
    kwargs = dict(settings=SamplerSettings(sampler="rmsprop_sgld"), counters=StepCounters(step=1), seed=1,
                  chain_ids=torch.tensor([0, 1]))
    _run(update, torch.device("cpu"), segs, w_star, stat, m, hyper, kwargs)
    assert calls == ["sgld_update"]


@pytest.mark.gpu
def test_triton_segments_are_one_launch(monkeypatch):
    from llc_fast.kernels import triton_kernels as module
    from llc_fast.kernels.triton_update import triton_update

    launches = []
    kernel = module.sgld_update_segments_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    def no_single(*a, **k):
        raise AssertionError("the single-buffer kernel was launched")

    monkeypatch.setattr(module, "sgld_update_segments_kernel", Counting())
    monkeypatch.setattr(module, "sgld_update_kernel", type("NoLaunch", (), {"__getitem__": no_single})())
    segs, w_star, stat, m, hyper = _case(torch.float32, "rmsprop_sgld_bc", 3, per_chain=True, mask=True)
    kwargs = dict(settings=SamplerSettings(sampler="rmsprop_sgld_bc"), counters=StepCounters(step=1), seed=1,
                  chain_ids=torch.tensor([0, 1, 2]))
    _run(triton_update, DEVICE, segs, w_star, stat, m, hyper, kwargs)
    assert len(launches) == 1


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_bad_segments_raise_value_error(backend):
    update = reference_update if backend == "torch" else update_backend(backend)[0]
    segs, w_star, stat, m, hyper = _case(torch.float32, "rmsprop_sgld", 1, per_chain=False, mask=True)
    kwargs = dict(settings=SamplerSettings(sampler="rmsprop_sgld"), counters=StepCounters(step=1), seed=1,
                  chain_ids=torch.tensor([0]), **hyper)
    overlap = [segs[0], (segs[1][0], segs[1][1], segs[0][2] + 1, 100)]
    with pytest.raises(ValueError, match="overlap"):
        update_segments(update, overlap, w_star, stat, mask=m, **kwargs)
    outside = [(segs[0][0], segs[0][1], N_LOCAL - 1, 0)]
    with pytest.raises(ValueError, match="outside"):
        update_segments(update, outside, w_star, stat, mask=m, **kwargs)
    with pytest.raises(ValueError, match="stat"):
        update_segments(update, segs, w_star, stat[:, :-1].contiguous(), mask=m, **kwargs)
    with pytest.raises(ValueError, match="global_offset"):
        update_segments(update, [(segs[0][0], segs[0][1], 0, -1)], w_star, stat, mask=m, **kwargs)
    update_segments(update, [], w_star, stat, mask=m, **kwargs)  # nothing to do


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
        (w_seg,), st_seg = _run(backend, torch.device("cpu"), segs, w_star, stat, m, hyper, kwargs)
        assert torch.equal(w_seg, w_one) and torch.equal(st_seg[:, cols], st_one), info.name
        whole = [(w.clone(), g, 0, offset)]
        st_whole = stat[:, cols].contiguous()
        update_segments(backend, whole, w_star[cols], st_whole, mask=m[cols], **hyper, **kwargs)
        assert torch.equal(whole[0][0], w_one) and torch.equal(st_whole, st_one), info.name


def test_unsupported_calls_list_the_reasons():
    """The checks a backend makes before launch come as one NotSupportedError (a ValueError)."""
    segs, w_star, stat, m, hyper = _case(torch.float32, "sgld", 1, per_chain=False, mask=False)
    kwargs = dict(settings=SamplerSettings(), counters=StepCounters(step=1), seed=1, chain_ids=torch.tensor([0]),
                  **hyper)
    meta = [(torch.zeros(1, 3, device="meta"), torch.zeros(1, 3, device="meta"), 0, 0)]
    with pytest.raises(NotSupportedError, match="cpu backend cannot run this update: the tensors are on meta"):
        update_segments(update_backend("cpu")[0], meta, torch.zeros(N_LOCAL, device="meta"), None, **kwargs)
    from llc_fast.kernels.triton_update import triton_update

    far = [(segs[0][0], segs[0][1], 0, 2**62 - 1)]
    with pytest.raises(NotSupportedError, match=r"below 2\*\*62"):
        update_segments(triton_update, far, w_star, None, **kwargs)
    to = (lambda t: t.to(DEVICE))
    kwargs.pop("counters")
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
    assert "llc_sgld_update_segments_cuda" in syms and "llc_cuda_segment_block_quads" in syms


# --- prepared updates: checked and packed once, launched at each step ----------------------------

# (sampler, dtype, options): per-chain or scalar hyperparameters, mask dtype, chain indices (a range or not)
PREPARED_CASES = [
    ("sgld", torch.float32, dict(per_chain=False, mask=None, ids=[4, 5, 6], box=0.05, weight_decay=1e-2)),
    ("sgld", torch.bfloat16, dict(per_chain=True, mask=torch.bool, ids=CHAIN_IDS, noise_level=0.5)),
    ("rmsprop_sgld", torch.bfloat16, dict(per_chain=True, mask=torch.float32, ids=CHAIN_IDS)),
    ("rmsprop_sgld", torch.float32, dict(per_chain=False, mask=torch.uint8, ids=[0, 1, 2])),
    ("rmsprop_sgld_bc", torch.float32, dict(per_chain=True, mask=torch.bfloat16, ids=CHAIN_IDS, box=0.05)),
    ("rmsprop_sgld_bc", torch.float64, dict(per_chain=True, mask=torch.float32, ids=[7, 8, 9], weight_decay=1e-2)),
]
#: (steps of the schedule, whether the statistic updates, its bias-correction step): frozen from step 6 on
PREPARED_STEPS = [StepCounters(0, True, 0), StepCounters(1, True, 1), StepCounters(2, True, 2),
                  StepCounters(6, False, 2), StepCounters(7, False, 2)]
#: layouts: several segments with gaps, or one segment covering the buffers (the single-buffer kernels)
LAYOUTS = {"segments": (SEGMENTS, N_LOCAL), "single": ([(4101, 0, 2**31 + 3)], 4101)}
#: every backend that runs here (the Triton kernels in the interpreter without a GPU)
PREPARED_BACKENDS = ["torch", "cpu", pytest.param("triton", marks=pytest.mark.gpu)]


def _any_backend(name):
    return (reference_update, DEVICE) if name == "torch" else update_backend(name)


def _prepared_case(sampler, dtype, opts, layout, device):
    segments, n_local = LAYOUTS[layout]
    to = (lambda t: None if t is None else t.to(device))
    segs, w_star, stat, m, hyper = _case(dtype, sampler, 3, per_chain=opts["per_chain"], mask=opts["mask"] is not None,
                                         segments=segments, n_local=n_local, seed=len(segments))
    if opts["per_chain"]:
        hyper = {k: to(v.double() if k == "lr" else v) for k, v in hyper.items()}  # float64 and float32 tensors
    settings = SamplerSettings(sampler=sampler, box=opts.get("box"), weight_decay=opts.get("weight_decay", 0.0),
                               noise_level=opts.get("noise_level", 1.0))
    args = dict(settings=settings, seed=2**40 + 3, chain_ids=to(torch.tensor(opts["ids"])),
                mask=None if m is None else to(m.to(opts["mask"])), **hyper)
    g = torch.Generator().manual_seed(1)
    grads = [[to((2 * torch.randn(seg[1].shape, generator=g, dtype=torch.float64)).to(dtype)) for seg in segs]
             for _ in PREPARED_STEPS]
    return segs, to(w_star), stat, args, grads


def _copies(segs, stat, device):
    return ([(w.clone().to(device), g.to(device), s, o) for w, g, s, o in segs],
            None if stat is None else stat.clone().to(device))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("case", range(len(PREPARED_CASES)), ids=lambda k: f"{PREPARED_CASES[k][0]}-"
                         f"{str(PREPARED_CASES[k][1]).replace('torch.', '')}")
@pytest.mark.parametrize("backend", PREPARED_BACKENDS + [pytest.param("cuda", marks=pytest.mark.gpu)])
def test_prepared_launch_is_update_segments_bit_for_bit(backend, case, layout):
    """prepare once + launch per step = prepare and launch per step, bit for bit, over steps whose
    statistic updates and then is frozen, with the prepared gradients, new gradient tensors, and again the
    gradients of the step before (grads=None)."""
    update, device = _any_backend(backend)
    sampler, dtype, opts = PREPARED_CASES[case]
    segs, w_star, stat, args, grads = _prepared_case(sampler, dtype, opts, layout, device)
    ref, ref_stat = _copies(segs, stat, device)
    mine, my_stat = _copies(segs, stat, device)
    prepared = update.prepare(mine, w_star, my_stat, **args)
    current = [g for _, g, _, _ in segs]
    for k, counters in enumerate(PREPARED_STEPS):
        new = None if k in (0, 2) else grads[k]  # step 0: the prepared gradients; step 2: those of step 1
        if new is not None:
            current = new
        ref = [(w, g, s, o) for (w, _, s, o), g in zip(ref, current)]
        update_segments(update, ref, w_star, ref_stat, counters=counters, **args)
        prepared.launch(counters, grads=new)
        for (w_ref, *_), (w_mine, *_) in zip(ref, mine):
            assert torch.equal(w_mine.view(torch.int16) if dtype == torch.bfloat16 else w_mine,
                               w_ref.view(torch.int16) if dtype == torch.bfloat16 else w_ref), (k, counters)
        if ref_stat is not None:
            assert torch.equal(my_stat, ref_stat), (k, counters)
    assert not torch.equal(mine[0][0].cpu(), segs[0][0])  # the weights moved


@pytest.mark.parametrize("backend", PREPARED_BACKENDS)
def test_prepared_launch_refuses_bad_grads(backend):
    """Replacement gradients are checked on the host (shape, dtype, device, contiguity, one per segment):
    a ValueError naming the segment, nothing written, and the prepared gradients stay in use."""
    update, device = _any_backend(backend)
    segs, w_star, stat, args, _ = _prepared_case("rmsprop_sgld", torch.float32, PREPARED_CASES[3][2], "segments",
                                                 device)
    mine, my_stat = _copies(segs, stat, device)
    prepared = update.prepare(mine, w_star, my_stat, **args)
    good = [g for _, g, _, _ in mine]
    n1 = good[1].shape[1]
    bad = [
        ([good[0], torch.zeros(3, n1 + 1, device=device)] + good[2:], r"grads\[1\] must be a contiguous \(3, 1\)"),
        ([good[0], good[1].double()] + good[2:], r"grads\[1\] .* of torch.float32 .* got \(3, 1\) torch.float64"),
        ([good[0].t().contiguous().t()] + good[1:], r"grads\[0\] .* not contiguous"),
        ([torch.zeros(good[0].shape, device="meta")] + good[1:], r"grads\[0\] .* on meta"),
        ([good[0], good[1].tolist()] + good[2:], r"grads\[1\] .* got a list"),
        (good[:-1], r"one tensor per segment \(5\), got 4"),
        (good[0], r"a sequence of 5 tensors, one per segment, got one tensor"),
    ]
    before = [w.clone() for w, _, _, _ in mine], my_stat.clone()
    for grads, message in bad:
        with pytest.raises(ValueError, match=message):
            prepared.launch(StepCounters(3), grads=grads)
    with pytest.raises(ValueError, match="counters must be a StepCounters"):
        prepared.launch(3)
    with pytest.raises(ValueError, match=r"counters.step must lie in \[0, 4294967295\]"):
        prepared.launch(StepCounters(2**32))
    assert all(torch.equal(w, w0) for (w, _, _, _), w0 in zip(mine, before[0])) and torch.equal(my_stat, before[1])
    prepared.launch(StepCounters(3))  # with the prepared gradients
    ref, ref_stat = _copies(segs, stat, device)
    update_segments(update, ref, w_star, ref_stat, counters=StepCounters(3), **args)
    assert all(torch.equal(w, w_ref) for (w, _, _, _), (w_ref, _, _, _) in zip(mine, ref))
    assert torch.equal(my_stat, ref_stat)


@pytest.mark.parametrize("backend", PREPARED_BACKENDS)
def test_prepare_checks_once_and_packs_once(backend, monkeypatch):
    """prepare makes its checks once (ValueError, NotSupportedError); its launches neither
    pack the call again nor convert the per-chain values, chain indices or mask again."""
    from llc_fast.kernels import backend as backend_module
    from llc_fast.kernels import native

    update, device = _any_backend(backend)
    segs, w_star, stat, args, grads = _prepared_case("rmsprop_sgld_bc", torch.float32, PREPARED_CASES[4][2],
                                                     "segments", device)
    mine, my_stat = _copies(segs, stat, device)
    with pytest.raises(ValueError, match="overlap"):
        update.prepare([mine[0], (mine[1][0], mine[1][1], mine[0][2] + 1, 100)], w_star, my_stat, **args)
    with pytest.raises(ValueError, match="stat"):
        update.prepare(mine, w_star, None, **args)
    if backend != "torch":
        meta = [(torch.zeros(3, 3, device="meta"), torch.zeros(3, 3, device="meta"), 0, 0)]
        with pytest.raises(NotSupportedError, match="cannot run this update"):
            update.prepare(meta, torch.zeros(3, device="meta"), None,
                                    **dict(args, settings=SamplerSettings(), mask=None,
                                           chain_ids=torch.tensor([0, 1, 2])))
    prepared = update.prepare(mine, w_star, my_stat, **args)
    counts = {}

    def counting(name, fn):
        def wrapper(*a, **k):
            counts[name] = counts.get(name, 0) + 1
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(backend_module, "pack_call", counting("pack_call", backend_module.pack_call))
    monkeypatch.setattr(backend_module.UpdateCall, "per_row_values",
                        counting("per_row_values", backend_module.UpdateCall.per_row_values))
    monkeypatch.setattr(native, "kernel_args", counting("kernel_args", native.kernel_args))
    monkeypatch.setattr(native, "segment_table", counting("segment_table", native.segment_table))
    for k, counters in enumerate(PREPARED_STEPS[:3]):
        prepared.launch(counters, grads=grads[k] if k else None)
    assert counts == {}


def test_a_backend_implements_prepare_call():
    """A backend is its ``prepare_call``: a ``PreparedUpdate`` whose ``launch_step`` gets each step's counters
    (the step checked) with the current gradients; a backend without one cannot prepare."""
    calls = []

    class RecordingPrepared(PreparedUpdate):
        def __init__(self, backend, call):
            super().__init__(backend, call)
            self.inner = reference_update.prepare_call(call)

        def launch_step(self, counters, step):
            calls.append((step, counters, list(self.grads)))
            self.inner.grads = self.grads
            self.inner.launch_step(counters, step)

    class Recording(Backend):
        name, devices = "recording", ("cpu",)

        def prepare_call(self, call):
            return RecordingPrepared(self, call)

    segs, w_star, stat, args, grads = _prepared_case("rmsprop_sgld_bc", torch.float32, PREPARED_CASES[4][2],
                                                     "segments", torch.device("cpu"))
    mine, my_stat = _copies(segs, stat, torch.device("cpu"))
    ref, ref_stat = _copies(segs, stat, torch.device("cpu"))
    prepared = Recording().prepare(mine, w_star, my_stat, **args)
    for k, counters in enumerate(PREPARED_STEPS):
        prepared.launch(counters, grads=grads[k])
        ref = [(w, g, s, o) for (w, _, s, o), g in zip(ref, grads[k])]
        update_segments(reference_update, ref, w_star, ref_stat, counters=counters, **args)
        assert calls[-1][0] == counters.step and calls[-1][1] == counters
        assert all(a is b for a, b in zip(calls[-1][2], grads[k]))
    assert all(torch.equal(w, w_ref) for (w, _, _, _), (w_ref, _, _, _) in zip(mine, ref))
    assert torch.equal(my_stat, ref_stat)
    with pytest.raises(NotImplementedError):
        type("Nothing", (Backend,), {"name": "nothing", "devices": ("cpu",)})().prepare(mine, w_star, my_stat, **args)


@pytest.mark.parametrize("backend", PREPARED_BACKENDS)
def test_prepared_empty_update_is_a_no_op(backend):
    """No chains or no elements: the prepared launches check their arguments and change nothing."""
    update, device = _any_backend(backend)
    kwargs = dict(lr=1e-3, nbeta=10.0, gamma=100.0, settings=SamplerSettings(), seed=0)
    w_star = torch.randn(6, device=device)
    empty = update.prepare([(torch.zeros(0, 6, device=device), torch.zeros(0, 6, device=device), 0, 0)],
                                    w_star, None, chain_ids=torch.zeros(0, dtype=torch.int64), **kwargs)
    empty.launch(StepCounters(1), grads=[torch.zeros(0, 6, device=device)])
    with pytest.raises(ValueError, match=r"grads\[0\]"):
        empty.launch(StepCounters(1), grads=[torch.zeros(1, 6, device=device)])
    w = torch.randn(2, 3, device=device)
    w0 = w.clone()
    none = update.prepare([(torch.zeros(2, 0, device=device), torch.zeros(2, 0, device=device), 0, 0),
                                    (w, torch.ones(2, 3, device=device), 0, 9)], w_star, None,
                                   chain_ids=torch.tensor([0, 1]), **dict(kwargs, lr=0.0))
    none.launch(StepCounters(2), grads=[torch.zeros(2, 0, device=device), torch.ones(2, 3, device=device)])
    assert torch.equal(w, w0)  # lr = 0: the weights stay (the zero-width segment is skipped)


@pytest.mark.parametrize("backend", PREPARED_BACKENDS)
def test_prepared_update_keeps_only_the_current_grads(backend):
    """A gradient replaced by a later step's can be freed (the vmap engine returns a new one each step)."""
    import gc
    import weakref

    update, device = _any_backend(backend)
    segs, w_star, stat, args, grads = _prepared_case("sgld", torch.float32, PREPARED_CASES[0][2], "single", device)
    mine, _ = _copies(segs, stat, device)
    first = mine[0][1].clone()
    alive = weakref.ref(first)
    prepared = update.prepare([(mine[0][0], first, 0, mine[0][3])], w_star, None, **args)
    prepared.launch(StepCounters(0))
    prepared.launch(StepCounters(1), grads=grads[1])
    del first
    gc.collect()
    assert alive() is None
