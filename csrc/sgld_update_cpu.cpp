// The fused SGLD update on the CPU: one pass over memory, OpenMP over (chain, block of quads),
// SIMD within a block.
//
// A pybind11 module without torch headers: tensors arrive as raw data pointers in one UpdateArgs
// (sgld_update.h), filled by llc_fast/kernels/native.py after the checks of update_call.py.
// Build flags (llc_fast/kernels/build.py): -O3 -fopenmp -ffp-contract=off -fno-math-errno, plus
// -march=native where the compiler takes it. -ffp-contract=off: no fused multiply-add is formed
// implicitly, so the deterministic part of the update is the reference's sequence of correctly
// rounded operations (bit-identical to torch's where torch's own ops are correctly rounded); the
// noise code below asks for its fused multiply-adds explicitly. -fno-math-errno lets sqrtf be
// one (vector) instruction. No -ffast-math (it would reassociate and approximate the update).
//
// Each work item (chain c, block of kQuadsPerBlock quads (four elements each)) runs tiles of
// kTileQuads quads through three phases over L1-resident scratch arrays (per thread):
//
//   1. Philox4x32-10 of the tile's quads, structure of arrays (word j of quad k in
//      words[j][k]): AVX-512 / AVX2 intrinsics, 8 / 4 quads per register with each 32-bit
//      counter word in the low half of a 64-bit lane, so that one vpmuludq gives both halves of a
//      32x32 -> 64 product; a portable scalar loop otherwise. Bit-exact (same integer function).
//   2. Words -> uniforms (bit-exact, Triton's conversion) -> normals, in a vectorizable loop with
//      float32 log and sin/cos of our own (polynomials, fused multiply-adds). Measured: r =
//      sqrt(-2 log u) within 1 ulp for every uniform, cos and sin within 1.5e-7 for every angle,
//      2^24 random normals within 7e-7 of the exact Box-Muller of the float32 uniforms (torch's
//      too; docs/noise.md allows 1e-5, the tests check 1e-5 and 2e-6). Stored in element order.
//   3. The update over the tile's contiguous elements in a vectorizable loop: one loop per
//      (dtype, sampler kind, statistic update, mask, weight decay), the box clamp unconditional
//      (an infinite box without one), bfloat16 stochastic rounding with integer ops. Same
//      operations in the same order as update_element (sgld_update.h) and the reference.
#include <pybind11/pybind11.h>

#include <omp.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "philox.h"
#include "sgld_update.h"

namespace py = pybind11;

namespace llc {
namespace {

constexpr int64_t kQuadsPerBlock = 1024;  // 4096 elements per OpenMP work item
#ifndef LLC_TILE_QUADS  // (a macro for experiments)
#define LLC_TILE_QUADS 128
#endif
// 512 elements per tile, 8 KB of scratch. Small tiles keep the loads of phase 3 coming often
// enough for the hardware prefetchers to keep streaming while phases 1 and 2 compute: measured
// on Zen 4, 2^24 float32 elements, tiles of 1024 elements were 20-30% slower with 2 threads
// (software prefetching of the next tile during phases 1-2 was slower still).
constexpr int64_t kTileQuads = LLC_TILE_QUADS;
constexpr int64_t kPhiloxBatch = 32;  // phase 1 computes quads in multiples of this
static_assert(kQuadsPerBlock % kTileQuads == 0 && kTileQuads % kPhiloxBatch == 0, "tile sizes");

#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define LLC_FMAF(a, b, c) __builtin_fmaf((a), (b), (c))
#else  // no hardware FMA: a libm fmaf call would be slow, two roundings are accurate enough here
#define LLC_FMAF(a, b, c) ((a) * (b) + (c))
#endif

inline uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
}
inline float float_of(uint32_t b) {
  float x;
  std::memcpy(&x, &b, sizeof(x));
  return x;
}

// ------------------------------------------------------------------------------------------
// Phase 1: Philox words of quads g0 .. g0 + nquads - 1 (nquads a multiple of kPhiloxBatch)
// into w0[k], w1[k], w2[k], w3[k]. Counters as quad_words (philox.h): c0 = g mod 2^32,
// c1 = g / 2^32, c2 = step, c3 = chain | stream << 31; key = the seed's two words.
// ------------------------------------------------------------------------------------------

#if defined(__AVX512F__)
#define LLC_PHILOX_IMPL "avx512"
void philox_quads(uint64_t seed, uint32_t chain, uint32_t step, uint32_t stream, uint64_t g0, int64_t nquads,
                   uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  constexpr int U = 4;  // independent vectors in flight (the round is a chain of dependent ops)
  const __m512i mul_a = _mm512_set1_epi64(kPhiloxRoundA);
  const __m512i mul_b = _mm512_set1_epi64(kPhiloxRoundB);
  __m512i key0[kPhiloxRounds], key1[kPhiloxRounds];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    key0[r] = _mm512_set1_epi32(static_cast<int>(k0));
    key1[r] = _mm512_set1_epi32(static_cast<int>(k1));
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const __m512i cstep = _mm512_set1_epi32(static_cast<int>(step));
  const __m512i cchain = _mm512_set1_epi32(static_cast<int>(chain | (stream << 31)));
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t k = 0; k < nquads; k += 8 * U) {
    // Only the low half of each 64-bit lane is a counter word; the high halves are don't-cares
    // (vpmuludq reads the low halves only, and the output is narrowed to the low halves).
    __m512i c0[U], c1[U], c2[U], c3[U];
    for (int u = 0; u < U; ++u) {
      const __m512i g = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(g0 + k + 8 * u)), iota);
      c0[u] = g;
      c1[u] = _mm512_srli_epi64(g, 32);
      c2[u] = cstep;
      c3[u] = cchain;
    }
