// Split path of draft_uncertainty (any GPU, sm_80+): each row is cut into `splits` spans of the
// vocabulary, one CTA per (row, span). Sweep 1 writes one partial state per draft and span; the
// last CTA of a row to finish (an atomic counter) merges them in span order and writes the row's
// sweep-1 outputs. Sweep 2 does the same with three partial sums. The host launches these
// kernels a few rows at a time, so sweep 2 finds the rows that sweep 1 just read still in L2.
#include "common.cuh"

namespace epikern {
namespace gpu {
namespace {

__device__ __forceinline__ SoftmaxState load_state_cg(const SoftmaxState* p) {
  const float4 v = __ldcg(reinterpret_cast<const float4*>(p));  // L2: written by other CTAs
  return SoftmaxState{v.x, v.y, v.z, v.w};
}

// True in the CTA that finishes its row last; that CTA resets the counter for the next launch.
// The CUTLASS "generic barrier" pattern: the barrier orders every thread's partial results before
// thread 0's release fence and counter increment; in the last CTA, thread 0's acquire fence and
// the barrier make all CTAs' partial results visible to its threads (read with __ldcg, past L1).
__device__ __forceinline__ bool last_cta_of_row(unsigned* counter, int splits) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    asm volatile("fence.acq_rel.gpu;" ::: "memory");
    last = atomicAdd(counter, 1u) == unsigned(splits - 1);
    if (last) {
      *counter = 0u;
      asm volatile("fence.acq_rel.gpu;" ::: "memory");
    }
  }
  __syncthreads();
  return last;
}

struct Span {
  int64_t local;  // row index within this launch
  int64_t row;
  int index;      // span index within the row
  int64_t begin, count;
  int64_t vec_count;  // leading elements read with 16-byte loads
};

__device__ __forceinline__ Span this_span(const DraftArgs& a, const SplitArgs& s) {
  Span sp;
  sp.local = int64_t(blockIdx.x) / s.splits;
  sp.index = int(int64_t(blockIdx.x) % s.splits);
  sp.row = s.row0 + sp.local;
  sp.begin = sp.index * s.slice;
  sp.count = min(s.slice, a.V - sp.begin);
  sp.vec_count = s.vec ? sp.count / 8 * 8 : 0;
  return sp;
}

template <class TD, class TP>
__global__ void __launch_bounds__(kThreads, 2) split_sweep1_kernel(DraftArgs a, SplitArgs s) {
  const Span sp = this_span(a, s);
  if (row_skipped(a, sp.row)) {  // every CTA of the row returns here: its counter stays 0
    if (sp.index == 0 && threadIdx.x == 0) write_skipped(a, sp.row);
    return;
  }
  const int K = a.K;
  const TD* draft = static_cast<const TD*>(a.draft) + draft_row(a, sp.row) * a.draft_stride_n + sp.begin;
  const TP* p = a.target == nullptr
                    ? nullptr
                    : static_cast<const TP*>(a.target) + target_row(a, sp.row) * a.target_stride_n + sp.begin;
  SoftmaxState* part = s.part1 + (sp.local * s.splits + sp.index) * (K + 1);
  __shared__ SoftmaxState scratch[kWarps][kStates];

  for (int k0 = 0; k0 < K; k0 += kGroup) {  // groups of drafts; the reference re-read hits L1/L2
    const int kb = min(kGroup, K - k0);
    const bool with_p = k0 == 0;
    const TD* rows[kGroup];
    SoftmaxState st[kStates];
    SoftmaxState* dst[kStates];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      rows[j] = draft + (j < kb ? k0 + j : k0) * a.draft_stride_k;
      dst[j] = j < kb ? part + k0 + j : nullptr;
    }
    dst[kGroup] = with_p ? part + K : nullptr;  // an empty state when there is no reference
#pragma unroll
    for (int j = 0; j < kStates; ++j) st[j] = softmax_state_empty();
    sweep1_span<8, true>(rows, kb, p, with_p, row_scale(a, sp.row), 0, sp.vec_count, st);
    sweep1_span<1, true>(rows, kb, p, with_p, row_scale(a, sp.row), sp.vec_count, sp.count - sp.vec_count, st);
    block_merge(st, scratch, dst);
  }
  if (!last_cta_of_row(s.counters + sp.local, s.splits)) return;

