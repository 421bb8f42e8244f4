// Counter-based noise of docs/noise.md: Philox4x32-10 exactly as Triton computes it, Triton's
// word -> uniform conversion, float32 Box-Muller, and stochastic rounding to bfloat16.
//
// Header-only; every function compiles for the host (C++) and, under nvcc, for the device.
// The reference is llc_fast/kernels/philox.py: integers and uniforms must agree bit for bit,
// normals to about 1e-6 (libm / libdevice log, cos, sin differ by an ulp or two).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LLC_HD __host__ __device__ __forceinline__
#else
#define LLC_HD inline
#endif

namespace llc {

constexpr uint32_t kPhiloxRoundA = 0xD2511F53u;
constexpr uint32_t kPhiloxRoundB = 0xCD9E8D57u;
constexpr uint32_t kPhiloxKeyA = 0x9E3779B9u;
constexpr uint32_t kPhiloxKeyB = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

constexpr uint32_t kStreamGaussian = 0;  // counter word 3 = chain | stream << 31
constexpr uint32_t kStreamRounding = 1;

struct Words4 {
  uint32_t w[4];
};

LLC_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Philox4x32-10 of counters (c0, c1, c2, c3) under key (k0, k1).
LLC_HD Words4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint32_t hi_b = mulhi32(kPhiloxRoundB, c2);
    const uint32_t lo_b = kPhiloxRoundB * c2;
    const uint32_t hi_a = mulhi32(kPhiloxRoundA, c0);
    const uint32_t lo_a = kPhiloxRoundA * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += kPhiloxKeyA;
    k1 += kPhiloxKeyB;
  }
  Words4 out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

// The words of quad g (elements 4g .. 4g+3) of one chain, step and stream.
LLC_HD Words4 quad_words(uint64_t seed, uint32_t chain, uint32_t step, uint64_t quad, uint32_t stream) {
  return philox4x32_10(static_cast<uint32_t>(quad), static_cast<uint32_t>(quad >> 32), step,
                       chain | (stream << 31), static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Triton's uint_to_uniform_float: signed reinterpret, fold negatives, float32 scale. In [0, 1).
LLC_HD float uniform_from_word(uint32_t word) {
  const int32_t x = static_cast<int32_t>(word);
  const int32_t folded = x < 0 ? -x - 1 : x;  // -x - 1 never overflows for x < 0
  return static_cast<float>(folded) * 4.6566127342e-10f;
}

// Triton's pair_uniform_to_normal in float32.
LLC_HD void box_muller(float ua, float ub, float* na, float* nb) {
  const float u = fmaxf(1.0e-7f, ua);
  const float th = 6.283185307179586f * ub;
  const float r = sqrtf(-2.0f * logf(u));
  *na = r * cosf(th);
  *nb = r * sinf(th);
}

struct Normals4 {
  float n[4];
};

// The four standard normals of a quad: Box-Muller of (u0, u1) and of (u2, u3).
LLC_HD Normals4 normals_from_words(const Words4& w) {
  Normals4 out;
  box_muller(uniform_from_word(w.w[0]), uniform_from_word(w.w[1]), &out.n[0], &out.n[1]);
  box_muller(uniform_from_word(w.w[2]), uniform_from_word(w.w[3]), &out.n[2], &out.n[3]);
  return out;
}

LLC_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  __builtin_memcpy(&b, &x, sizeof(b));
  return b;
#endif
}

LLC_HD float float_from_bits(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  __builtin_memcpy(&x, &b, sizeof(x));
  return x;
#endif
}

LLC_HD float bf16_bits_to_float(uint16_t b) { return float_from_bits(static_cast<uint32_t>(b) << 16); }

// Stochastic rounding of float32 x to bfloat16 bits: add the low 16 bits of the random word to
// the float32 bit pattern and keep the upper 16 (rounds away from zero with probability equal
// to the discarded fraction). NaN and +-inf are rounded to nearest (inf stays inf; NaN stays a
// quiet NaN of the same sign).
LLC_HD uint16_t stochastic_round_bf16(float x, uint32_t word) {
  const uint32_t bits = float_bits(x);
  if ((bits & 0x7F800000u) == 0x7F800000u) {  // inf or NaN
    const uint32_t upper = bits >> 16;
    return static_cast<uint16_t>((bits & 0x007FFFFFu) ? (upper | 0x0040u) : upper);
  }
  return static_cast<uint16_t>((bits + (word & 0xFFFFu)) >> 16);
}

}  // namespace llc
