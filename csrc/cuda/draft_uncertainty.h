// Host-side contract of the draft_uncertainty CUDA kernels: argument block, execution plan,
// launchers. Pointers are raw device pointers from Python; every stride is in elements (int64).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "epikern/online_softmax.h"

namespace epikern {
namespace gpu {

// Logit dtype codes shared with epikern/backends/cuda.py.
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Which path a call takes: chosen from the shape and device, or forced (tests, benchmarks).
enum Path : int { kPathAuto = 0, kPathSplit = 1, kPathCluster = 2 };

constexpr int kMaxCluster = 16;  // non-portable cluster size limit of sm_90

EPIKERN_INLINE size_t align16(size_t n) { return (n + 15) / 16 * 16; }

// Rows of the packed stats output (order of epikern.backends.reference.STATS).
enum Stat : int {
  kStatEu = 0,
  kStatJsd = 1,
  kStatKl = 2,
  kStatDraftEntropy = 3,
  kStatMixtureEntropy = 4,
  kStatTargetEntropy = 5,
};

struct DraftArgs {
  const void* draft;  // [K, N, V], unit stride over V
  int64_t draft_stride_k, draft_stride_n;
  const void* target;  // [N, V] or null (no reference)
  int64_t target_stride_n;
  const float* weights;  // [K]
  int64_t weights_stride;
  float* stats;  // [6, N], unit stride over N
  int64_t stats_stride;
  float* draft_lse;  // [K, N], unit stride over N
  int64_t draft_lse_stride;
  float* target_lse;  // [N], contiguous
  int K;
  int64_t N, V;
  float scale;  // 1 / T
  bool decompose;
  // draft_uncertainty_rows: output row n reads draft row draft_index[n] (of draft_rows) and target
  // row target_index[n] (of target_rows), int32 or int64, at 1/T = inv_temperature[n · stride];
  // nullptr: row n, at `scale`. A row whose entry is outside [0, rows) or whose 1/T is not finite
  // and > 0 is skipped: all its outputs NaN, no logit read.
  const void* draft_index = nullptr;
  bool draft_index64 = false;
  int64_t draft_rows = 0;
  const void* target_index = nullptr;
  bool target_index64 = false;
  int64_t target_rows = 0;
  const float* inv_temperature = nullptr;
  int64_t inv_temperature_stride = 0;
};

// How one call runs. The cluster path keeps each row on chip across `cluster` CTAs of one
// cluster (sm_90+); the split path cuts each row into `splits` spans and merges through the
// workspace, `rows_per_launch` rows at a time so that sweep 2 re-reads them from L2.
struct Plan {
  bool use_cluster = false;
  int cluster = 0;
  int splits = 0;
  bool vec = false;        // 16-byte loads (every row starts 16-byte aligned)
  int64_t slice = 0;       // elements per CTA span (a multiple of 8)
  int64_t rows_per_launch = 0;
  size_t smem = 0;         // dynamic shared memory per CTA
  // Workspace layout of the split path (byte offsets; 0 bytes for the cluster path).
  size_t off_counters = 0, off_part1 = 0, off_lse = 0, off_part2 = 0, workspace = 0;
};

// Per-launch arguments of the split kernels, pointing into the workspace.
struct SplitArgs {
  int64_t row0;  // first row of this launch
  int splits;
  int64_t slice;
  bool vec;
  unsigned* counters;   // [rows_per_launch], zero between uses (the last CTA of a row resets it)
  SoftmaxState* part1;  // [rows_per_launch, splits, K + 1] sweep-1 partial states
  float* lse;           // [rows_per_launch, K + 1] log-normalisers for sweep 2
  float* part2;         // [rows_per_launch, splits, 3] sweep-2 partial sums
};

// Chooses the path and sizes for `a` on the current device (no device synchronisation); `path`
// forces one (kPathCluster throws std::invalid_argument where it cannot run).
Plan make_plan(const DraftArgs& a, int draft_dtype, int target_dtype, int path);

// Enqueue the whole op on `stream` following `plan`, with `workspace` (device memory of at least
// plan.workspace bytes, 16-byte aligned; unused by the cluster path). Throws std::runtime_error
// naming the kernel on any launch error.
void launch(const DraftArgs& a, int draft_dtype, int target_dtype, const Plan& plan,
            void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Per-dtype entry points of the two paths (defined next to their kernels).
void launch_split(const DraftArgs& a, int draft_dtype, int target_dtype, const SplitArgs& s,
                  int64_t rows, cudaStream_t stream);
void launch_cluster(const DraftArgs& a, int draft_dtype, int target_dtype, const Plan& plan,
                    int64_t row0, int64_t rows, cudaStream_t stream);
// Whether the cluster kernel for these dtypes was compiled for sm_90+ and can run a cluster of
// `cluster` CTAs with `smem` bytes each on the current device.
bool cluster_fits(int draft_dtype, int target_dtype, int cluster, size_t smem);
// Dynamic shared memory of a cluster CTA holding `slice` elements of every row.
size_t cluster_smem_bytes(int K, bool has_p, int64_t slice, int draft_dtype, int target_dtype);

// Kernel resource usage (cudaFuncGetAttributes) of every kernel, for reports and tests.
struct KernelInfo {
  std::string name;
  cudaFuncAttributes attr;
};
void append_split_infos(std::vector<KernelInfo>& out);
void append_cluster_infos(std::vector<KernelInfo>& out);

// Throws std::runtime_error("epikern._cuda: <what> failed: <CUDA error>") if err != cudaSuccess.
void check(cudaError_t err, const char* what);
size_t dtype_bytes(int dtype);

}  // namespace gpu
}  // namespace epikern
