// Cluster path of draft_uncertainty (sm_90+): one thread-block cluster per row. CTA `rank` holds
// elements [rank·slice, (rank+1)·slice) of the K draft rows and the reference row in shared
// memory, loaded once from HBM by bulk (TMA) copies in kStages pieces so that sweep 1 starts on
// the first piece while the rest is in flight. The sweep-1 partial states are merged across the
// cluster through distributed shared memory (every CTA merges all ranks in rank order, so all get
// identical log-normalisers), sweep 2 runs from shared memory, and rank 0 sums the sweep-2
// partials and writes the row. Rows must start 16-byte aligned (the host checks); a last span
// that is not a multiple of 8 elements reads its tail straight from global memory.
#include <cooperative_groups.h>

#include <map>
#include <mutex>
#include <tuple>

#include "common.cuh"

namespace cg = cooperative_groups;

namespace epikern {
namespace gpu {
namespace {


// Dynamic shared memory of a cluster CTA (byte offsets; host and device agree on it).
struct ClusterLayout {
  size_t draft_pitch;  // bytes per draft row; slice is a multiple of 8, so this is 16-aligned
  size_t target, part1, gathered, merged, lse, logw, part2, bytes;

  EPIKERN_HOST_DEVICE ClusterLayout(int K, bool has_p, int64_t slice, size_t draft_elem,
                                    size_t target_elem) {
    draft_pitch = size_t(slice) * draft_elem;
    target = size_t(K) * draft_pitch;
    part1 = target + (has_p ? size_t(slice) * target_elem : 0);  // [K + 1] this CTA's states
    gathered = part1 + size_t(K + 1) * sizeof(SoftmaxState);       // [cluster][K + 1] copies
    merged = gathered + size_t(kMaxCluster) * (K + 1) * sizeof(SoftmaxState);  // [K + 1]
    lse = merged + size_t(K + 1) * sizeof(SoftmaxState);           // [K + 1]
    logw = lse + size_t(K + 1) * sizeof(float);                    // [K]
    part2 = align16(logw + size_t(K) * sizeof(float));             // [3]
    bytes = part2 + 16;
  }
};

// sm_90 device helpers: mbarriers and bulk copies (absent from the sm_80 image).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
constexpr int kStages = 4;  // bulk-copy pieces per CTA, each with its own mbarrier

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(bar)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

// Global → own shared memory through the bulk copy engine; completion counted on `bar`.
// dst, src and bytes are multiples of 16.
__device__ __forceinline__ void bulk_copy(void* dst, const void* src, uint32_t bytes,
                                          uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
}

// First element of stage c (of kStages) over `vec_count` elements, in whole 8-element chunks.
__device__ __forceinline__ int64_t stage_begin(int64_t vec_count, int c) {
  return vec_count / 8 * c / kStages * 8;
}
#endif

template <class TD, class TP>
__global__ void __launch_bounds__(kThreads, 2) cluster_kernel(DraftArgs a, int64_t row0, int64_t slice) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  const unsigned csize = cluster.num_blocks();
  const int64_t row = row0 + int64_t(blockIdx.x) / csize;
  if (row_skipped(a, row)) {  // every CTA of the cluster returns here, before any cluster barrier
    if (rank == 0 && threadIdx.x == 0) write_skipped(a, row);
    return;
  }
  const float scale = row_scale(a, row);
  const int K = a.K;
  const bool has_p = a.target != nullptr;
  const int64_t begin = int64_t(rank) * slice;
  const int64_t count = begin < a.V ? min(slice, a.V - begin) : 0;
  const int64_t vec_count = count / 8 * 8;

  const ClusterLayout L(K, has_p, slice, sizeof(TD), sizeof(TP));
  extern __shared__ __align__(16) unsigned char smem[];
  const TD* sdraft = reinterpret_cast<const TD*>(smem);
  const TP* starget = has_p ? reinterpret_cast<const TP*>(smem + L.target) : nullptr;
  SoftmaxState* part1 = reinterpret_cast<SoftmaxState*>(smem + L.part1);
  SoftmaxState* gathered = reinterpret_cast<SoftmaxState*>(smem + L.gathered);
  SoftmaxState* merged = reinterpret_cast<SoftmaxState*>(smem + L.merged);
  float* lse = reinterpret_cast<float*>(smem + L.lse);
  float* logw = reinterpret_cast<float*>(smem + L.logw);
  float* part2 = reinterpret_cast<float*>(smem + L.part2);
  __shared__ __align__(8) uint64_t bars[kStages];
  __shared__ SoftmaxState scratch[kWarps][kStates];
  __shared__ float scratch3[kWarps][3];

  const TD* gdraft = static_cast<const TD*>(a.draft) + draft_row(a, row) * a.draft_stride_n + begin;
  const TP* gtarget =
      has_p ? static_cast<const TP*>(a.target) + target_row(a, row) * a.target_stride_n + begin : nullptr;

