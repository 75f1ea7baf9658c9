// Explicit SIMD for the draft_uncertainty sweeps: GCC/Clang vector extensions of the widest float
// vector the build target has (AVX-512: 16 lanes, AVX2: 8, otherwise 4 — SSE2 on x86-64-v2, NEON on
// aarch64), so that one source gives straight-line vector code on every target without
// per-ISA intrinsics (only the F16C conversion uses them, where present).
//
// Why not `#pragma omp simd` here: gcc if-converts the selects of a fused loop (range checks of
// exp, 0·∞ guards, clamps) into chains of compares and blends (≈ 70 instructions per vector in
// the old sweep 1); written with vectors, each select is one vmaxps or one blend.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#include "dtype.h"
#include "isa.h"

EPIKERN_CPU_NAMESPACE_BEGIN
namespace simd {

#if defined(__AVX512F__)
inline constexpr int kWidth = 16;
#elif defined(__AVX2__)
inline constexpr int kWidth = 8;
#else
inline constexpr int kWidth = 4;
#endif

typedef float vf __attribute__((vector_size(4 * kWidth)));
typedef int32_t vi __attribute__((vector_size(4 * kWidth)));
typedef uint32_t vu __attribute__((vector_size(4 * kWidth)));
typedef uint16_t vh __attribute__((vector_size(2 * kWidth)));

EPIKERN_INLINE vf splat(float x) { return vf{} + x; }

// Lane-wise max(lo, x) that keeps a NaN x (`x < lo` is false for NaN). x86's maxps returns its
// second operand when either is NaN, which is this select; gcc emits it for the portable select
// on AVX-512 but not always on AVX2/SSE (a compare and a blend there), hence the intrinsics.
EPIKERN_INLINE vf max_keep_nan(vf lo, vf x) {
#if defined(__AVX512F__)
  return x < lo ? lo : x;
#elif defined(__AVX2__)
  return reinterpret_cast<vf>(_mm256_max_ps(reinterpret_cast<__m256>(lo), reinterpret_cast<__m256>(x)));
#elif defined(__SSE2__)
  return reinterpret_cast<vf>(_mm_max_ps(reinterpret_cast<__m128>(lo), reinterpret_cast<__m128>(x)));
#else
  return x < lo ? lo : x;
#endif
}
// Lane-wise max ignoring a NaN x (running maxima: a NaN reaches the sums instead).
EPIKERN_INLINE vf max_skip_nan(vf m, vf x) { return x > m ? x : m; }
EPIKERN_INLINE vf min_skip_nan(vf m, vf x) { return x < m ? x : m; }

// x where p ≠ 0 (NaN p included), else 0: the guard 0·(±inf) = 0 of a probability p, as a
// compare and an AND (no blend).
EPIKERN_INLINE vf where_nonzero(vf p, vf x) {
  return reinterpret_cast<vf>(reinterpret_cast<vi>(x) & (p != 0.f));
}

// d where d = +inf, else x (a compare and a blend): in a cross term, a finite logit against a −inf
// reference (d = logit − reference = +inf) counts +inf even where its exponential underflowed.
EPIKERN_INLINE vf where_posinf(vf d, vf x) { return d == INFINITY ? d : x; }

// Unaligned loads of kWidth logits, converted to fp32.
EPIKERN_INLINE vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
EPIKERN_INLINE vf load(const BFloat16* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return reinterpret_cast<vf>(__builtin_convertvector(h, vu) << 16);
}
EPIKERN_INLINE vf load(const Half* p) {
#if defined(__F16C__) && defined(__AVX512F__)
  // (the zero-masked form: _mm512_cvtph_ps trips gcc 12's -Wmaybe-uninitialized)
  return reinterpret_cast<vf>(_mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))));
#elif defined(__F16C__) && defined(__AVX2__)
  return reinterpret_cast<vf>(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
  // half_to_float of fast_math.h, lane-wise: exact for normals, denormals, ±inf and NaN
  vh h;
  std::memcpy(&h, p, sizeof h);
  const vu u = __builtin_convertvector(h, vu);
  const vu sign = (u & 0x8000u) << 16;
  const vu em = (u & 0x7fffu) << 13;
  const vf finite = reinterpret_cast<vf>(em) * 5.192296858534828e33f;  // · 2^112
  const vf special = reinterpret_cast<vf>(em | 0x7f800000u);
  const vf mag = reinterpret_cast<vi>(em) >= static_cast<int32_t>(0x7c00u << 13) ? special : finite;
  return reinterpret_cast<vf>(reinterpret_cast<vu>(mag) | sign);
#endif
}

