"""Per-chain row masks (``update_spec.RowMasks``): chain row c samples only its component's mask.

Every CPU-runnable backend (torch, cpu, the Triton interpreter; triton and cuda on a GPU) is run
against two definitions:

* the same backend running each row alone with that row's mask as today's shared [N] mask (the
  same chain index, so the same noise): bit for bit, weights and statistic;
* the reference (``reference_update``) with the same RowMasks: bit for bit for torch, within the
  tolerances of test_segments.py for the fast backends (their normals differ in the last bits),
  the statistic bit-exact (it is updated for masked elements too, only delta is masked).

And a RowMasks whose every row uses one full-length component is the shared mask, bit for bit.
"""
import pytest
import torch

from llc_fast.kernels import RowMasks
from llc_fast.kernels.torch_update import reference_update
from llc_fast.kernels.update_spec import KERNEL_SAMPLERS as SAMPLERS, SamplerSettings, StepCounters, compute_dtype

from conftest import update_backend

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")

N = 1031  # odd, not a multiple of four
CHAIN_IDS = [3, 0, 11, 7, 2, 5]


BACKENDS = ["torch", "cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _components(n, seed=0):
    """Components of n elements: unaligned slices (disjoint and overlapping), a sparse pattern, a single
    element at the end, the full length; as dense [n] 0/1 masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for lo, hi in [(5, 331), (331, 702), (200, 900), (n - 1, n), (0, n)]:
        m = torch.zeros(n)
        m[lo:hi] = 1.0
        out.append(m)
    sparse = (torch.rand(n, generator=g) < 0.3).float()
    sparse[:17] = 0
    sparse[-9:] = 0
    sparse[40] = 1
    out.append(sparse)
    return out


def _case(dtype, sampler, chains, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    cdt = compute_dtype(dtype)
    w_star = torch.randn(n, generator=g, dtype=torch.float64).to(dtype)
    w = (w_star.double() + 0.1 * torch.randn(chains, n, generator=g, dtype=torch.float64)).to(dtype)
    grad = (2 * torch.randn(chains, n, generator=g, dtype=torch.float64)).to(dtype)
    stat = None
    if sampler != "sgld":
        stat = (torch.rand(chains, n, generator=g, dtype=torch.float64) ** 3 * 4).to(cdt)
    hyper = dict(lr=torch.tensor([1e-3, 3e-3, 1e-2, 2e-3, 5e-3, 4e-3][:chains]),
                 nbeta=torch.tensor([10.0, 30.0, 3.0, 7.0, 1.0, 20.0][:chains]),
                 gamma=torch.tensor([100.0, 1000.0, 1.0, 10.0, 300.0, 50.0][:chains]))
    return w, grad, w_star, stat, hyper


def _kwargs(sampler, step=5, wd=0.0):
    return dict(settings=SamplerSettings(sampler=sampler, weight_decay=wd),
                counters=StepCounters(step=step, update_statistic=True, stat_step=step), seed=2**40 + 3)


def _to(device):
    return lambda t: None if t is None else t.to(device)


def _row_masks_to(rm, device):
    return RowMasks(rm.windows, rm.buffer.to(device), rm.row_component)


def _single(update, device, w, grad, w_star, stat, mask, hyper, chain_ids, kwargs, index_offset=0):
    to = _to(device)
    wk, st = to(w.clone()), to(None if stat is None else stat.clone())
    mask = _row_masks_to(mask, device) if isinstance(mask, RowMasks) else to(mask)
    update(wk, to(grad), to(w_star), st, mask=mask, chain_ids=torch.tensor(chain_ids), index_offset=index_offset,
           **{k: to(v) for k, v in hyper.items()}, **kwargs)
    return wk.cpu(), None if st is None else st.cpu()


def _rows_alone(update, device, w, grad, w_star, stat, dense, hyper, chain_ids, kwargs, index_offset=0):
    """Each row alone, its mask as the shared [N] mask (None for an unrestricted row)."""
    ws, sts = [], []
    for c in range(w.shape[0]):
        m = dense[c]
        wc, sc = _single(update, device, w[c:c + 1], grad[c:c + 1], w_star, None if stat is None else stat[c:c + 1],
                         None if bool(m.all()) and c % 2 else m, {k: v[c:c + 1] for k, v in hyper.items()},
                         chain_ids[c:c + 1], kwargs, index_offset)
        ws.append(wc)
        sts.append(sc)
    return torch.cat(ws), None if stat is None else torch.cat(sts)


def _close(dtype, w0, w_ref, w_new):
    """The fast backends against the reference (test_segments.py's tolerances)."""
    if dtype == torch.bfloat16:
        bk, br = w_new.view(torch.int16).int(), w_ref.view(torch.int16).int()
        assert ((bk - br).abs() <= 1).all()
        assert (bk != br).sum().item() <= 4
    else:
        err = (w_new.double() - w_ref.double()).abs()
        assert (err <= 1e-6 + 4e-7 * (w0.double().abs() + w_ref.double().abs())).all(), err.max().item()


def _check(backend, dtype, w, w_ref, w_new, stat_ref, stat_new, dense):
    if backend == "torch":
        assert torch.equal(w_new, w_ref)
    else:
        _close(dtype, w, w_ref, w_new)
    if stat_ref is not None:
        assert torch.equal(stat_new, stat_ref)
    frozen = dense == 0
    assert torch.equal(w_new[frozen], w[frozen])  # masked weights never move (no box)
    assert not torch.equal(w_new[~frozen], w[~frozen])


# --- RowMasks itself -----------------------------------------------------------------------------


def test_from_dense_trims_windows_and_dense_round_trips():
    comps = _components(N)
    rm = RowMasks.from_dense(comps + [None], [0, 1, 2, 6, 3, 5, 4])
    assert rm.windows.dtype == torch.int64 and rm.buffer.dtype == torch.uint8
    assert rm.row_component.tolist() == [0, 1, 2, -1, 3, 5, 4]
    lo, hi, off = rm.windows[0].tolist()
    assert (lo, hi, off) == (5, 331, 0)
    assert rm.windows[3].tolist()[:2] == [N - 1, N]
    nz = torch.nonzero(comps[5]).flatten()
    assert rm.windows[5].tolist()[:2] == [int(nz.min()), int(nz.max()) + 1] and int(nz.min()) >= 17
    assert rm.buffer.numel() == int(sum(hi - lo for lo, hi, _ in rm.windows.tolist()))
    dense = rm.dense(N)
    assert dense.shape == (7, N) and dense.dtype == torch.uint8
    for c, k in enumerate([0, 1, 2, None, 3, 5, 4]):
        assert torch.equal(dense[c], torch.ones(N, dtype=torch.uint8) if k is None else comps[k].to(torch.uint8))


def test_from_dense_refuses_an_all_zero_mask():
    with pytest.raises(ValueError, match="all zeros"):
        RowMasks.from_dense([torch.ones(5), torch.zeros(5)], [0, 1])
    with pytest.raises(ValueError, match="row_component"):
        RowMasks.from_dense([torch.ones(5)], [0, 1])


# --- against the reference and against each row alone --------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_single_buffer(backend, sampler, dtype):
    update, device = update_backend(backend)
    comps = _components(N, seed=1)
    rows = [0, 1, 2, None, 5, 3]  # disjoint, overlapping, unrestricted, sparse, one element at the end
    rm = RowMasks.from_dense(comps + [None], [6 if k is None else k for k in rows])
    dense = rm.dense(N)
    w, grad, w_star, stat, hyper = _case(dtype, sampler, len(rows), N, seed=SAMPLERS.index(sampler))
    kwargs = _kwargs(sampler, wd=1e-2 if sampler == "sgld" else 0.0)
    offset = 2**31 + 3  # not a multiple of four
    w_ref, s_ref = _single(reference_update, torch.device("cpu"), w, grad, w_star, stat, rm, hyper, CHAIN_IDS,
                           kwargs, offset)
    w_new, s_new = _single(update, device, w, grad, w_star, stat, rm, hyper, CHAIN_IDS, kwargs, offset)
    _check(backend, dtype, w, w_ref, w_new, s_ref, s_new, dense)
    w_alone, s_alone = _rows_alone(update, device, w, grad, w_star, stat, dense, hyper, CHAIN_IDS, kwargs, offset)
    assert torch.equal(w_new, w_alone)
    if stat is not None:
        assert torch.equal(s_new, s_alone)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_one_full_component_is_the_shared_mask(backend, dtype):
    update, device = update_backend(backend)
    m = (torch.arange(N) % 3 != 1).float()
    m[0] = 1.0
    m[-1] = 1.0  # full length: the window is [0, N)
    rm = RowMasks.from_dense([m], [0] * 4)
    assert rm.windows.tolist() == [[0, N, 0]]
    w, grad, w_star, stat, hyper = _case(dtype, "rmsprop_sgld_bc", 4, N)
    kwargs = _kwargs("rmsprop_sgld_bc")
    shared = _single(update, device, w, grad, w_star, stat, m, hyper, CHAIN_IDS[:4], kwargs, 6)
    rows = _single(update, device, w, grad, w_star, stat, rm, hyper, CHAIN_IDS[:4], kwargs, 6)
    assert torch.equal(shared[0], rows[0]) and torch.equal(shared[1], rows[1])


# --- segments, windows crossing their boundaries; the prepared launch --------------------------------

# (n, local_start, global_offset): gaps, offsets not multiples of four
SEGMENTS = [(3, 1, 2**33 + 5), (1, 5, 7), (517, 6, 2**31 + 1), (2, 530, 0), (301, 540, 2**32 - 2)]
N_LOCAL = 845


def _segments_case(dtype, sampler, chains, seed=0):
    w_full, g_full, w_star, stat, hyper = _case(dtype, sampler, chains, N_LOCAL, seed)
    segs = [(w_full[:, s:s + n].contiguous(), g_full[:, s:s + n].contiguous(), s, o) for n, s, o in SEGMENTS]
    return segs, w_star, stat, hyper


def _run_segments(fn, device, segs, w_star, stat, mask, hyper, chain_ids, kwargs, steps=1):
    to = _to(device)
    mine = [(to(w.clone()), to(g), s, o) for w, g, s, o in segs]
    st = to(None if stat is None else stat.clone())
    mask = _row_masks_to(mask, device) if isinstance(mask, RowMasks) else to(mask)
    hyper = {k: to(v) for k, v in hyper.items()}
    if steps == 1:
        kw = {k: v for k, v in kwargs.items() if k != "counters"}
        fn.prepare(mine, to(w_star), st, mask=mask, chain_ids=torch.tensor(chain_ids), **hyper, **kw).launch(
            kwargs["counters"])
    else:
        kw = {k: v for k, v in kwargs.items() if k != "counters"}
        prepared = fn.prepare(mine, to(w_star), st, mask=mask, chain_ids=torch.tensor(chain_ids), **hyper, **kw)
        for t in range(steps):
            prepared.launch(StepCounters(step=t, update_statistic=t < 2, stat_step=min(t, 1)))
    return [w.cpu() for w, _, _, _ in mine], None if st is None else st.cpu()


def _segments_alone(fn, device, segs, w_star, stat, dense, hyper, chain_ids, kwargs, steps=1):
    ws, sts = [[] for _ in segs], []
    for c in range(len(chain_ids)):
        m = dense[c]
        rs, st = _run_segments(fn, device, [(w[c:c + 1], g[c:c + 1], s, o) for w, g, s, o in segs], w_star,
                               None if stat is None else stat[c:c + 1], None if bool(m.all()) else m,
                               {k: v[c:c + 1] for k, v in hyper.items()}, chain_ids[c:c + 1], kwargs, steps)
        for k, r in enumerate(rs):
            ws[k].append(r)
        sts.append(st)
    return [torch.cat(r) for r in ws], None if stat is None else torch.cat(sts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("steps", [1, 4])
def test_segments_with_windows_across_boundaries(backend, sampler, dtype, steps):
    fn, device = update_backend(backend)
    comps = []
    for lo, hi in [(2, 6), (4, 533), (300, 700), (529, 531), (0, N_LOCAL)]:  # across segment edges and gaps
        m = torch.zeros(N_LOCAL)
        m[lo:hi] = 1.0
        comps.append(m)
    comps[1][100] = 0.0
    rows = [1, 0, -1, 2, 3, 4]
    rm = RowMasks.from_dense(comps + [None], [5 if k < 0 else k for k in rows])
    dense = rm.dense(N_LOCAL)
    segs, w_star, stat, hyper = _segments_case(dtype, sampler, len(rows), seed=7 + SAMPLERS.index(sampler))
    kwargs = _kwargs(sampler)
    from llc_fast.kernels.torch_update import reference_update as ref

    ws_ref, s_ref = _run_segments(ref, torch.device("cpu"), segs, w_star, stat, rm, hyper, CHAIN_IDS, kwargs, steps)
    ws_new, s_new = _run_segments(fn, device, segs, w_star, stat, rm, hyper, CHAIN_IDS, kwargs, steps)
    for (w0, _, s, _), w_ref, w_new in zip(segs, ws_ref, ws_new):
        d = dense[:, s:s + w0.shape[1]]
        if backend == "torch":
            assert torch.equal(w_new, w_ref)
        elif steps == 1:
            _close(dtype, w0, w_ref, w_new)
        frozen = d == 0
        assert torch.equal(w_new[frozen], w0[frozen])
    if s_ref is not None and (backend == "torch" or steps == 1):
        assert torch.equal(s_new, s_ref)
    ws_alone, s_alone = _segments_alone(fn, device, segs, w_star, stat, dense, hyper, CHAIN_IDS, kwargs, steps)
    for w_new, w_alone in zip(ws_new, ws_alone):
        assert torch.equal(w_new, w_alone)
    if stat is not None:
        assert torch.equal(s_new, s_alone)


# --- bad RowMasks ------------------------------------------------------------------------------------


def _bad(rm, match, chains=2, n=8):
    w = torch.zeros(chains, n)
    with pytest.raises(ValueError, match=match):
        reference_update(w, torch.zeros_like(w), torch.zeros(n), None, lr=1e-3, nbeta=1.0, gamma=1.0,
                         settings=SamplerSettings(), counters=StepCounters(step=0), seed=0,
                         chain_ids=torch.arange(chains), mask=rm)


def test_bad_row_masks_are_rejected():
    i64, u8 = torch.int64, torch.uint8
    good_w, good_b, good_c = torch.tensor([[0, 4, 0]], dtype=i64), torch.ones(4, dtype=u8), torch.tensor([0, -1])
    _bad(RowMasks(good_w, good_b, torch.tensor([0, 0, 0])), "has 3 rows but the update has 2")
    _bad(RowMasks(torch.tensor([[0, 9, 0]], dtype=i64), torch.ones(9, dtype=u8), good_c), r"must lie in \[0, N_local = 8\]")
    _bad(RowMasks(torch.tensor([[5, 3, 0]], dtype=i64), good_b, good_c), r"window \[lo, hi\)")
    _bad(RowMasks(torch.tensor([[0, 4, 1]], dtype=i64), good_b, good_c), "outside the buffer")
    _bad(RowMasks(torch.tensor([[0, 4, -1]], dtype=i64), good_b, good_c), "outside the buffer")
    _bad(RowMasks(good_w, good_b, torch.tensor([0, 1])), r"row_component\[1\] = 1")
    _bad(RowMasks(good_w, good_b, torch.tensor([-2, 0])), r"row_component\[0\] = -2")
    _bad(RowMasks(good_w.int(), good_b, good_c), "windows must be an int64")
    _bad(RowMasks(good_w[:, :2], good_b, good_c), "windows must be an int64")
    _bad(RowMasks(good_w, good_b.float(), good_c), "buffer must be a contiguous uint8")
    _bad(RowMasks(good_w, good_b, good_c.int()), "row_component must be an int64")
    _bad(torch.ones(7), r"mask must be a contiguous \[8\]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_unrestricted_is_no_mask(backend):
    update, device = update_backend(backend)
    rm = RowMasks.from_dense([None], [0, 0, 0])
    assert rm.buffer.numel() == 0 and rm.row_component.tolist() == [-1, -1, -1]
    w, grad, w_star, stat, hyper = _case(torch.float32, "rmsprop_sgld", 3, N)
    kwargs = _kwargs("rmsprop_sgld")
    plain = _single(update, device, w, grad, w_star, stat, None, hyper, CHAIN_IDS[:3], kwargs, 1)
    rows = _single(update, device, w, grad, w_star, stat, rm, hyper, CHAIN_IDS[:3], kwargs, 1)
    assert torch.equal(plain[0], rows[0]) and torch.equal(plain[1], rows[1])
