// Device building blocks shared by the draft_uncertainty kernels: logit loads and conversion,
// fast exponentials, the per-thread sweeps over a span of a row, and deterministic block
// reductions. Every kernel of a row uses these, so the cluster and split paths do the same math.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "draft_uncertainty.h"
#include "epikern/cuda/row_math.h"

namespace epikern {
namespace gpu {

constexpr int kThreads = 256;              // threads per CTA of every kernel
constexpr int kWarps = kThreads / 32;
constexpr int kGroup = 4;                  // drafts whose sweep-1 states a thread holds at once
constexpr int kStates = kGroup + 1;        // + the reference's own state

// e^x and ln x on the MUFU unit: one multiply by log2(e) (or ln 2) around ex2/lg2.approx. ftz:
// results below 2^-126 count as 0, which the 0·anything = 0 guards of online_softmax.h treat
// exactly like an underflow.
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

struct Exp {
  __device__ __forceinline__ float operator()(float x) const {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * kLog2e));
    return y;
  }
};
struct Log {
  __device__ __forceinline__ float operator()(float x) const {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y * kLn2;
  }
};

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// Logit i of the little-endian 32-bit words `w` of a vector load (bit operations only, so the
// words stay in registers).
template <class T>
__device__ __forceinline__ float unpack(const uint32_t* w, int i) {
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(w[i]);
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(i % 2 == 0 ? w[i / 2] << 16 : w[i / 2] & 0xffff0000u);
  } else {
    return __half2float(__ushort_as_half(
        static_cast<unsigned short>(i % 2 == 0 ? w[i / 2] & 0xffffu : w[i / 2] >> 16)));
  }
}

// W (1 or 8) consecutive logits from p, times `scale`. W = 8 needs a 16-byte aligned p and uses
// 16-byte loads. kGlobal: read-only cache path of global memory; otherwise p is shared memory.
template <int W, bool kGlobal, class T>
__device__ __forceinline__ void load_scaled(const T* p, float scale, float (&x)[W]) {
  if constexpr (W == 1) {
    x[0] = to_float(kGlobal ? __ldg(p) : *p) * scale;
  } else {
    static_assert(W == 8, "vector width is 8 logits");
    constexpr int kVecs = int(sizeof(T)) * W / 16;
    uint32_t w[4 * kVecs];
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      const uint4* src = reinterpret_cast<const uint4*>(p) + i;
      const uint4 v = kGlobal ? __ldg(src) : *src;
      w[4 * i] = v.x;
      w[4 * i + 1] = v.y;
      w[4 * i + 2] = v.z;
      w[4 * i + 3] = v.w;
    }
#pragma unroll
    for (int i = 0; i < W; ++i) x[i] = unpack<T>(w, i) * scale;
  }
}

// Sweep 1 by this thread over elements [first, first + count) of a row span (count a multiple of
// W; thread-strided in steps of W). drafts[j], j < kb, are the rows of kb drafts; p is the
// reference row or null; with_p also accumulates the reference's own state into st[kGroup].
template <int W, bool kGlobal, class TD, class TP>
__device__ __forceinline__ void sweep1_span(const TD* const (&drafts)[kGroup], int kb, const TP* p,
                                            bool with_p, float scale, int64_t first, int64_t count,
                                            SoftmaxState (&st)[kStates]) {
  const int64_t end = first + count;
  for (int64_t i = first + int64_t(threadIdx.x) * W; i < end; i += int64_t(kThreads) * W) {
    float y[W];
    if (p != nullptr) {
      load_scaled<W, kGlobal>(p + i, scale, y);
      if (with_p) softmax_add_chunk(st[kGroup], y, y, Exp{});
    }
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      if (j < kb) {
        float x[W];
        load_scaled<W, kGlobal>(drafts[j] + i, scale, x);
        if (p != nullptr)  // (two calls rather than selecting an array keeps y in registers)
          softmax_add_chunk(st[j], x, y, Exp{});
        else
          softmax_add_chunk(st[j], x, x, Exp{});
      }
    }
  }
}