#pragma GCC unroll 10
    for (int r = 0; r < kPhiloxRounds; ++r) {
      for (int u = 0; u < U; ++u) {
        const __m512i pb = _mm512_mul_epu32(c2[u], mul_b);  // B * c2, 64-bit
        const __m512i pa = _mm512_mul_epu32(c0[u], mul_a);  // A * c0
        c0[u] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pb, 32), c1[u], key0[r], 0x96);  // hi ^ c1 ^ k0
        c2[u] = _mm512_ternarylogic_epi64(_mm512_srli_epi64(pa, 32), c3[u], key1[r], 0x96);  // hi ^ c3 ^ k1
        c1[u] = pb;  // lo(B * c2) in the low half
        c3[u] = pa;
      }
    }
    for (int u = 0; u < U; ++u) {
      const int64_t o = k + 8 * u;
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w0 + o), _mm512_cvtepi64_epi32(c0[u]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w1 + o), _mm512_cvtepi64_epi32(c1[u]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w2 + o), _mm512_cvtepi64_epi32(c2[u]));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(w3 + o), _mm512_cvtepi64_epi32(c3[u]));
    }
  }
}
#elif defined(__AVX2__)
#define LLC_PHILOX_IMPL "avx2"
void philox_quads(uint64_t seed, uint32_t chain, uint32_t step, uint32_t stream, uint64_t g0, int64_t nquads,
                   uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
  constexpr int U = 4;
  const __m256i mul_a = _mm256_set1_epi64x(kPhiloxRoundA);
  const __m256i mul_b = _mm256_set1_epi64x(kPhiloxRoundB);
  __m256i key0[kPhiloxRounds], key1[kPhiloxRounds];
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r) {
    key0[r] = _mm256_set1_epi32(static_cast<int>(k0));
    key1[r] = _mm256_set1_epi32(static_cast<int>(k1));
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  const __m256i cstep = _mm256_set1_epi32(static_cast<int>(step));
  const __m256i cchain = _mm256_set1_epi32(static_cast<int>(chain | (stream << 31)));
  const __m256i iota = _mm256_set_epi64x(3, 2, 1, 0);
  const __m256i low_halves = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  for (int64_t k = 0; k < nquads; k += 4 * U) {
    __m256i c0[U], c1[U], c2[U], c3[U];
    for (int u = 0; u < U; ++u) {
      const __m256i g = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(g0 + k + 4 * u)), iota);
      c0[u] = g;
      c1[u] = _mm256_srli_epi64(g, 32);
      c2[u] = cstep;
      c3[u] = cchain;
    }
