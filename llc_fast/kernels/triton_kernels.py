"""The Triton kernels of the "triton" backend (``triton_update.py`` launches them): the fused
SGLD update of ``reference.py`` for all chains in one launch, single buffer or segments.

The noise is drawn in the kernel with ``tl.philox`` on the counters of ``docs/noise.md``, so it
equals the reference's noise: random words and uniforms bit for bit, normals to about 1e-6.

Layout. The grid is flat: program ``pid`` updates chain ``pid % C`` (neighbouring programs
share the same block of w* and of the mask, which then comes from L2) on a tile of QUADS
quads (four elements each). A tile is [QUADS, 4]: row r holds the four elements of global
quad g = index_offset // 4 + block * QUADS + r, so one Philox call per row serves its
four lanes, and lane j takes word/normal j. The [QUADS, 4] noise tile is built with
``tl.join`` (not ``tl.where`` on the lane index): that keeps a quad's four lanes in one
thread, so on a GPU each Philox call runs once even when unaligned loads get a layout that
spreads a row over four threads. Elements outside the buffer (the partial first quad when
index_offset is not a multiple of four, the tail) are masked. All offsets are int64: element
counts and global indices past 2**31 work.

Arithmetic. float32 and bfloat16 weights are updated in float32, float64 weights in float64
(the noise is drawn in float32 and converted). bfloat16 tensors are read and written through
int16 views with integer bit operations only, and the result is stored by stochastic rounding
with the stream-1 Philox words, exactly as ``philox.stochastic_round_to_bf16``: that is
bit-exact in the Triton interpreter (whose bfloat16 arithmetic and conversions are wrong) and
compiles for sm_80/sm_90. The preconditioner's square root and division use the IEEE-rounded
forms (``sqrt_rn``, ``div_rn``), not Triton's approximate float32 defaults.

Arguments. The mask is a shared [N_local] one (HAS_MASK) or per-row (ROW_MASK: a RowMasks's
buffer and each row's (lo, hi, offset), see ``update_tile``). Per-chain values come as scalars or a [3, C] table (HP_PTR), the settings as
float32 scalars or a float64 [7] table (SP_PTR, float64 weights), the chain indices as a
base or an int64 [C] table (CHAIN_PTR); ``triton_update.py`` chooses.

This module imports without a GPU (it needs triton); ``triton_update.TritonBackend.load`` imports it.
"""
import triton
import triton.language as tl


# --------------------------------------------------------------------------------------------
# Noise: Philox4x32-10 on the counters of docs/noise.md, one call per quad (four elements).
# --------------------------------------------------------------------------------------------


@triton.jit
def philox_words(seed, quads, step, chain, STREAM: tl.constexpr):
    """The four Philox words (uint32) of the global quads ``quads`` (an int64 block) of one chain.

    c0 = g mod 2**32, c1 = g // 2**32, c2 = step, c3 = chain + STREAM * 2**31.
    """
    zero = quads * 0
    c0 = quads.to(tl.uint32)
    c1 = (quads >> 32).to(tl.uint32)
    c2 = (zero + step).to(tl.uint32)
    c3 = (zero + chain).to(tl.uint32)
    if STREAM == 1:
        c3 = c3 | 0x80000000
    return tl.philox(seed, c0, c1, c2, c3)


@triton.jit
def interleave(v0, v1, v2, v3):
    """Four [QUADS] blocks -> the [QUADS, 4] tile whose element (r, j) is v_j[r].

    join(join(v0, v2), join(v1, v3)) is [QUADS, 2, 2] with element (r, a, b) = v_(2a + b)[r].
    Joining (not selecting with tl.where on the lane) keeps the four lanes of a quad in one
    thread, so each quad's Philox call runs once on a GPU whatever layout the loads get.
    """
    return tl.reshape(tl.join(tl.join(v0, v2), tl.join(v1, v3)), (v0.shape[0], 4))


@triton.jit
def noise_tile(seed, quads, step, chain):
    """Standard normals (float32 [QUADS, 4]) of the four elements of each quad: Triton's randn4x."""
    w0, w1, w2, w3 = philox_words(seed, quads, step, chain, 0)
    n0, n1 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w0), tl.uint_to_uniform_float(w1))
    n2, n3 = tl.pair_uniform_to_normal(tl.uint_to_uniform_float(w2), tl.uint_to_uniform_float(w3))
    return interleave(n0, n1, n2, n3)


@triton.jit
def rounding_tile(seed, quads, step, chain):
    """Stochastic-rounding words (uint32 [QUADS, 4]) of the four elements of each quad (stream 1)."""
    w0, w1, w2, w3 = philox_words(seed, quads, step, chain, 1)
    return interleave(w0, w1, w2, w3)


# --------------------------------------------------------------------------------------------
# bfloat16 through integer bit patterns (the interpreter's bf16 arithmetic is wrong).
# --------------------------------------------------------------------------------------------