  if (threadIdx.x == 0) {
#pragma unroll
    for (int c = 0; c < kStages; ++c) mbar_init(&bars[c]);
    // Make the initialised barriers visible to the bulk-copy (async) proxy.
    asm volatile("fence.mbarrier_init.release.cluster;\n\tfence.proxy.async.shared::cta;" ::: "memory");
    for (int c = 0; c < kStages; ++c) {
      const int64_t e0 = stage_begin(vec_count, c), n = stage_begin(vec_count, c + 1) - e0;
      const size_t draft_bytes = size_t(n) * sizeof(TD), target_bytes = size_t(n) * sizeof(TP);
      mbar_expect_tx(&bars[c], uint32_t(K * draft_bytes + (has_p ? target_bytes : 0)));
      if (n == 0) continue;
      for (int k = 0; k < K; ++k)
        bulk_copy(smem + k * L.draft_pitch + e0 * sizeof(TD), gdraft + k * a.draft_stride_k + e0,
                  uint32_t(draft_bytes), &bars[c]);
      if (has_p) bulk_copy(smem + L.target + e0 * sizeof(TP), gtarget + e0, uint32_t(target_bytes), &bars[c]);
    }
  }
  __syncthreads();  // barriers initialised before anyone waits on them

  // Sweep 1, kGroup drafts at a time; the first group consumes the stages as they land.
  for (int k0 = 0; k0 < K; k0 += kGroup) {
    const int kb = min(kGroup, K - k0);
    const bool first = k0 == 0;  // waits for the stages and gathers the reference's own state
    const TD* srows[kGroup];
    const TD* grows[kGroup];
    SoftmaxState st[kStates];
    SoftmaxState* dst[kStates];
#pragma unroll
    for (int j = 0; j < kGroup; ++j) {
      const int k = j < kb ? k0 + j : k0;
      srows[j] = sdraft + k * slice;
      grows[j] = gdraft + k * a.draft_stride_k;
      dst[j] = j < kb ? part1 + k0 + j : nullptr;
    }
    dst[kGroup] = first ? part1 + K : nullptr;  // an empty state when there is no reference
#pragma unroll
    for (int j = 0; j < kStates; ++j) st[j] = softmax_state_empty();
    for (int c = 0; c < kStages; ++c) {
      if (first) mbar_wait(&bars[c], 0);
      const int64_t e0 = stage_begin(vec_count, c);
      sweep1_span<8, false>(srows, kb, starget, first, scale, e0,
                            stage_begin(vec_count, c + 1) - e0, st);
    }
    sweep1_span<1, true>(grows, kb, gtarget, first, scale, vec_count, count - vec_count, st);
    block_merge(st, scratch, dst);
  }
  cluster.sync();  // every CTA's part1 is written and visible across the cluster

  // Copy all ranks' states here in parallel (one DSMEM round trip), then merge in rank order.
  const int nstates = K + 1;
  for (int i = threadIdx.x; i < int(csize) * nstates; i += kThreads)
    gathered[i] = cluster.map_shared_rank(part1, unsigned(i / nstates))[i % nstates];
  for (int k = threadIdx.x; k < K; k += kThreads)
    logw[k] = logf(a.weights[k * a.weights_stride]);
  __syncthreads();
  for (int k = threadIdx.x; k < nstates; k += kThreads) {
    SoftmaxState st = gathered[k];
    for (unsigned q = 1; q < csize; ++q) softmax_merge(st, gathered[q * nstates + k], Exp{});
    merged[k] = st;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if (rank == 0)
      write_sweep1(a, row, merged, lse);
    else if (a.decompose)
      finish_sweep1(merged, K, has_p, a.weights, long(a.weights_stride), lse);
  }
  __syncthreads();