#pragma GCC unroll 10
    for (int r = 0; r < kPhiloxRounds; ++r) {
      for (int u = 0; u < U; ++u) {
        const __m256i pb = _mm256_mul_epu32(c2[u], mul_b);
        const __m256i pa = _mm256_mul_epu32(c0[u], mul_a);
        c0[u] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pb, 32), c1[u]), key0[r]);
        c2[u] = _mm256_xor_si256(_mm256_xor_si256(_mm256_srli_epi64(pa, 32), c3[u]), key1[r]);
        c1[u] = pb;
        c3[u] = pa;
      }
    }
    for (int u = 0; u < U; ++u) {
      const int64_t o = k + 4 * u;
      auto narrow = [&](__m256i v) { return _mm256_castsi256_si128(_mm256_permutevar8x32_epi32(v, low_halves)); };
      _mm_storeu_si128(reinterpret_cast<__m128i*>(w0 + o), narrow(c0[u]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(w1 + o), narrow(c1[u]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(w2 + o), narrow(c2[u]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(w3 + o), narrow(c3[u]));
    }
  }
}
#else
#define LLC_PHILOX_IMPL "scalar"
void philox_quads(uint64_t seed, uint32_t chain, uint32_t step, uint32_t stream, uint64_t g0, int64_t nquads,
                   uint32_t* w0, uint32_t* w1, uint32_t* w2, uint32_t* w3) {
#pragma omp simd
  for (int64_t k = 0; k < nquads; ++k) {
    const Words4 o = quad_words(seed, chain, step, g0 + static_cast<uint64_t>(k), stream);
    w0[k] = o.w[0];
    w1[k] = o.w[1];
    w2[k] = o.w[2];
    w3[k] = o.w[3];
  }
}
#endif

// ------------------------------------------------------------------------------------------
// Phase 2: words -> uniforms -> normals. Inline, branch-free float32 code for `omp simd` loops.
// ------------------------------------------------------------------------------------------

// Triton's uint_to_uniform_float, branch-free: for x < 0, -x - 1 == ~x == x ^ (x >> 31).
inline float uniform_simd(uint32_t word) {
  const int32_t x = static_cast<int32_t>(word);
  const int32_t folded = x ^ (x >> 31);  // arithmetic shift: all ones for x < 0
  return static_cast<float>(folded) * 4.6566127342e-10f;
}

// Natural log of a positive, normal, finite float32 (here u in [1e-7, 1]), within about 1 ulp.
// x = 2^e * m with m in [sqrt(1/2), sqrt(2)); log(m) = log1p(f), f = m - 1 exactly, by the
// Cephes logf polynomial; e*log(2) added in two parts (0.693359375 has 8 significant bits).
inline float log_simd(float x) {
  const int32_t ix = static_cast<int32_t>(bits_of(x));
  const int32_t t = ix - 0x3F3504F3;  // bits of sqrt(1/2)
  const int32_t e = t >> 23;          // arithmetic shift: floor
  const float m = float_of(static_cast<uint32_t>(ix - (t & static_cast<int32_t>(0xFF800000u))));
  const float f = m - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = LLC_FMAF(p, f, -1.1514610310e-1f);
  p = LLC_FMAF(p, f, 1.1676998740e-1f);
  p = LLC_FMAF(p, f, -1.2420140846e-1f);
  p = LLC_FMAF(p, f, 1.4249322787e-1f);
  p = LLC_FMAF(p, f, -1.6668057665e-1f);
  p = LLC_FMAF(p, f, 2.0000714765e-1f);
  p = LLC_FMAF(p, f, -2.4999993993e-1f);
  p = LLC_FMAF(p, f, 3.3333331174e-1f);
  const float fe = static_cast<float>(e);
  float y = (p * f) * z;
  y = LLC_FMAF(fe, -2.12194440e-4f, y);
  y = LLC_FMAF(-0.5f, z, y);
  return LLC_FMAF(fe, 0.693359375f, f + y);
}

// cos and sin of theta in [0, 2*pi] (plus rounding), within about 1 ulp of 1. theta is reduced
// by the nearest multiple q of pi/2 (q in 0..4) with pi/2 in three parts (the first has 8
// significant bits, so q * part1 and theta - q * part1 are exact); Cephes sinf / cosf
// polynomials on [-pi/4, pi/4]; quadrant by selects and sign flips.
inline void sincos_simd(float theta, float* c_out, float* s_out) {
  const int32_t q = static_cast<int32_t>(theta * 0.636619772f + 0.5f);  // theta >= 0: truncation = floor
  const float fq = static_cast<float>(q);
  float x = LLC_FMAF(-fq, 1.5703125f, theta);
  x = LLC_FMAF(-fq, 4.837512969970703125e-4f, x);
  x = LLC_FMAF(-fq, 7.549789948768648e-8f, x);
  const float z = x * x;
  float ps = -1.9515295891e-4f;
  ps = LLC_FMAF(ps, z, 8.3321608736e-3f);
  ps = LLC_FMAF(ps, z, -1.6666654611e-1f);
  const float s = LLC_FMAF(ps * z, x, x);
  float pc = 2.443315711809948e-5f;
  pc = LLC_FMAF(pc, z, -1.388731625493765e-3f);
  pc = LLC_FMAF(pc, z, 4.166664568298827e-2f);
  const float c = LLC_FMAF(pc * z, z, LLC_FMAF(-0.5f, z, 1.0f));
  // theta = x + q*pi/2: q odd swaps sin and cos; sin < 0 for q mod 4 in {2, 3}, cos for {1, 2}.
  // (Bit operations rather than ternaries: GCC otherwise threads jumps through the selects
  // and the loop no longer vectorizes.)
  const uint32_t odd = 0u - static_cast<uint32_t>(q & 1);  // all ones if q is odd
  const uint32_t sb = bits_of(s), cb = bits_of(c);
  const uint32_t sv = (cb & odd) | (sb & ~odd);
  const uint32_t cv = (sb & odd) | (cb & ~odd);
  *s_out = float_of(sv ^ (static_cast<uint32_t>(q & 2) << 30));
  *c_out = float_of(cv ^ (static_cast<uint32_t>((q + 1) & 2) << 30));
}

// Triton's pair_uniform_to_normal of the uniforms of two words (box_muller in philox.h).
inline void box_muller_simd(uint32_t word_a, uint32_t word_b, float* na, float* nb) {
  const float ua = uniform_simd(word_a);
  const float ub = uniform_simd(word_b);
  // fmaxf(1e-7, ua): non-negative floats order as their bit patterns (an integer max, which
  // vectorizes where a float compare-and-select gets jump-threaded into branches).
  const float u = float_of(std::max(bits_of(ua), 0x33D6BF95u));  // bits of 1.0e-7f
  const float th = 6.283185307179586f * ub;
  const float r = sqrtf(-2.0f * log_simd(u));
  float c, s;
  sincos_simd(th, &c, &s);
  *na = r * c;
  *nb = r * s;
}

// The normals of nquads quads in element order: xi[4k + j] = n_j of quad k.
void normals_from_soa(const uint32_t* __restrict w0, const uint32_t* __restrict w1, const uint32_t* __restrict w2,
                      const uint32_t* __restrict w3, int64_t nquads, float* __restrict xi) {
#pragma omp simd
  for (int64_t k = 0; k < nquads; ++k) {
    float n0, n1, n2, n3;
    box_muller_simd(w0[k], w1[k], &n0, &n1);
    box_muller_simd(w2[k], w3[k], &n2, &n3);
    xi[4 * k + 0] = n0;
    xi[4 * k + 1] = n1;
    xi[4 * k + 2] = n2;
    xi[4 * k + 3] = n3;
  }
}

void interleave_soa(const uint32_t* __restrict w0, const uint32_t* __restrict w1, const uint32_t* __restrict w2,
                    const uint32_t* __restrict w3, int64_t nquads, uint32_t* __restrict out) {
#pragma omp simd
  for (int64_t k = 0; k < nquads; ++k) {
    out[4 * k + 0] = w0[k];
    out[4 * k + 1] = w1[k];
    out[4 * k + 2] = w2[k];
    out[4 * k + 3] = w3[k];
  }
}

// Scratch of one tile (per thread, on the stack).
struct alignas(64) TileScratch {
  uint32_t words[4][kTileQuads];       // phase 1 output (stream 0, then stream 1 for bfloat16)
  float xi[4 * kTileQuads];            // normals, element order
  float xi_next[4 * kTileQuads];       // the next step's normals (noise_scheme "lm")
  uint32_t round_bits[4 * kTileQuads];  // stream-1 words, element order (bfloat16 only)
  uint8_t mask[4 * kTileQuads];         // a per-row mask's values of a run that leaves its window
};

// Normals (and, if rounding, stream-1 words) of quads g0 .. g0 + nquads - 1 in element order.
// lm: the mean of these normals and the next step's, (xi_step + xi_{step+1}) / 2 in float32, as the reference.
void tile_noise(uint64_t seed, uint32_t chain, uint32_t step, uint64_t g0, int64_t nquads, bool rounding, bool lm,
                TileScratch& s) {
  const int64_t padded = (nquads + kPhiloxBatch - 1) / kPhiloxBatch * kPhiloxBatch;  // extra quads: unused
  philox_quads(seed, chain, step, kStreamGaussian, g0, padded, s.words[0], s.words[1], s.words[2], s.words[3]);
  normals_from_soa(s.words[0], s.words[1], s.words[2], s.words[3], nquads, s.xi);
  if (lm) {
    philox_quads(seed, chain, step + 1, kStreamGaussian, g0, padded, s.words[0], s.words[1], s.words[2], s.words[3]);
    normals_from_soa(s.words[0], s.words[1], s.words[2], s.words[3], nquads, s.xi_next);
#pragma omp simd
    for (int64_t k = 0; k < 4 * nquads; ++k) s.xi[k] = 0.5f * (s.xi[k] + s.xi_next[k]);
  }
  if (rounding) {
    philox_quads(seed, chain, step, kStreamRounding, g0, padded, s.words[0], s.words[1], s.words[2], s.words[3]);
    interleave_soa(s.words[0], s.words[1], s.words[2], s.words[3], nquads, s.round_bits);
  }
}

// ------------------------------------------------------------------------------------------
// Phase 3: the update of `count` contiguous elements.
// ------------------------------------------------------------------------------------------

template <typename S>
struct Storage;  // how a storage type is read into / written from its compute type
template <>
struct Storage<float> {
  using T = float;
  static T load(const float* p, int64_t i) { return p[i]; }
};
template <>
struct Storage<double> {
  using T = double;
  static T load(const double* p, int64_t i) { return p[i]; }
};
template <>
struct Storage<uint16_t> {  // bfloat16 bits
  using T = float;
  static T load(const uint16_t* p, int64_t i) { return float_of(static_cast<uint32_t>(p[i]) << 16); }
};

// stochastic_round_bf16 (philox.h) without branches.
inline uint16_t stochastic_round_bf16_simd(float x, uint32_t word) {
  const uint32_t b = bits_of(x);
  const uint32_t rounded = (b + (word & 0xFFFFu)) >> 16;
  const uint32_t special = (b >> 16) | ((b & 0x007FFFFFu) != 0 ? 0x0040u : 0u);  // inf stays, NaN quiet
  return static_cast<uint16_t>((b & 0x7F800000u) == 0x7F800000u ? special : rounded);
}

// The per-call, per-chain constants of phase 3.
template <typename T>
struct RowConsts {
  T lr, nbeta, gamma;
  T neg_half_lr;  // -(0.5 * lr)
  T sgld_noise;   // noise_level * sqrt(lr * 1): the noise coefficient when G = 1
};

// update_element (sgld_update.h) over contiguous elements; w, grad, stat point at the first
// element of the run in its chain's row, w_star and mask at its local index, xi and rbits at
// its position in the tile. The flags are template parameters (GCC 12 does not vectorize a
// select on a loop-invariant bool, nor unswitch a loop this long), except the box: without
// one, box = +inf, and the clamp to [ws - inf, ws + inf] changes nothing, NaN and inf included
// (both comparisons are false), so the loop clamps unconditionally.
template <typename S, bool kPrecond, bool kUpdateStat, bool kMask, bool kWD>
void update_run(S* __restrict w, const S* __restrict grad, const S* __restrict w_star,
                typename Storage<S>::T* __restrict stat, const uint8_t* __restrict mask, const float* __restrict xi,
                const uint32_t* __restrict rbits, int64_t count, const Hyper<typename Storage<S>::T>& h,
                const RowConsts<typename Storage<S>::T>& rc) {
  using T = typename Storage<S>::T;
  constexpr bool kBF16 = sizeof(S) == 2;
  const T alpha = h.alpha, one_minus_alpha = h.one_minus_alpha, scale = h.scale, eps = h.eps;
  const T wd = h.weight_decay, noise_level = h.noise_level;
  const T box = h.has_box ? h.box : std::numeric_limits<T>::infinity();
  const T lr = rc.lr, nbeta = rc.nbeta, gamma = rc.gamma, neg_half_lr = rc.neg_half_lr, sgld_noise = rc.sgld_noise;
#pragma omp simd
  for (int64_t k = 0; k < count; ++k) {
    const T wv = Storage<S>::load(w, k);
    const T g = Storage<S>::load(grad, k);
    const T ws = Storage<S>::load(w_star, k);
    T drift_coef = neg_half_lr;  // -(0.5 * lr) * G, G = 1 (exact)
    T noise_coef = sgld_noise;   // noise_level * sqrt(lr * G)
    if constexpr (kPrecond) {
      T vv = stat[k];
      if constexpr (kUpdateStat) {
        vv = alpha * vv + one_minus_alpha * (g * g);
        stat[k] = vv;
      }
      const T precond = static_cast<T>(1) / (t_sqrt(vv * scale) + eps);
      drift_coef = neg_half_lr * precond;
      noise_coef = noise_level * t_sqrt(lr * precond);
    }
    T drift = nbeta * g + gamma * (wv - ws);
    if constexpr (kWD) drift = drift + wd * wv;  // the reference adds wd * w only when wd != 0
    T delta = drift_coef * drift + noise_coef * static_cast<T>(xi[k]);
    if constexpr (kMask) delta = delta * static_cast<T>(mask[k] != 0 ? 1 : 0);  // as delta * mask
    T out = wv + delta;
    // torch.minimum(torch.maximum(out, ws - box), ws + box), NaN propagating
    const T lo = ws - box;
    const T hi = ws + box;
    out = out < lo ? lo : out;
    out = out > hi ? hi : out;
    if constexpr (kBF16) {
      w[k] = stochastic_round_bf16_simd(out, rbits[k]);
    } else {
      w[k] = out;
    }
  }
}

// Segments (a single-buffer update is one segment with local_start 0 and stat_stride n). Work
// items are (segment, chain, block of kQuadsPerBlock quads), numbered segment by segment; all
// run in one OpenMP parallel region. kRowMasks: per-row masks (UpdateArgs::row_windows), each
// work item looks its row's window up once and gives each run the mask bytes it covers.
template <typename S, bool kPrecond, bool kUpdateStat, bool kMask, bool kWD, bool kRowMasks = false>
void update_impl_t(const UpdateArgs& a) {
  using T = typename Storage<S>::T;
  constexpr bool kBF16 = sizeof(S) == 2;
  const Hyper<T> h = make_hyper<T>(a);
  const S* w_star = static_cast<const S*>(a.w_star);
  T* stat = static_cast<T*>(a.stat);
  const T* lr = static_cast<const T*>(a.lr);
  const T* nbeta = static_cast<const T*>(a.nbeta);
  const T* gamma = static_cast<const T*>(a.gamma);
  const Segment* segs = a.segments;
  const int64_t num_segments = a.num_segments, stat_stride = a.n_local;
  // first work item of each segment (item_start[num_segments] = all items); empty segments have none
  std::vector<int64_t> item_start(static_cast<size_t>(num_segments) + 1, 0);
  std::vector<int64_t> seg_blocks(static_cast<size_t>(num_segments), 0);
  for (int64_t s = 0; s < num_segments; ++s) {
    const int64_t n = segs[s].n, off = segs[s].global_offset;
    // The global quads that cover elements [off, off + n), in blocks of kQuadsPerBlock.
    const int64_t blocks = n > 0 ? ((off + n - 1) / 4 + 1 - off / 4 + kQuadsPerBlock - 1) / kQuadsPerBlock : 0;
    seg_blocks[s] = blocks;
    item_start[s + 1] = item_start[s] + a.num_rows * blocks;
  }
  const int64_t items = item_start[num_segments];
  if (items == 0) return;
  const int num_threads = a.num_threads > 0 ? a.num_threads : omp_get_max_threads();

#pragma omp parallel num_threads(num_threads)
  {
    TileScratch scratch;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < items; ++item) {
      // the segment holding this item: the last s with item_start[s] <= item (and a nonempty range)
      const int64_t s = (std::upper_bound(item_start.begin(), item_start.end(), item) - item_start.begin()) - 1;
      const Segment& seg = segs[s];
      const int64_t blocks = seg_blocks[s];
      const int64_t li = item - item_start[s];
      const int64_t c = li / blocks;
      const int64_t b = li - c * blocks;
      const int64_t n = seg.n;
      const int64_t off = seg.global_offset;
      const int64_t g_first = off / 4;
      const int64_t g_end = (off + n - 1) / 4 + 1;
      S* w = reinterpret_cast<S*>(static_cast<uintptr_t>(seg.w));
      const S* grad = reinterpret_cast<const S*>(static_cast<uintptr_t>(seg.grad));
      const S* ws_seg = w_star + seg.local_start;
      const uint8_t* mask_seg = kMask && !kRowMasks ? a.mask + seg.local_start : nullptr;
      // A per-row mask: the row's window, once per work item (local indices of the flat buffers).
      RowWindow rw = {0, 0, -1, true};
      if constexpr (kRowMasks) rw = row_window(a, c);
      const uint32_t chain = static_cast<uint32_t>(a.chain_ids[c]);
      RowConsts<T> rc;
      rc.lr = lr[c];
      rc.nbeta = nbeta[c];
      rc.gamma = gamma[c];
      rc.neg_half_lr = -(static_cast<T>(0.5) * rc.lr);
      rc.sgld_noise = h.noise_level * t_sqrt(rc.lr * static_cast<T>(1));
      const int64_t row = c * n;
      T* stat_row = kPrecond ? stat + c * stat_stride + seg.local_start : nullptr;
      const int64_t gb = g_first + b * kQuadsPerBlock;
      const int64_t ge = std::min(g_end, gb + kQuadsPerBlock);
      for (int64_t tg = gb; tg < ge; tg += kTileQuads) {
        const int64_t tn = std::min(kTileQuads, ge - tg);
        tile_noise(a.seed, chain, a.step, static_cast<uint64_t>(tg), tn, kBF16, a.lm_noise, scratch);
        // Local elements of the tile: global [4 tg, 4 (tg + tn)) cut to [off, off + n).
        const int64_t e_begin = std::max<int64_t>(4 * tg - off, 0);
        const int64_t e_end = std::min<int64_t>(4 * (tg + tn) - off, n);
        const int64_t t0 = e_begin + off - 4 * tg;  // position of e_begin in the tile
        const int64_t i0 = row + e_begin;
        const int64_t count = e_end - e_begin;
        if constexpr (kRowMasks) {
          if (rw.unrestricted) {  // all ones: delta * 1 is delta, the unmasked loop
            update_run<S, kPrecond, kUpdateStat, false, kWD>(
                w + i0, grad + i0, ws_seg + e_begin, kPrecond ? stat_row + e_begin : nullptr, nullptr,
                scratch.xi + t0, scratch.round_bits + t0, count, h, rc);
            continue;
          }
          // The run's local elements [l0, l0 + count): inside the window, the buffer's own bytes;
          // otherwise the values in scratch (zeros outside the window).
          const int64_t l0 = seg.local_start + e_begin;
          const uint8_t* m = nullptr;
          if (l0 >= rw.lo && l0 + count <= rw.hi) {
            m = a.row_mask + rw.offset + (l0 - rw.lo);
          } else {
            std::memset(scratch.mask, 0, static_cast<size_t>(count));
            const int64_t a0 = std::max(l0, rw.lo), a1 = std::min(l0 + count, rw.hi);
            if (a1 > a0)
              std::memcpy(scratch.mask + (a0 - l0), a.row_mask + rw.offset + (a0 - rw.lo), static_cast<size_t>(a1 - a0));
            m = scratch.mask;
          }
          update_run<S, kPrecond, kUpdateStat, true, kWD>(
              w + i0, grad + i0, ws_seg + e_begin, kPrecond ? stat_row + e_begin : nullptr, m, scratch.xi + t0,
              scratch.round_bits + t0, count, h, rc);
        } else {
          update_run<S, kPrecond, kUpdateStat, kMask, kWD>(
              w + i0, grad + i0, ws_seg + e_begin, kPrecond ? stat_row + e_begin : nullptr,
              kMask ? mask_seg + e_begin : nullptr, scratch.xi + t0, scratch.round_bits + t0, count, h, rc);
        }
      }
    }
  }
}