@triton.jit
def bf16_bits_to_f32(h):
    """int16 bit patterns of bfloat16 values -> the float32 values (exact)."""
    return (h.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def stochastic_round_bf16_bits(x, words):
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
def load_hyper(hp_ptr, sp_ptr, c, num_rows, lr, nbeta, gamma, alpha, one_minus_alpha, scale, eps, wd, box,
                noise_level, HP_PTR: tl.constexpr, SP_PTR: tl.constexpr):
    """Chain c's (lr, nbeta, gamma) and the shared settings, from the scalar arguments or the tables."""
    if HP_PTR:  # per-chain values, [3, C] in the compute dtype
        lr_c = tl.load(hp_ptr + c)
        nbeta_c = tl.load(hp_ptr + num_rows + c)
        gamma_c = tl.load(hp_ptr + 2 * num_rows + c)
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
def tile(block, first_quad, lead, n, QUADS: tl.constexpr):
    """Tile ``block`` of a buffer of n elements whose element 0 is lane ``lead`` of global quad
    ``first_quad``: (its global quads [QUADS], local element indices [QUADS, 4] = 4 * local
    quad + lane - lead, which of them lie in [0, n))."""
    lane = tl.arange(0, 4)[None, :]
    local_quad = block * QUADS + tl.arange(0, QUADS).to(tl.int64)
    idx = local_quad[:, None] * 4 + lane - lead
    return first_quad + local_quad, idx, (idx >= 0) & (idx < n)


@triton.jit
def update_tile(w_ptrs, g_ptrs, ws_ptrs, v_ptrs, m_ptr, m_idx, rw_ptr, valid, quads, c, num_rows, chain_ptr,
                 chain_base, hp_ptr, sp_ptr, lr, nbeta, gamma, alpha, one_minus_alpha, scale, eps, wd, box,
                 noise_level, seed, step, PRECOND: tl.constexpr, UPDATE_V: tl.constexpr, HAS_WD: tl.constexpr,
                 HAS_BOX: tl.constexpr, HAS_MASK: tl.constexpr, ROW_MASK: tl.constexpr, HP_PTR: tl.constexpr,
                 SP_PTR: tl.constexpr, CHAIN_PTR: tl.constexpr, IS_BF16: tl.constexpr, IS_F64: tl.constexpr,
                 LM: tl.constexpr):
    """One [QUADS, 4] tile of chain row c: the pointers address the tile's elements (``valid`` marks the
    real ones), ``quads`` are the tile's global quads, ``m_idx`` their local flat indices.
    The mask: the shared one at ``m_ptr + m_idx`` (HAS_MASK), or row c's of a RowMasks (ROW_MASK:
    ``rw_ptr`` is int64 [C, 3] of each row's (lo, hi, offset), offset < 0 for all ones; element i is
    ``m_ptr[offset + i - lo]`` inside [lo, hi), 0 outside). The chain index comes from
    ``chain_ptr`` (CHAIN_PTR) or is chain_base + c; the settings as in ``load_hyper``. LM (noise_scheme "lm"): the
    noise is the mean of this step's normals and the next step's, in the compute dtype as the reference."""
    if CHAIN_PTR:
        chain = tl.load(chain_ptr + c).to(tl.int64)
    else:
        chain = chain_base + c
    lr_c, nbeta_c, gamma_c, alpha, one_minus_alpha, scale, eps, wd, box, noise_level = load_hyper(
        hp_ptr, sp_ptr, c, num_rows, lr, nbeta, gamma, alpha, one_minus_alpha, scale, eps, wd, box, noise_level,
        HP_PTR, SP_PTR)
    if IS_BF16:
        wc = bf16_bits_to_f32(tl.load(w_ptrs, mask=valid, other=0))
        g = bf16_bits_to_f32(tl.load(g_ptrs, mask=valid, other=0))
        ws = bf16_bits_to_f32(tl.load(ws_ptrs, mask=valid, other=0))
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
    xi = noise_tile(seed, quads, step, chain)
    if IS_F64:
        xi = xi.to(tl.float64)
    if LM:
        xi_next = noise_tile(seed, quads, step + 1, chain)
        if IS_F64:
            xi_next = xi_next.to(tl.float64)
        xi = 0.5 * (xi + xi_next)
    delta = drift_coef * drift + noise_coef * xi
    if HAS_MASK:
        delta = delta * tl.load(m_ptr + m_idx, mask=valid, other=0).to(wc.dtype)
    if ROW_MASK:  # row c's window, looked up once per tile
        lo = tl.load(rw_ptr + 3 * c)
        hi = tl.load(rw_ptr + 3 * c + 1)
        off = tl.load(rw_ptr + 3 * c + 2)
        inside = valid & (m_idx >= lo) & (m_idx < hi) & (off >= 0)
        mv = tl.load(m_ptr + (off + m_idx - lo), mask=inside, other=0).to(tl.int32)
        mv = tl.where(off < 0, 1, mv)
        delta = delta * mv.to(wc.dtype)
    new = wc + delta
    if HAS_BOX:
        new = tl.maximum(new, ws - box, propagate_nan=tl.PropagateNan.ALL)
        new = tl.minimum(new, ws + box, propagate_nan=tl.PropagateNan.ALL)

    if IS_BF16:
        words = rounding_tile(seed, quads, step, chain)
        tl.store(w_ptrs, stochastic_round_bf16_bits(new, words), mask=valid)
    else:
        tl.store(w_ptrs, new, mask=valid)


@triton.jit(do_not_specialize=["seed", "step", "n", "g_first", "chain_base"])
def sgld_update_kernel(
    w_ptr, g_ptr, ws_ptr, v_ptr, m_ptr, rw_ptr, hp_ptr, sp_ptr, chain_ptr,
    lr, nbeta, gamma, alpha, one_minus_alpha, scale, eps, wd, box, noise_level,
    seed, step, n, g_first, chain_base, num_rows,
    QUADS: tl.constexpr, LEAD: tl.constexpr,
    PRECOND: tl.constexpr, UPDATE_V: tl.constexpr, HAS_WD: tl.constexpr, HAS_BOX: tl.constexpr,
    HAS_MASK: tl.constexpr, ROW_MASK: tl.constexpr, HP_PTR: tl.constexpr, SP_PTR: tl.constexpr,
    CHAIN_PTR: tl.constexpr, IS_BF16: tl.constexpr, IS_F64: tl.constexpr, LM: tl.constexpr,
):
    pid = tl.program_id(0)
    c = (pid % num_rows).to(tl.int64)
    quads, idx, valid = tile((pid // num_rows).to(tl.int64), g_first, LEAD, n, QUADS)
    offs = c * n + idx
    update_tile(w_ptr + offs, g_ptr + offs, ws_ptr + idx, v_ptr + offs, m_ptr, idx, rw_ptr, valid, quads, c,
                 num_rows, chain_ptr, chain_base, hp_ptr, sp_ptr, lr, nbeta, gamma, alpha, one_minus_alpha, scale,
                 eps, wd, box, noise_level, seed, step, PRECOND, UPDATE_V, HAS_WD, HAS_BOX, HAS_MASK, ROW_MASK, HP_PTR,
                 SP_PTR, CHAIN_PTR, IS_BF16, IS_F64, LM)


#: Columns of the Triton segment table (int64 [P, 6], P a power of two, rows past the segments padded
#: with first_block = 2**62): w pointer, grad pointer, n, local_start, global_offset, first block.
SEG_COLS = tl.constexpr(6)


@triton.jit(do_not_specialize=["seed", "step", "n_local", "chain_base"])
def sgld_update_segments_kernel(
    seg_ptr, ws_ptr, v_ptr, m_ptr, rw_ptr, hp_ptr, sp_ptr, chain_ptr,
    lr, nbeta, gamma, alpha, one_minus_alpha, scale, eps, wd, box, noise_level,
    seed, step, n_local, chain_base, num_rows,
    QUADS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    PRECOND: tl.constexpr, UPDATE_V: tl.constexpr, HAS_WD: tl.constexpr, HAS_BOX: tl.constexpr,
    HAS_MASK: tl.constexpr, ROW_MASK: tl.constexpr, HP_PTR: tl.constexpr, SP_PTR: tl.constexpr,
    CHAIN_PTR: tl.constexpr, IS_BF16: tl.constexpr, IS_F64: tl.constexpr, LM: tl.constexpr,
):
    """All segments of a multi-segment update in one launch. Program pid updates chain pid % C on
    block pid // C of the blocks of all segments, numbered segment after segment; its segment is
    found by a binary search over the table's first-block column (SEARCH_STEPS = log2 of its rows)."""
    pid = tl.program_id(0)
    c = (pid % num_rows).to(tl.int64)
    blk = (pid // num_rows).to(tl.int64)
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
    if IS_BF16:  # bfloat16 moves as int16 bit patterns
        w_ptr = w_addr.to(tl.pointer_type(tl.int16))
        g_ptr = g_addr.to(tl.pointer_type(tl.int16))
    elif IS_F64:
        w_ptr = w_addr.to(tl.pointer_type(tl.float64))
        g_ptr = g_addr.to(tl.pointer_type(tl.float64))
    else:
        w_ptr = w_addr.to(tl.pointer_type(tl.float32))
        g_ptr = g_addr.to(tl.pointer_type(tl.float32))

    quads, idx, valid = tile(blk - tl.load(row + 5), offset // 4, offset % 4, n, QUADS)
    offs = c * n + idx
    flat = local_start + idx
    update_tile(w_ptr + offs, g_ptr + offs, ws_ptr + flat, v_ptr + (c * n_local + flat), m_ptr, flat, rw_ptr, valid,
                 quads, c, num_rows, chain_ptr, chain_base, hp_ptr, sp_ptr, lr, nbeta, gamma, alpha,
                 one_minus_alpha, scale, eps, wd, box, noise_level, seed, step, PRECOND, UPDATE_V, HAS_WD, HAS_BOX,
                 HAS_MASK, ROW_MASK, HP_PTR, SP_PTR, CHAIN_PTR, IS_BF16, IS_F64, LM)
