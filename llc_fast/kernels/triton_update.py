"""The fused SGLD update as one Triton kernel: all chains, one launch per step.

Same signature and math as ``reference.reference_update`` (``docs/update.md``); the noise is
drawn in the kernel with ``tl.philox`` on the counters of ``docs/noise.md``, so it equals the
reference's noise: random words and uniforms bit for bit, normals to about 1e-6.

Layout. The grid is flat: program ``pid`` updates chain ``pid % C`` (neighbouring programs
share the same block of w* and of the mask, which then comes from L2) on a tile of GROUPS
groups of four elements. A tile is [GROUPS, 4]: row r holds the four elements of global
group g = index_offset // 4 + block * GROUPS + r, so one Philox call per row serves its
four lanes, and lane j takes word/normal j. The [GROUPS, 4] noise tile is built with
``tl.join`` (not ``tl.where`` on the lane index): that keeps a group's four lanes in one
thread, so on a GPU each Philox call runs once even when unaligned loads get a layout that
spreads a row over four threads. Elements outside the buffer (the partial first group when
index_offset is not a multiple of four, the tail) are masked. All offsets are int64: element
counts and global indices past 2**31 work.

Arithmetic. float32 and bfloat16 weights are updated in float32, float64 weights in float64
(the noise is drawn in float32 and converted). bfloat16 tensors are read and written through
int16 views with integer bit operations only, and the result is stored by stochastic rounding
with the stream-1 Philox words, exactly as ``philox.stochastic_round_to_bf16``: that is
bit-exact in the Triton interpreter (whose bfloat16 arithmetic and conversions are wrong) and
compiles for sm_80/sm_90. The preconditioner's square root and division use the IEEE-rounded
forms (``sqrt_rn``, ``div_rn``), not Triton's approximate float32 defaults.

Hyperparameters. Python numbers go to the kernel as float32 scalars (no host-to-device copy
per step); per-chain tensors as a [3, C] device tensor. For float64 weights every value goes
through a float64 device tensor, since Triton passes Python floats as float32.

This module imports without a GPU; dispatch.py imports it lazily.
"""
import os

import torch
import triton
import triton.language as tl

from . import philox
from .reference import check_segments, check_update_args, compute_dtype
from .update_spec import SamplerSettings, StepCounters, per_chain

# Groups of four elements per program: 256 groups = 1024 elements with 8 warps on a GPU; the
# interpreter pays per program, so it takes up to 16384 groups = 65536 elements at once.
GPU_GROUPS = 256
GPU_NUM_WARPS = 8
INTERPRETER_GROUPS = 16384
MAX_PROGRAMS = 2**31 - 1


# --------------------------------------------------------------------------------------------
# Noise: Philox4x32-10 on the counters of docs/noise.md, one call per group of four elements.
# --------------------------------------------------------------------------------------------


@triton.jit
def _philox_words(seed, groups, step, chain, STREAM: tl.constexpr):
    """The four Philox words (uint32) of the global groups ``groups`` (an int64 block) of one chain.

    c0 = g mod 2**32, c1 = g // 2**32, c2 = step, c3 = chain + STREAM * 2**31.
    """
    zero = groups * 0
    c0 = groups.to(tl.uint32)
    c1 = (groups >> 32).to(tl.uint32)
    c2 = (zero + step).to(tl.uint32)
    c3 = (zero + chain).to(tl.uint32)
    if STREAM == 1:
        c3 = c3 | 0x80000000
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def _interleave(v0, v1, v2, v3):
    """Four [GROUPS] blocks -> the [GROUPS, 4] tile whose element (r, j) is v_j[r].

    join(join(v0, v2), join(v1, v3)) is [GROUPS, 2, 2] with element (r, a, b) = v_(2a + b)[r].
    Joining (not selecting with tl.where on the lane) keeps the four lanes of a group in one
    thread, so each group's Philox call runs once on a GPU whatever layout the loads get.
    """
    return tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (v0.shape[0], 4))