template <typename S, bool kPrecond, bool kUpdateStat>
void update_impl_flags(const UpdateArgs& a) {
  const bool wd = a.weight_decay != 0.0;  // as make_hyper's has_wd
  if (a.row_windows) {
    if (wd) update_impl_t<S, kPrecond, kUpdateStat, true, true, true>(a);
    else update_impl_t<S, kPrecond, kUpdateStat, true, false, true>(a);
  } else if (a.has_mask) {
    if (wd) update_impl_t<S, kPrecond, kUpdateStat, true, true>(a);
    else update_impl_t<S, kPrecond, kUpdateStat, true, false>(a);
  } else {
    if (wd) update_impl_t<S, kPrecond, kUpdateStat, false, true>(a);
    else update_impl_t<S, kPrecond, kUpdateStat, false, false>(a);
  }
}

template <typename S>
void update_impl(const UpdateArgs& a) {
  if (a.sampler == kSGLD) update_impl_flags<S, false, false>(a);
  else if (a.update_statistic) update_impl_flags<S, true, true>(a);
  else update_impl_flags<S, true, false>(a);
}

// One update over the segments of ``args`` (the address of an UpdateArgs, sgld_update.h, filled by
// the host's native.UpdateArgs; its segment table in host memory) in one parallel region. A single
// buffer is one segment with local_start 0 covering all of w*.
void sgld_update(uintptr_t args) {
  const UpdateArgs* ap = reinterpret_cast<const UpdateArgs*>(args);
  if (!ap || !valid_args(*ap)) throw std::invalid_argument("sgld_update: bad sizes, step, codes or null pointers");
  const UpdateArgs& a = *ap;
  if (a.num_rows == 0 || a.num_segments == 0) return;
  for (int64_t s = 0; s < a.num_segments; ++s)
    if (!valid_segment(a, a.segments[s])) throw std::invalid_argument("sgld_update: bad segment " + std::to_string(s));
  py::gil_scoped_release release;
  switch (a.dtype) {
    case kFloat32: update_impl<float>(a); break;
    case kFloat64: update_impl<double>(a); break;
    case kBFloat16: update_impl<uint16_t>(a); break;
  }
}

