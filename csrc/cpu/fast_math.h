// Branch-free, vectorisable scalar float routines for the CPU kernels that gcc vectorises under
// `#pragma omp simd` (forward_kl): exp and the fp16/bf16 → fp32 conversions. Every function is a
// straight line of arithmetic, bit casts and selects (no libm call in the inner loops).
// draft_uncertainty uses the explicit vector routines of simd.h instead.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "epikern/online_softmax.h"  // EPIKERN_INLINE
#include "isa.h"

EPIKERN_CPU_NAMESPACE_BEGIN

EPIKERN_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

EPIKERN_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// e^x with ~1 ulp error on [−87.33, 88.37] (Cody–Waite reduction x = k·ln2 + r, |r| ≤ ln2/2, and
// a degree-6 polynomial). Outside that range the reduction is garbage and two selects fix
// the result: x < −87.33 (incl. −inf) → 0 (results that would be denormal are flushed) and
// x > 88.37 (= 127.5·ln2, incl. +inf) → +inf (so e^x in [1.7e38, FLT_MAX] also saturates to
// +inf). NaN → NaN.
EPIKERN_INLINE float fast_exp(float x) {
  constexpr float kLo = -87.33654475f;  // e^kLo = FLT_MIN
  constexpr float kHi = 88.3762626647949f;
  const float kf = std::nearbyint(x * 1.44269504088896341f);  // vrndscaleps / roundps
  float r = x - kf * 0.693359375f;  // ln2 split: hi part exact in 9 bits
  r = r - kf * -2.12194440e-4f;
  // e^r ≈ 1 + r + r²·P(r), P of degree 4 (Taylor; |error| < 1.2e-7 relative for |r| ≤ ln2/2)
  float p = 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * (r * r) + r + 1.f;
  // 2^k; k is only meaningful (and within [−126, 127]) for kLo ≤ x ≤ kHi
  const float scale = bits_to_float(static_cast<uint32_t>(static_cast<int32_t>(kf) + 127) << 23);
  float y = p * scale;
  y = x < kLo ? 0.f : y;
  y = x > kHi ? std::numeric_limits<float>::infinity() : y;
  return y;
}

// IEEE half → float, exact for normals, denormals, ±inf and NaN (bit manipulation; no F16C needed).
EPIKERN_INLINE float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;  // exponent + mantissa
  // Rebias by a multiply: 2^112 = 2^(127 − 15); half denormals become exact float normals.
  const float finite = bits_to_float(em) * 5.192296858534828e33f;
  const float special = bits_to_float(em | 0x7f800000u);  // inf / NaN keep their mantissa
  const float mag = em >= (0x7c00u << 13) ? special : finite;
  return bits_to_float(float_to_bits(mag) | sign);
}

// bfloat16 → float: the upper 16 bits of a float.
EPIKERN_INLINE float bf16_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

EPIKERN_CPU_NAMESPACE_END