  // Warp w merges states w, w + kWarps, ...: lanes take the spans strided, then a butterfly.
  extern __shared__ float4 dynamic_smem[];
  SoftmaxState* merged = reinterpret_cast<SoftmaxState*>(dynamic_smem);  // [K + 1]
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const SoftmaxState* row_parts = s.part1 + sp.local * s.splits * (K + 1);
  for (int k = warp; k <= K; k += kWarps) {
    SoftmaxState st = softmax_state_empty();
    for (int j = lane; j < s.splits; j += 32)
      softmax_merge(st, load_state_cg(row_parts + j * (K + 1) + k), Exp{});
    warp_merge(st);
    if (lane == 0) merged[k] = st;
  }
  __syncthreads();
  if (threadIdx.x == 0) write_sweep1(a, sp.row, merged, s.lse + sp.local * (K + 1));
}

template <class TD, class TP>
__global__ void __launch_bounds__(kThreads, 2) split_sweep2_kernel(DraftArgs a, SplitArgs s) {
  const Span sp = this_span(a, s);
  if (row_skipped(a, sp.row)) return;  // written by sweep 1
  const int K = a.K;
  extern __shared__ float4 dynamic_smem[];
  float* lse = reinterpret_cast<float*>(dynamic_smem);  // [K + 1], written by sweep 1
  float* logw = lse + K + 1;                             // [K]
  for (int k = threadIdx.x; k <= K; k += kThreads) lse[k] = __ldcg(s.lse + sp.local * (K + 1) + k);
  for (int k = threadIdx.x; k < K; k += kThreads) logw[k] = logf(a.weights[k * a.weights_stride]);
  __syncthreads();

  const TD* draft = static_cast<const TD*>(a.draft) + draft_row(a, sp.row) * a.draft_stride_n + sp.begin;
  const TP* p = a.target == nullptr
                    ? nullptr
                    : static_cast<const TP*>(a.target) + target_row(a, sp.row) * a.target_stride_n + sp.begin;
  float acc[3] = {0.f, 0.f, 0.f};
  sweep2_span<8, true>(draft, a.draft_stride_k, K, p, lse, logw, row_scale(a, sp.row), 0, sp.vec_count, acc);
  sweep2_span<1, true>(draft, a.draft_stride_k, K, p, lse, logw, row_scale(a, sp.row), sp.vec_count,
                       sp.count - sp.vec_count, acc);
  __shared__ float scratch[kWarps][3];
  float* row_parts = s.part2 + sp.local * s.splits * 3;
  block_sum3(acc, scratch, row_parts + sp.index * 3);
  if (!last_cta_of_row(s.counters + sp.local, s.splits)) return;

  if (threadIdx.x < 32) {  // warp 0: lanes take the spans strided, then a butterfly
    const int lane = threadIdx.x;
    float sums[3];
#pragma unroll
    for (int j = 0; j < 3; ++j) {
      float v = 0.f;
      for (int q = lane; q < s.splits; q += 32) v += __ldcg(row_parts + q * 3 + j);
      sums[j] = warp_sum(v);
    }
    if (lane == 0) write_sweep2(a, sp.row, sums);
  }
}

template <class TD, class TP>
void launch_split_typed(const DraftArgs& a, const SplitArgs& s, int64_t rows, cudaStream_t stream) {
  const dim3 grid(unsigned(rows * s.splits));
  split_sweep1_kernel<TD, TP><<<grid, kThreads, (a.K + 1) * sizeof(SoftmaxState), stream>>>(a, s);
  check(cudaGetLastError(), "kernel split_sweep1");
  if (a.decompose) {
    split_sweep2_kernel<TD, TP><<<grid, kThreads, (2 * a.K + 1) * sizeof(float), stream>>>(a, s);
    check(cudaGetLastError(), "kernel split_sweep2");
  }
}

}  // namespace

void launch_split(const DraftArgs& a, int draft_dtype, int target_dtype, const SplitArgs& s,
                  int64_t rows, cudaStream_t stream) {
  dispatch_dtypes(draft_dtype, target_dtype, [&](auto td, auto tp) {
    launch_split_typed<typename decltype(td)::type, typename decltype(tp)::type>(a, s, rows, stream);
  });
}

void append_split_infos(std::vector<KernelInfo>& out) {
  for (int d = kFloat32; d <= kBFloat16; ++d) {
    for (int t = kFloat32; t <= kBFloat16; ++t) {
      dispatch_dtypes(d, t, [&](auto td, auto tp) {
        using TD = typename decltype(td)::type;
        using TP = typename decltype(tp)::type;
        KernelInfo info;
        info.name = kernel_name<TD, TP>("split_sweep1");
        check(cudaFuncGetAttributes(&info.attr, split_sweep1_kernel<TD, TP>), info.name.c_str());
        out.push_back(info);
        info.name = kernel_name<TD, TP>("split_sweep2");
        check(cudaFuncGetAttributes(&info.attr, split_sweep2_kernel<TD, TP>), info.name.c_str());
        out.push_back(info);
      });
    }
  }
}

}  // namespace gpu
}  // namespace epikern