@triton.jit
def _noise_tile(seed, groups, step, chain):
    """Standard normals (float32 [GROUPS, 4]) of the four elements of each group: Triton's randn4x."""
    w0, w1, w2, w3 = _philox_words(seed, groups, step, chain, 0)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3))
    return _interleave(n0, n1, n2, n3)


@triton.jit
def _rounding_tile(seed, groups, step, chain):
    """Stochastic-rounding words (uint32 [GROUPS, 4]) of the four elements of each group (stream 1)."""
    w0, w1, w2, w3 = _philox_words(seed, groups, step, chain, 1)
    return _interleave(w0, w1, w2, w3)


# --------------------------------------------------------------------------------------------
# bfloat16 through integer bit patterns (the interpreter's bf16 arithmetic is wrong).
# --------------------------------------------------------------------------------------------


@triton.jit
def _bf16_bits_to_f32(h):
    """int16 bit patterns of bfloat16 values -> the float32 values (exact)."""
    return (h.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def _stochastic_round_bf16_bits(x, words):
    """float32 -> int16 bit pattern of bfloat16: (bits(x) + (word mod 2**16)) >> 16.

    Infinities round to themselves (adding < 2**16 to their pattern keeps the upper half), so
    only NaN needs another branch: its upper half with the quiet bit set, a NaN of the same
    sign (torch's own conversions disagree on the NaN pattern: 0x7FC0 scalar, 0xFFFF vectorised).
    """
    bits = x.to(tl.uint32, bitcast=True)
    upper = (bits + (words & 0xFFFF)) >> 16
    is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
    upper = tl.where(is_nan, (bits >> 16) | 0x40, upper)
    return upper.to(tl.int16)


# --------------------------------------------------------------------------------------------
# The update kernel.
# --------------------------------------------------------------------------------------------


@triton.jit
def _load_hyper(hp_ptr, sp_ptr, c, num_chains, lr, nbeta, gamma, alpha, one_minus_alpha, scale, eps, wd, box,
                noise_level, HP_PTR: tl.constexpr, SP_PTR: tl.constexpr):
    """Chain c's (lr, nbeta, gamma) and the shared settings, from the scalar arguments or the tables."""
    if HP_PTR:  # per-chain values, [3, C] in the compute dtype
        lr_c = tl.load(hp_ptr + c)
        nbeta_c = tl.load(hp_ptr + num_chains + c)
        gamma_c = tl.load(hp_ptr + 2 * num_chains + c)
    else:
        lr_c = lr
        nbeta_c = nbeta
        gamma_c = gamma
    if SP_PTR:  # float64: alpha, 1 - alpha, scale, eps, weight decay, box, noise level
        alpha = tl.load(sp_ptr + 0)
        one_minus_alpha = tl.load(sp_ptr + 1)
        scale = tl.load(sp_ptr + 2)
        eps = tl.load(sp_ptr + 3)
        wd = tl.load(sp_ptr + 4)
        box = tl.load(sp_ptr + 5)
        noise_level = tl.load(sp_ptr + 6)
    return lr_c, nbeta_c, gamma_c, alpha, one_minus_alpha, scale, eps, wd, box, noise_level


@triton.jit
def _update_tile(w_ptrs, g_ptrs, ws_ptrs, v_ptrs, m_ptrs, valid, groups, chain,
                 lr_c, nbeta_c, gamma_c, alpha, one_minus_alpha, scale, eps, wd, box, noise_level, seed, step,
                 PRECOND: tl.constexpr, UPDATE_V: tl.constexpr, HAS_WD: tl.constexpr, HAS_BOX: tl.constexpr,
                 HAS_MASK: tl.constexpr, IS_BF16: tl.constexpr, IS_F64: tl.constexpr):
    """One [GROUPS, 4] tile of one chain: the pointers address the tile's elements (``valid`` marks the
    real ones), ``groups`` are the tile's global groups of four."""
    if IS_BF16:
        wc = _bf16_bits_to_f32(tl.load(w_ptrs, mask=valid, other=0))
        g = _bf16_bits_to_f32(tl.load(g_ptrs, mask=valid, other=0))
        ws = _bf16_bits_to_f32(tl.load(ws_ptrs, mask=valid, other=0))
    else:
        wc = tl.load(w_ptrs, mask=valid, other=0.0)
        g = tl.load(g_ptrs, mask=valid, other=0.0)
        ws = tl.load(ws_ptrs, mask=valid, other=0.0)

    # G = 1 / (sqrt(V * s_t) + eps); the statistic takes this step's gradient before use.
    if PRECOND:
        v = tl.load(v_ptrs, mask=valid, other=0.0)
        if UPDATE_V:
            v = alpha * v + one_minus_alpha * (g * g)
            tl.store(v_ptrs, v, mask=valid)
        if IS_F64:
            precond = 1.0 / (tl.sqrt(v * scale) + eps)
        else:
            precond = tl.div_rn(1.0, tl.sqrt_rn(v * scale) + eps)
        drift_coef = (-(0.5 * lr_c)) * precond
        if IS_F64:
            noise_coef = noise_level * tl.sqrt(lr_c * precond)
        else:
            noise_coef = noise_level * tl.sqrt_rn(lr_c * precond)
    else:
        drift_coef = -(0.5 * lr_c)
        if IS_F64:
            noise_coef = noise_level * tl.sqrt(lr_c)
        else:
            noise_coef = noise_level * tl.sqrt_rn(lr_c)

    drift = nbeta_c * g + gamma_c * (wc - ws)
    if HAS_WD:
        drift = drift + wd * wc
    xi = _noise_tile(seed, groups, step, chain)
    if IS_F64:
        xi = xi.to(tl.float64)
    delta = drift_coef * drift + noise_coef * xi
    if HAS_MASK:
        delta = delta * tl.load(m_ptrs, mask=valid, other=0).to(wc.dtype)
    new = wc + delta
    if HAS_BOX:
        new = tl.maximum(new, ws - box, propagate_nan=tl.PropagateNan.ALL)
        new = tl.minimum(new, ws + box, propagate_nan=tl.PropagateNan.ALL)

    if IS_BF16:
        words = _rounding_tile(seed, groups, step, chain)
        tl.store(w_ptrs, _stochastic_round_bf16_bits(new, words), mask=valid)
    else:
        tl.store(w_ptrs, new, mask=valid)




@triton.jit(do_not_specialize=["seed", "step", "n", "g_first", "chain_base"])
def _sgld_update_kernel(
    w_ptr, g_ptr, ws_ptr, v_ptr, m_ptr, hp_ptr, sp_ptr, chain_ptr,
    lr, nbeta, gamma, alpha, one_minus_alpha, scale, eps, wd, box, noise_level,
    seed, step, n, g_first, chain_base, num_chains,
    GROUPS: tl.constexpr, LEAD: tl.constexpr,
    PRECOND: tl.constexpr, UPDATE_V: tl.constexpr, HAS_WD: tl.constexpr, HAS_BOX: tl.constexpr,
    HAS_MASK: tl.constexpr, HP_PTR: tl.constexpr, SP_PTR: tl.constexpr, CHAIN_PTR: tl.constexpr,
    IS_BF16: tl.constexpr, IS_F64: tl.constexpr,
):
    pid = tl.program_id(0)
    c = (pid % num_chains).to(tl.int64)
    block = (pid // num_chains).to(tl.int64)

    # The tile: GROUPS global groups of four; local element index = 4 * local group + lane - LEAD.
    lane = tl.arange(0, 4)[None, :]
    local_group = block * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    groups = g_first + local_group
    idx = local_group[:, None] * 4 + lane - LEAD
    valid = (idx >= 0) & (idx < n)
    offs = c * n + idx

    if CHAIN_PTR:
        chain = tl.load(chain_ptr + c).to(tl.int64)
    else:
        chain = chain_base + c

    lr_c, nbeta_c, gamma_c, alpha, one_minus_alpha, scale, eps, wd, box, noise_level = _load_hyper(
        hp_ptr, sp_ptr, c, num_chains, lr, nbeta, gamma, alpha, one_minus_alpha, scale, eps, wd, box, noise_level,
        HP_PTR, SP_PTR)
    _update_tile(w_ptr + offs, g_ptr + offs, ws_ptr + idx, v_ptr + offs, m_ptr + idx, valid, groups, chain,
                 lr_c, nbeta_c, gamma_c, alpha, one_minus_alpha, scale, eps, wd, box, noise_level, seed, step,
                 PRECOND, UPDATE_V, HAS_WD, HAS_BOX, HAS_MASK, IS_BF16, IS_F64)


#: Columns of the Triton segment table (int64 [P, 6], P a power of two, rows past the segments padded
#: with first_block = 2**62): w pointer, grad pointer, n, local_start, global_offset, first block.
SEG_COLS = tl.constexpr(6)


@triton.jit(do_not_specialize=["seed", "step", "n_local", "chain_base"])
def _sgld_update_segments_kernel(
    seg_ptr, ws_ptr, v_ptr, m_ptr, hp_ptr, sp_ptr, chain_ptr,
    lr, nbeta, gamma, alpha, one_minus_alpha, scale, eps, wd, box, noise_level,
    seed, step, n_local, chain_base, num_chains,
    GROUPS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    PRECOND: tl.constexpr, UPDATE_V: tl.constexpr, HAS_WD: tl.constexpr, HAS_BOX: tl.constexpr,
    HAS_MASK: tl.constexpr, HP_PTR: tl.constexpr, SP_PTR: tl.constexpr, CHAIN_PTR: tl.constexpr,
    IS_BF16: tl.constexpr, IS_F64: tl.constexpr,
):
    """All segments of a multi-segment update in one launch. Program pid updates chain pid % C on
    block pid // C of the blocks of all segments, numbered segment after segment; its segment is
    found by a binary search over the table's first-block column (SEARCH_STEPS = log2 of its rows)."""
    pid = tl.program_id(0)
    c = (pid % num_chains).to(tl.int64)
    blk = (pid // num_chains).to(tl.int64)
    s = blk * 0  # the last segment whose first block is <= blk (row 0 starts at block 0)
    for i in tl.static_range(SEARCH_STEPS):
        cand = s + (1 << (SEARCH_STEPS - 1 - i))
        first = tl.load(seg_ptr + cand * SEG_COLS + 5)
        s = tl.where(first <= blk, cand, s)
    row = seg_ptr + s * SEG_COLS
    w_addr = tl.load(row + 0)
    g_addr = tl.load(row + 1)
    n = tl.load(row + 2)
    local_start = tl.load(row + 3)
    offset = tl.load(row + 4)
    block = blk - tl.load(row + 5)
    if IS_BF16:  # bfloat16 moves as int16 bit patterns
        w_ptr = w_addr.to(tl.pointer_type(tl.int16))
        g_ptr = g_addr.to(tl.pointer_type(tl.int16))
    elif IS_F64:
        w_ptr = w_addr.to(tl.pointer_type(tl.float64))
        g_ptr = g_addr.to(tl.pointer_type(tl.float64))
    else:
        w_ptr = w_addr.to(tl.pointer_type(tl.float32))
        g_ptr = g_addr.to(tl.pointer_type(tl.float32))

    lead = offset % 4
    lane = tl.arange(0, 4)[None, :]
    local_group = block * GROUPS + tl.arange(0, GROUPS).to(tl.int64)
    groups = offset // 4 + local_group
    idx = local_group[:, None] * 4 + lane - lead
    valid = (idx >= 0) & (idx < n)
    offs = c * n + idx
    flat = local_start + idx

    if CHAIN_PTR:
        chain = tl.load(chain_ptr + c).to(tl.int64)
    else:
        chain = chain_base + c
    lr_c, nbeta_c, gamma_c, alpha, one_minus_alpha, scale, eps, wd, box, noise_level = _load_hyper(
        hp_ptr, sp_ptr, c, num_chains, lr, nbeta, gamma, alpha, one_minus_alpha, scale, eps, wd, box, noise_level,
        HP_PTR, SP_PTR)
    _update_tile(w_ptr + offs, g_ptr + offs, ws_ptr + flat, v_ptr + (c * n_local + flat), m_ptr + flat, valid, groups,
                 chain, lr_c, nbeta_c, gamma_c, alpha, one_minus_alpha, scale, eps, wd, box, noise_level, seed, step,
                 PRECOND, UPDATE_V, HAS_WD, HAS_BOX, HAS_MASK, IS_BF16, IS_F64)


# --------------------------------------------------------------------------------------------
# Launcher.
# --------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _is_number(value) -> bool:
    return isinstance(value, (int, float))


def _f32(value: float) -> float:
    """A Python float rounded to float32 (as torch and the kernel's float32 argument both do)."""
    return float(torch.tensor(float(value), dtype=torch.float32))


def _chain_ids(chain_ids, num_chains: int, device: torch.device):
    """(device tensor or None, base): a contiguous range base..base+C-1 on the host needs no tensor."""
    chain_ids = torch.as_tensor(chain_ids)
    if chain_ids.shape != (num_chains,):
        raise ValueError(f"chain_ids must have shape ({num_chains},), got {tuple(chain_ids.shape)}")
    if chain_ids.dtype.is_floating_point or chain_ids.dtype.is_complex or chain_ids.dtype == torch.bool:
        raise ValueError(f"chain_ids must be integers, got {chain_ids.dtype}")
    if chain_ids.device.type == "cpu":  # checked here for free; device chain ids are trusted (no sync)
        ids = chain_ids.to(torch.int64)
        if num_chains and not (0 <= int(ids.min()) and int(ids.max()) <= philox.MAX_CHAIN):
            raise ValueError(f"chain indices must lie in [0, 2**31), got {ids.tolist()}")
        base = int(ids[0]) if num_chains else 0
        if torch.equal(ids, base + torch.arange(num_chains, dtype=torch.int64)):
            return None, base
    return chain_ids.to(device=device, dtype=torch.int64).contiguous(), 0


def _hyper_args(lr, nbeta, gamma, settings, counters, num_chains, device, cdt, is_f64):
    """(hp table or None, (lr, nbeta, gamma) scalars, sp table or None, the 7 setting scalars)."""
    # Hyperparameters: float32 scalar arguments where possible, else device tensors.
    scalars = not is_f64 and all(_is_number(v) for v in (lr, nbeta, gamma))
    if scalars:
        hp = None
        lr_s, nbeta_s, gamma_s = (_f32(v) for v in (lr, nbeta, gamma))
    else:
        hp = torch.stack([
            torch.full((num_chains,), float(v), dtype=cdt, device=device) if _is_number(v)
            else per_chain(v, num_chains, device, cdt)
            for v in (lr, nbeta, gamma)
        ]).contiguous()
        lr_s = nbeta_s = gamma_s = 0.0
    alpha = settings.rmsprop_alpha
    values = [
        alpha, 1.0 - alpha, settings.statistic_scale(counters.stat_step) if settings.preconditioned else 1.0,
        settings.rmsprop_eps, settings.weight_decay, settings.box if settings.box is not None else 0.0,
        settings.noise_level,
    ]
    if is_f64:
        sp = torch.tensor(values, dtype=torch.float64).to(device)
        values = [0.0] * len(values)
    else:
        sp = None
        values = [_f32(v) for v in values]

    return hp, (lr_s, nbeta_s, gamma_s), sp, values


def triton_update(
    w: torch.Tensor,
    grad: torch.Tensor,
    w_star: torch.Tensor,
    stat: torch.Tensor | None,
    *,
    lr: float | torch.Tensor,
    nbeta: float | torch.Tensor,
    gamma: float | torch.Tensor,
    settings: SamplerSettings,
    counters: StepCounters,
    seed: int,
    chain_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
    index_offset: int = 0,
) -> None:
    """Apply one sampler step in place to ``w`` [C, N] (and ``stat``): ``reference_update`` in one launch.

    Arguments as in ``reference.reference_update``. Tensors must be on a CUDA device (or, with
    TRITON_INTERPRET=1, anywhere). Chain indices given on the host are range-checked; chain
    indices already on the device are used as given (checking them would synchronise).
    """
    check_update_args(w, grad, w_star, stat, mask, settings)
    seed, step, index_offset = int(seed), int(counters.step), int(index_offset)
    device = w.device
    interpreting = _interpreting()
    if device.type != "cuda" and not interpreting:
        raise ValueError(f"triton_update needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    for name, t in (("grad", grad), ("w_star", w_star), ("stat", stat if settings.preconditioned else None)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
    if not 0 <= seed <= philox.MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    if not 0 <= step <= philox.MAX_STEP:
        raise ValueError(f"step must lie in [0, 2**32), got {step}")
    if index_offset < 0:
        raise ValueError(f"index_offset must be >= 0, got {index_offset}")
    num_chains, n = w.shape
    if index_offset + n > 2**62:
        raise ValueError(f"global element indices must stay below 2**62, got index_offset={index_offset}, n={n}")

    cdt = compute_dtype(w.dtype)
    is_f64 = w.dtype == torch.float64
    is_bf16 = w.dtype == torch.bfloat16
    chain_tensor, chain_base = _chain_ids(chain_ids, num_chains, device)

    hp, (lr_s, nbeta_s, gamma_s), sp, values = _hyper_args(lr, nbeta, gamma, settings, counters, num_chains, device,
                                                           cdt, is_f64)

    if num_chains == 0 or n == 0:
        return
    lead = index_offset % 4
    g_first = index_offset // 4
    num_groups = (lead + n + 3) // 4
    if interpreting:
        groups = min(INTERPRETER_GROUPS, max(16, triton.next_power_of_2(num_groups)))
    else:
        groups = GPU_GROUPS
    num_blocks = triton.cdiv(num_groups, groups)
    if num_blocks * num_chains > MAX_PROGRAMS:
        raise ValueError(f"{num_chains} chains x {n} elements exceed one launch ({MAX_PROGRAMS} programs)")

    if is_bf16:  # bfloat16 moves as int16 bit patterns
        w_arg, g_arg, ws_arg = w.view(torch.int16), grad.view(torch.int16), w_star.view(torch.int16)
    else:
        w_arg, g_arg, ws_arg = w, grad, w_star
    if mask is not None:
        if mask.device != device:
            mask = mask.to(device)
        if mask.dtype == torch.bool:
            mask = mask.view(torch.uint8)
        elif mask.dtype in (torch.bfloat16, torch.float16):  # no half-precision loads in the kernel
            mask = mask.to(cdt)
    dummy = w_arg
    _sgld_update_kernel[(num_blocks * num_chains,)](
        w_arg, g_arg, ws_arg,
        stat if settings.preconditioned else dummy,
        mask if mask is not None else dummy,
        hp if hp is not None else dummy,
        sp if sp is not None else dummy,
        chain_tensor if chain_tensor is not None else dummy,
        lr_s, nbeta_s, gamma_s, *values,
        seed, step, n, g_first, chain_base, num_chains,
        GROUPS=groups, LEAD=lead,
        PRECOND=settings.preconditioned, UPDATE_V=settings.preconditioned and counters.update_statistic,
        HAS_WD=settings.weight_decay != 0.0, HAS_BOX=settings.box is not None, HAS_MASK=mask is not None,
        HP_PTR=hp is not None, SP_PTR=sp is not None, CHAIN_PTR=chain_tensor is not None,
        IS_BF16=is_bf16, IS_F64=is_f64,
        num_warps=GPU_NUM_WARPS,
    )


def _prepare_mask(mask, device, cdt):
    if mask is None:
        return None
    if mask.device != device:
        mask = mask.to(device)
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)
    elif mask.dtype in (torch.bfloat16, torch.float16):  # no half-precision loads in the kernel
        mask = mask.to(cdt)
    return mask


def triton_update_segments(
    segments,
    w_star: torch.Tensor,
    stat: torch.Tensor | None,
    *,
    lr: float | torch.Tensor,
    nbeta: float | torch.Tensor,
    gamma: float | torch.Tensor,
    settings: SamplerSettings,
    counters: StepCounters,
    seed: int,
    chain_ids: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> None:
    """``reference.reference_update_segments`` in ONE launch over all segments.

    segments: (w_k [C, n_k], grad_k [C, n_k], local_start_k, global_offset_k); w_star [N_local],
    stat [C, N_local], mask [N_local]: segment k is columns [local_start_k, local_start_k + n_k) of
    them, and its element j gets the noise of global index global_offset_k + j. The kernel reads
    a small int64 table (one row per segment: pointers as integers, sizes, offsets, first block)
    copied to the device each call; the offset's remainder mod 4 is a runtime value here, so a
    segment's loads are not known to be aligned (the single-buffer kernel's LEAD is a constant).
    """
    segs = check_segments(segments, w_star, stat, mask, settings)
    seed, step = int(seed), int(counters.step)
    device = w_star.device
    interpreting = _interpreting()
    if device.type != "cuda" and not interpreting:
        raise ValueError(f"triton_update_segments needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    for k, (w, grad, _, offset) in enumerate(segs):
        if w.device != device or grad.device != device:
            raise ValueError(f"segment {k} must be on {device}, got {w.device} and {grad.device}")
        if offset + w.shape[1] > 2**62:
            raise ValueError(f"global element indices must stay below 2**62, got segment {k} at {offset}")
    if settings.preconditioned and stat.device != device:
        raise ValueError(f"stat must be on {device}, got {stat.device}")
    if not 0 <= seed <= philox.MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed}")
    if not 0 <= step <= philox.MAX_STEP:
        raise ValueError(f"step must lie in [0, 2**32), got {step}")
    segs = [sg for sg in segs if sg[0].shape[1] > 0]
    if not segs:
        return
    num_chains = segs[0][0].shape[0]
    n_local = w_star.shape[0]
    dtype = w_star.dtype
    cdt = compute_dtype(dtype)
    is_f64 = dtype == torch.float64
    is_bf16 = dtype == torch.bfloat16
    chain_tensor, chain_base = _chain_ids(chain_ids, num_chains, device)
    hp, (lr_s, nbeta_s, gamma_s), sp, values = _hyper_args(lr, nbeta, gamma, settings, counters, num_chains, device,
                                                           cdt, is_f64)
    if num_chains == 0:
        return

    seg_groups = [(offset % 4 + w.shape[1] + 3) // 4 for w, _, _, offset in segs]
    if interpreting:
        groups = min(INTERPRETER_GROUPS, max(16, triton.next_power_of_2(max(seg_groups))))
    else:
        groups = GPU_GROUPS
    rows, first = [], 0
    for (w, grad, start, offset), ng in zip(segs, seg_groups):
        rows.append([w.data_ptr(), grad.data_ptr(), w.shape[1], start, offset, first])
        first += triton.cdiv(ng, groups)
    total_blocks = first
    if total_blocks * num_chains > MAX_PROGRAMS:
        raise ValueError(f"{num_chains} chains x {total_blocks} blocks exceed one launch ({MAX_PROGRAMS} programs)")
    search_steps = max(1, (len(rows) - 1).bit_length())
    rows += [[0, 0, 0, 0, 0, 2**62]] * ((1 << search_steps) - len(rows))
    table = torch.tensor(rows, dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)

    ws_arg = w_star.view(torch.int16) if is_bf16 else w_star
    mask = _prepare_mask(mask, device, cdt)
    dummy = ws_arg
    _sgld_update_segments_kernel[(total_blocks * num_chains,)](
        table, ws_arg,
        stat if settings.preconditioned else dummy,
        mask if mask is not None else dummy,
        hp if hp is not None else dummy,
        sp if sp is not None else dummy,
        chain_tensor if chain_tensor is not None else dummy,
        lr_s, nbeta_s, gamma_s, *values,
        seed, step, n_local, chain_base, num_chains,
        GROUPS=groups, SEARCH_STEPS=search_steps,
        PRECOND=settings.preconditioned, UPDATE_V=settings.preconditioned and counters.update_statistic,
        HAS_WD=settings.weight_decay != 0.0, HAS_BOX=settings.box is not None, HAS_MASK=mask is not None,
        HP_PTR=hp is not None, SP_PTR=sp is not None, CHAIN_PTR=chain_tensor is not None,
        IS_BF16=is_bf16, IS_F64=is_f64,
        num_warps=GPU_NUM_WARPS,
    )


triton_update.update_segments = triton_update_segments