// Debug / test hook: for each chain c and element k < count (global index start + k), writes the
// stream's Philox word (uint32 [C, count]), its uniform and, for stream 0, the normal (float32
// [C, count]). Any output pointer may be 0. Computed by the update kernel's own code (phases 1
// and 2 above), tile by tile.
void philox_debug(uint64_t seed, uintptr_t chain_ids, int64_t num_rows, uint64_t step, int64_t start, int64_t count,
                  uint32_t stream, uintptr_t words_out, uintptr_t uniforms_out, uintptr_t normals_out) {
  if (start < 0 || count < 0 || count > INT64_MAX - start - 4 || step > 0xFFFFFFFFull || stream > 1)
    throw std::invalid_argument("philox_debug: bad start, count, step or stream");
  const int64_t* ids = reinterpret_cast<const int64_t*>(chain_ids);
  uint32_t* words = reinterpret_cast<uint32_t*>(words_out);
  float* uniforms = reinterpret_cast<float*>(uniforms_out);
  float* normals = reinterpret_cast<float*>(normals_out);
  if (count == 0) return;
  const int64_t g_first = start / 4;
  const int64_t g_end = (start + count - 1) / 4 + 1;
  TileScratch s;
  for (int64_t c = 0; c < num_rows; ++c) {
    const uint32_t chain = static_cast<uint32_t>(ids[c]);
    for (int64_t tg = g_first; tg < g_end; tg += kTileQuads) {
      const int64_t tn = std::min(kTileQuads, g_end - tg);
      const int64_t padded = (tn + kPhiloxBatch - 1) / kPhiloxBatch * kPhiloxBatch;
      philox_quads(seed, chain, static_cast<uint32_t>(step), stream, static_cast<uint64_t>(tg), padded, s.words[0],
                    s.words[1], s.words[2], s.words[3]);
      interleave_soa(s.words[0], s.words[1], s.words[2], s.words[3], tn, s.round_bits);
      normals_from_soa(s.words[0], s.words[1], s.words[2], s.words[3], tn, s.xi);
      const int64_t k_begin = std::max<int64_t>(4 * tg - start, 0);
      const int64_t k_end = std::min<int64_t>(4 * (tg + tn) - start, count);
      for (int64_t k = k_begin; k < k_end; ++k) {
        const int64_t t = k + start - 4 * tg;
        if (words) words[c * count + k] = s.round_bits[t];
        if (uniforms) uniforms[c * count + k] = uniform_simd(s.round_bits[t]);
        if (normals) normals[c * count + k] = s.xi[t];
      }
    }
  }
}