  if (a.decompose) {
    float acc[3] = {0.f, 0.f, 0.f};
    sweep2_span<8, false>(sdraft, slice, K, starget, lse, logw, scale, 0, vec_count, acc);
    sweep2_span<1, true>(gdraft, a.draft_stride_k, K, gtarget, lse, logw, scale, vec_count,
                         count - vec_count, acc);
    block_sum3(acc, scratch3, part2);
    cluster.sync();  // every part2 is written
    if (rank == 0 && threadIdx.x < 32) {
      const unsigned lane = threadIdx.x;
      float sums[3];
#pragma unroll
      for (int j = 0; j < 3; ++j)
        sums[j] = warp_sum(lane < csize ? cluster.map_shared_rank(part2, lane)[j] : 0.f);
      if (lane == 0) write_sweep2(a, row, sums);
    }
  }
  cluster.sync();  // no CTA leaves while another may still read its shared memory
#else
  __trap();  // never launched: the host takes this path only for kernels built for sm_90+
#endif
}

cudaLaunchConfig_t cluster_config(int cluster, int64_t rows, size_t smem, cudaStream_t stream,
                                  cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(unsigned(rows * cluster));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = unsigned(cluster);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

// What a device allows a cluster kernel, set up once per device and dtype pair.
struct KernelSetup {
  bool usable;     // compiled for sm_90+ (not a JIT of older PTX) and attributes accepted
  bool cluster16;  // non-portable cluster sizes (up to 16) allowed
};

// Opt the kernel into all the dynamic shared memory the device offers (the actual amount is
// given per launch), and into clusters above 8 where the device allows them. Doing this once,
// outside any launch, keeps the launch itself free of attribute calls (CUDA-graph capture).
template <class TD, class TP>
KernelSetup setup_kernel(int device) {
  auto kernel = cluster_kernel<TD, TP>;
  cudaFuncAttributes fa;
  int optin = 0;
  if (cudaFuncGetAttributes(&fa, kernel) != cudaSuccess || fa.ptxVersion < 90 ||
      fa.binaryVersion < 90 ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess ||
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           optin - int(fa.sharedSizeBytes)) != cudaSuccess) {
    (void)cudaGetLastError();  // a refusal here only means "take the split path"
    return KernelSetup{false, false};
  }
  const bool cluster16 =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) == cudaSuccess;
  (void)cudaGetLastError();
  return KernelSetup{true, cluster16};
}

template <class TD, class TP>
bool cluster_fits_typed(int device, int cluster, size_t smem) {
  static std::mutex mutex;
  static std::map<int, KernelSetup> setups;
  static std::map<std::tuple<int, int, size_t>, bool> fits;  // (device, cluster, smem)
  std::lock_guard<std::mutex> lock(mutex);
  auto setup = setups.find(device);
  if (setup == setups.end()) setup = setups.emplace(device, setup_kernel<TD, TP>(device)).first;
  if (!setup->second.usable || (cluster > 8 && !setup->second.cluster16)) return false;
  const auto key = std::make_tuple(device, cluster, smem);
  const auto hit = fits.find(key);
  if (hit != fits.end()) return hit->second;
  int clusters = 0;
  cudaLaunchAttribute attr;
  const cudaLaunchConfig_t cfg = cluster_config(cluster, 1, smem, nullptr, &attr);
  if (cudaOccupancyMaxActiveClusters(&clusters, cluster_kernel<TD, TP>, &cfg) != cudaSuccess) {
    (void)cudaGetLastError();
    clusters = 0;
  }
  fits.emplace(key, clusters > 0);
  return clusters > 0;
}

}  // namespace

size_t cluster_smem_bytes(int K, bool has_p, int64_t slice, int draft_dtype, int target_dtype) {
  return ClusterLayout(K, has_p, slice, dtype_bytes(draft_dtype), dtype_bytes(target_dtype)).bytes;
}

bool cluster_fits(int draft_dtype, int target_dtype, int cluster, size_t smem) {
  if (cluster < 1 || cluster > kMaxCluster) return false;
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  bool fits = false;
  dispatch_dtypes(draft_dtype, target_dtype, [&](auto td, auto tp) {
    fits = cluster_fits_typed<typename decltype(td)::type, typename decltype(tp)::type>(
        device, cluster, smem);
  });
  return fits;
}

// `plan` comes from make_plan, whose cluster_fits set the kernel's attributes on this device.
void launch_cluster(const DraftArgs& a, int draft_dtype, int target_dtype, const Plan& plan,
                    int64_t row0, int64_t rows, cudaStream_t stream) {
  dispatch_dtypes(draft_dtype, target_dtype, [&](auto td, auto tp) {
    using TD = typename decltype(td)::type;
    using TP = typename decltype(tp)::type;
    cudaLaunchAttribute attr;
    const cudaLaunchConfig_t cfg = cluster_config(plan.cluster, rows, plan.smem, stream, &attr);
    check(cudaLaunchKernelEx(&cfg, cluster_kernel<TD, TP>, a, row0, plan.slice), "kernel cluster_kernel");
    check(cudaGetLastError(), "kernel cluster_kernel");
  });
}

void append_cluster_infos(std::vector<KernelInfo>& out) {
  for (int d = kFloat32; d <= kBFloat16; ++d) {
    for (int t = kFloat32; t <= kBFloat16; ++t) {
      dispatch_dtypes(d, t, [&](auto td, auto tp) {
        using TD = typename decltype(td)::type;
        using TP = typename decltype(tp)::type;
        KernelInfo info;
        info.name = kernel_name<TD, TP>("cluster_kernel");
        check(cudaFuncGetAttributes(&info.attr, cluster_kernel<TD, TP>), info.name.c_str());
        out.push_back(info);
      });
    }
  }
}

}  // namespace gpu
}  // namespace epikern