// Sweep 2 by this thread over elements [first, first + count) (count a multiple of W). Draft k's
// row starts at draft0 + k·draft_step; lse[0..K] and logw[0..K−1] are in shared memory.
// acc += (jsd, −Σ q̄ log q̄, KL(q̄ ‖ p)).
template <int W, bool kGlobal, class TD, class TP>
__device__ __forceinline__ void sweep2_span(const TD* draft0, int64_t draft_step, int K,
                                            const TP* p, const float* lse, const float* logw,
                                            float scale, int64_t first, int64_t count,
                                            float (&acc)[3]) {
  const int64_t end = first + count;
  for (int64_t i = first + int64_t(threadIdx.x) * W; i < end; i += int64_t(kThreads) * W) {
    float y[W];
    if (p != nullptr) load_scaled<W, kGlobal>(p + i, scale, y);
    float r[W];
#pragma unroll
    for (int e = 0; e < W; ++e) r[e] = -INFINITY;
    for (int k = 0; k < K; ++k) {  // pass 1: M = max_k l_k
      float x[W];
      load_scaled<W, kGlobal>(draft0 + k * draft_step + i, scale, x);
#pragma unroll
      for (int e = 0; e < W; ++e) {
        const float l = mixture_log_weight(logw[k], x[e], lse[k]);
        r[e] = l > r[e] ? l : r[e];
      }
    }
    float S[W], J1[W];
#pragma unroll
    for (int e = 0; e < W; ++e) {
      r[e] = exp_origin(r[e]);
      S[e] = 0.f;
      J1[e] = 0.f;
    }
    for (int k = 0; k < K; ++k) {  // pass 2: the sums (the re-read hits shared memory or L1)
      float x[W];
      load_scaled<W, kGlobal>(draft0 + k * draft_step + i, scale, x);
#pragma unroll
      for (int e = 0; e < W; ++e)
        mixture_accumulate(S[e], J1[e], mixture_log_weight(logw[k], x[e], lse[k]), logw[k], r[e],
                           Exp{});
    }
#pragma unroll
    for (int e = 0; e < W; ++e) {
      const MixtureTerms t = mixture_entry(r[e], S[e], J1[e], p != nullptr, p != nullptr ? y[e] : 0.f,
                                           lse[K], Exp{}, Log{});
      acc[0] += t.jsd;
      acc[1] += t.entropy;
      acc[2] += t.kl;
    }
  }
}

__device__ __forceinline__ SoftmaxState shfl_xor_state(const SoftmaxState& st, int lane_mask) {
  return SoftmaxState{__shfl_xor_sync(0xffffffffu, st.m, lane_mask),
                      __shfl_xor_sync(0xffffffffu, st.s, lane_mask),
                      __shfl_xor_sync(0xffffffffu, st.t, lane_mask),
                      __shfl_xor_sync(0xffffffffu, st.c, lane_mask)};
}

// Butterfly merge across the warp; the merge is commutative, so every lane ends with the same
// state, and the fixed pattern makes it deterministic.
__device__ __forceinline__ void warp_merge(SoftmaxState& st) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) softmax_merge(st, shfl_xor_state(st, mask), Exp{});
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
  return v;
}

// Merge every thread's kStates states over the CTA (warps, then warp order) and store state j
// to dst[j] unless it is null (thread j stores it). Ends with a barrier, so `scratch` is free again.
__device__ __forceinline__ void block_merge(SoftmaxState (&st)[kStates],
                                            SoftmaxState (&scratch)[kWarps][kStates],
                                            SoftmaxState* const (&dst)[kStates]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int j = 0; j < kStates; ++j) warp_merge(st[j]);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < kStates; ++j) scratch[warp][j] = st[j];
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kStates; ++j) {  // static j keeps dst in registers
    if (threadIdx.x == j && dst[j] != nullptr) {
      SoftmaxState total = scratch[0][j];
      for (int w = 1; w < kWarps; ++w) softmax_merge(total, scratch[w][j], Exp{});
      *dst[j] = total;
    }
  }
  __syncthreads();
}

// Sum of three per-thread values over the CTA in a fixed order; thread 0 stores them to dst.
// Ends with a barrier.
__device__ __forceinline__ void block_sum3(const float (&v)[3], float (&scratch)[kWarps][3],
                                           float* dst) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  float w[3];
#pragma unroll
  for (int j = 0; j < 3; ++j) w[j] = warp_sum(v[j]);
  if (lane == 0) {
#pragma unroll
    for (int j = 0; j < 3; ++j) scratch[warp][j] = w[j];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      float total = 0.f;
      for (int q = 0; q < kWarps; ++q) total += scratch[q][j];
      dst[j] = total;
    }
  }
  __syncthreads();
}

__device__ __forceinline__ float nan_f() { return __int_as_float(0x7fffffff); }