// The first n < kWidth elements of p, the other lanes `fill` (tails of rows and blocks).
template <class T>
EPIKERN_INLINE vf load_partial(const T* p, int64_t n, float fill) {
  T buf[kWidth];
  vf out = splat(fill);
  std::memcpy(buf, p, n * sizeof(T));
  const vf v = load(buf);
  for (int64_t i = 0; i < n; ++i) out[i] = v[i];
  return out;
}

EPIKERN_INLINE void store(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

EPIKERN_INLINE float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kWidth; ++i) s += v[i];
  return s;
}
EPIKERN_INLINE float hmax(vf v) {  // NaN lanes ignored
  float m = -INFINITY;
  for (int i = 0; i < kWidth; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
EPIKERN_INLINE float hmin(vf v) {
  float m = INFINITY;
  for (int i = 0; i < kWidth; ++i) m = v[i] < m ? v[i] : m;
  return m;
}

// The kernels work in base 2 (logits scaled by log2 e / T): 2^x costs no Cody–Waite reduction
// (x − round(x) is exact), and log2 needs no ln 2 split.

// 2^x for x < 127.5 (finite or NaN; x ≥ −1e5 so that the polynomial stays finite), ~2e-7
// relative error. Rounding by the 1.5·2^23 shifter (k = round(x) lands in the low mantissa bits
// of t, and t << 23 is k's exponent field), r = x − k exact, and a degree-5 minimax polynomial
// for 2^r on |r| ≤ ½ in Estrin form (short dependency chain). k is clamped at −127, whose
// exponent field is 0: results below 2^−127.5 are exactly 0 (2^{−inf clamped to −150} = 0 with
// no select). x ≥ 127.5 gives inf or garbage (callers never use it: sweep 1 redoes such blocks
// from their own max). NaN → NaN.
EPIKERN_INLINE vf exp2(vf x) {
  constexpr float kShift = 12582912.f;  // 1.5·2^23
  vf t = x + kShift;
  t = max_keep_nan(splat(kShift - 127.f), t);
  const vf r = x - (t - kShift);
  const vf r2 = r * r;
  const vf a = r * 0.05550733581185341f + 0.24022242426872253f;
  const vf b = r * 0.001326472731307149f + 0.009671512991189957f;
  const vf p = (b * r2 + a) * r2 + (r * 0.6931470036506653f + 1.f);
  const vu scale = (reinterpret_cast<vu>(t) << 23) + (127u << 23);
  return p * reinterpret_cast<vf>(scale);
}

// log2 x for positive normal x, ~1 ulp: x = 2^e·m with m ∈ [√½, √2), log2 x = e + log1p(m − 1)·log2 e
// with the Cephes logf polynomial. 0 and denormals give a finite value in [−150, −126] (callers
// multiply it by x ≈ 0); inf/NaN/negative give garbage (callers multiply by the NaN).
EPIKERN_INLINE vf log2(vf x) {
  const vi u = reinterpret_cast<vi>(x);
  const vi e = (u - 0x3f3504f3) >> 23;  // arithmetic shift: the exponent of x/√½
  const vf m = reinterpret_cast<vf>(u - (e << 23)) - 1.f;  // ∈ [√½ − 1, √2 − 1)
  const vf z = m * m;
  // the Cephes polynomial P(m) = Σ_j a_j m^j (j ≤ 8) in Estrin form; log1p(m) ≈ m − z/2 + m·z·P
  const vf z2 = z * z;
  const vf q0 = m * -2.4999993993e-1f + 3.3333331174e-1f;
  const vf q1 = m * -1.6668057665e-1f + 2.0000714765e-1f;
  const vf q2 = m * -1.2420140846e-1f + 1.4249322787e-1f;
  const vf q3 = m * -1.1514610310e-1f + 1.1676998740e-1f;
  const vf r0 = q1 * z + q0;
  const vf r1 = q3 * z + q2;
  const vf p = (z2 * z2) * 7.0376836292e-2f + (r1 * z2 + r0);
  const vf ln1p = m + (z * -0.5f + p * m * z);
  return ln1p * 1.44269504088896341f + __builtin_convertvector(e, vf);
}

}  // namespace simd
EPIKERN_CPU_NAMESPACE_END