// Debug / test hook: the kernel's normals of explicit words. words: uint32 [quads, 4]; out:
// float32 [quads, 4], out[g][j] = n_j of the quad whose words are words[g][0..3].
void normals_debug(uintptr_t words_in, uintptr_t out, int64_t quads) {
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(words_in);
  float* op = reinterpret_cast<float*>(out);
  TileScratch s;
  for (int64_t g0 = 0; g0 < quads; g0 += kTileQuads) {
    const int64_t tn = std::min(kTileQuads, quads - g0);
    for (int64_t k = 0; k < tn; ++k)
      for (int j = 0; j < 4; ++j) s.words[j][k] = wp[4 * (g0 + k) + j];
    normals_from_soa(s.words[0], s.words[1], s.words[2], s.words[3], tn, op + 4 * g0);
  }
}

py::tuple philox4x32_py(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const Words4 w = philox4x32_10(c0, c1, c2, c3, k0, k1);
  return py::make_tuple(w.w[0], w.w[1], w.w[2], w.w[3]);
}

// Debug / test hook: stochastic rounding of float32 x [n] with words [n] (uint32) into bf16 bits,
// by the kernel's branch-free rounding (and, as a cross-check, philox.h's scalar one).
void stochastic_round_debug(uintptr_t x, uintptr_t words, uintptr_t out, int64_t n) {
  const float* xp = reinterpret_cast<const float*>(x);
  const uint32_t* wp = reinterpret_cast<const uint32_t*>(words);
  uint16_t* op = reinterpret_cast<uint16_t*>(out);
  for (int64_t k = 0; k < n; ++k) {
    const uint16_t r = stochastic_round_bf16_simd(xp[k], wp[k]);
    if (r != stochastic_round_bf16(xp[k], wp[k])) throw std::logic_error("stochastic_round_debug: scalar and SIMD differ");
    op[k] = r;
  }
}

}  // namespace
}  // namespace llc

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "llc_fast fused SGLD update on the CPU (raw pointers, no torch headers)";
  m.attr("DTYPE_FLOAT32") = static_cast<int>(llc::kFloat32);
  m.attr("DTYPE_FLOAT64") = static_cast<int>(llc::kFloat64);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(llc::kBFloat16);
  m.attr("PHILOX_IMPL") = LLC_PHILOX_IMPL;
  m.attr("UPDATE_ARGS_SIZE") = static_cast<int64_t>(sizeof(llc::UpdateArgs));  // native.UpdateArgs checks it
  m.def("sgld_update", &llc::sgld_update, "One SGLD step in place over the segments of an UpdateArgs (see cpu_update.py)",
        py::arg("args"));
  m.def("philox_debug", &llc::philox_debug, py::arg("seed"), py::arg("chain_ids"), py::arg("num_rows"),
        py::arg("step"), py::arg("start"), py::arg("count"), py::arg("stream"), py::arg("words_out"),
        py::arg("uniforms_out"), py::arg("normals_out"));
  m.def("normals_debug", &llc::normals_debug, py::arg("words"), py::arg("out"), py::arg("quads"));
  m.def("philox4x32", &llc::philox4x32_py, "Philox4x32-10 of counters (c0..c3) under key (k0, k1)");
  m.def("stochastic_round_debug", &llc::stochastic_round_debug, py::arg("x"), py::arg("words"), py::arg("out"),
        py::arg("n"));
}