// Row maps of draft_uncertainty_rows (see DraftArgs): the input rows and 1/T of output row n.
__device__ __forceinline__ int64_t mapped_row(const void* index, bool is64, int64_t n) {
  if (index == nullptr) return n;
  return is64 ? static_cast<const int64_t*>(index)[n] : int64_t(static_cast<const int32_t*>(index)[n]);
}
__device__ __forceinline__ int64_t draft_row(const DraftArgs& a, int64_t n) {
  return mapped_row(a.draft_index, a.draft_index64, n);
}
__device__ __forceinline__ int64_t target_row(const DraftArgs& a, int64_t n) {
  return mapped_row(a.target_index, a.target_index64, n);
}
__device__ __forceinline__ float row_scale(const DraftArgs& a, int64_t n) {
  return a.inv_temperature != nullptr ? a.inv_temperature[n * a.inv_temperature_stride] : a.scale;
}
__device__ __forceinline__ bool row_skipped(const DraftArgs& a, int64_t n) {
  const float scale = row_scale(a, n);
  const int64_t d = draft_row(a, n), t = target_row(a, n);
  const bool bad_d = a.draft_index != nullptr && (d < 0 || d >= a.draft_rows);
  const bool bad_t = a.target != nullptr && a.target_index != nullptr && (t < 0 || t >= a.target_rows);
  return bad_d || bad_t || !(scale > 0.f) || isinf(scale);
}
// Every output of a skipped row is NaN (one thread).
__device__ inline void write_skipped(const DraftArgs& a, int64_t row) {
  for (int k = 0; k < a.K; ++k) a.draft_lse[k * a.draft_lse_stride + row] = nan_f();
  a.target_lse[row] = nan_f();
  for (int j = 0; j < 6; ++j) a.stats[j * a.stats_stride + row] = nan_f();
}

// Row outputs of sweep 1 from the K+1 merged states (one thread). lse[0..K] receives the
// log-normalisers that sweep 2 needs.
__device__ inline void write_sweep1(const DraftArgs& a, int64_t row, const SoftmaxState* merged,
                                    float* lse) {
  const bool has_p = a.target != nullptr;
  const Sweep1Row r = finish_sweep1(merged, a.K, has_p, a.weights, long(a.weights_stride), lse);
  for (int k = 0; k < a.K; ++k) a.draft_lse[k * a.draft_lse_stride + row] = lse[k];
  a.target_lse[row] = lse[a.K];
  float* s = a.stats + row;
  s[kStatEu * a.stats_stride] = r.eu;
  s[kStatDraftEntropy * a.stats_stride] = r.draft_entropy;
  s[kStatTargetEntropy * a.stats_stride] = r.target_entropy;
  if (!a.decompose) {
    s[kStatJsd * a.stats_stride] = nan_f();
    s[kStatKl * a.stats_stride] = nan_f();
    s[kStatMixtureEntropy * a.stats_stride] = nan_f();
  }
}

// Row outputs of sweep 2 from the summed (jsd, −Σ q̄ log q̄, KL) (one thread).
__device__ inline void write_sweep2(const DraftArgs& a, int64_t row, const float (&sums)[3]) {
  float* s = a.stats + row;
  s[kStatJsd * a.stats_stride] = sums[0];
  s[kStatMixtureEntropy * a.stats_stride] = sums[1];
  s[kStatKl * a.stats_stride] = a.target != nullptr ? sums[2] : nan_f();
}

template <class T>
struct Tag {
  using type = T;
};

template <class T>
const char* dtype_name() {
  if constexpr (sizeof(T) == 4) return "f32";
  else if constexpr (std::is_same_v<T, __half>) return "f16";
  else return "bf16";
}

template <class TD, class TP>
std::string kernel_name(const char* base) {
  return std::string(base) + "<" + dtype_name<TD>() + "," + dtype_name<TP>() + ">";
}

// Calls f(Tag<TD>{}, Tag<TP>{}) for the logit dtypes of drafts and reference (host side).
template <class F>
void dispatch_dtypes(int draft_dtype, int target_dtype, F&& f) {
  auto with_target = [&](auto td) {
    switch (target_dtype) {
      case kFloat32: return f(td, Tag<float>{});
      case kFloat16: return f(td, Tag<__half>{});
      case kBFloat16: return f(td, Tag<__nv_bfloat16>{});
    }
    check(cudaErrorInvalidValue, "reference logits dtype code");
  };
  switch (draft_dtype) {
    case kFloat32: return with_target(Tag<float>{});
    case kFloat16: return with_target(Tag<__half>{});
    case kBFloat16: return with_target(Tag<__nv_bfloat16>{});
  }
  check(cudaErrorInvalidValue, "draft logits dtype code");
}

}  // namespace gpu
}  // namespace epikern
