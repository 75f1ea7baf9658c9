// Host side of draft_uncertainty: choose the path and sizes from the shape, the alignment of the
// rows and the device, then enqueue the kernels. Nothing here synchronises with the device or
// allocates device memory (the workspace comes from the caller), so a call can be captured in a
// CUDA graph.
#include <algorithm>
#include <climits>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>

#include "draft_uncertainty.h"

namespace epikern {
namespace gpu {
namespace {

constexpr int kMaxDrafts = 1024;               // bounds the per-row shared-memory arrays
constexpr size_t kClusterSmemTarget = 100 << 10;  // two cluster CTAs per SM (228 KB per SM)
constexpr int64_t kMinSlice = 2048;            // never spread a row thinner than this per CTA
constexpr int kSplitCtasPerSm = 4;             // split path: CTAs per SM to aim for

struct DeviceInfo {
  int sms, major, l2_bytes;
  size_t smem_optin;
};

DeviceInfo device_info() {
  int device = 0;
  check(cudaGetDevice(&device), "cudaGetDevice");
  static std::mutex mutex;
  static std::map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  const auto hit = cache.find(device);
  if (hit != cache.end()) return hit->second;
  int sms = 0, major = 0, l2 = 0, optin = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device), "cudaDeviceGetAttribute");
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
        "cudaDeviceGetAttribute");
  const DeviceInfo info{sms, major, l2, size_t(optin)};
  cache.emplace(device, info);
  return info;
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up8(int64_t n) { return ceil_div(n, 8) * 8; }

// Every row of every input starts at a 16-byte boundary (16-byte loads and bulk copies apply).
bool rows_aligned(const DraftArgs& a, size_t draft_elem, size_t target_elem) {
  auto ptr_ok = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  auto stride_ok = [](int64_t stride, int64_t extent, size_t elem) {
    return extent <= 1 || (stride * int64_t(elem)) % 16 == 0;
  };
  const int64_t draft_rows = a.draft_index != nullptr ? a.draft_rows : a.N;
  const int64_t target_rows = a.target_index != nullptr ? a.target_rows : a.N;
  bool ok = ptr_ok(a.draft) && stride_ok(a.draft_stride_k, a.K, draft_elem) &&
            stride_ok(a.draft_stride_n, draft_rows, draft_elem);
  if (a.target != nullptr)
    ok = ok && ptr_ok(a.target) && stride_ok(a.target_stride_n, target_rows, target_elem);
  return ok;
}

// Cluster size for the cluster path (a power of two up to max_cluster), or 0: the fewest CTAs
// whose spans fit the shared-memory target (else the opt-in limit), then more while few rows
// leave SMs idle (decode shapes). Powers of two pack the 16–18 SMs of a GPC without leaving
// slots that no whole cluster fits in.
int choose_cluster(const DraftArgs& a, int dd, int dp, const DeviceInfo& dev, int max_cluster) {
  const bool has_p = a.target != nullptr;
  auto smem_for = [&](int c) {
    return cluster_smem_bytes(a.K, has_p, round_up8(ceil_div(a.V, c)), dd, dp);
  };
  int c = 0;
  for (int x = 1; x <= max_cluster && c == 0; x *= 2)
    if (smem_for(x) <= kClusterSmemTarget) c = x;
  for (int x = 1; x <= max_cluster && c == 0; x *= 2)
    if (smem_for(x) <= dev.smem_optin) c = x;
  if (c == 0) return 0;
  while (2 * c <= max_cluster && a.N * c < 2 * int64_t(dev.sms) &&
         round_up8(ceil_div(a.V, 2 * c)) >= kMinSlice)
    c *= 2;
  return c;
}

}  // namespace

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("epikern._cuda: ") + what + " failed: " +
                             cudaGetErrorName(err) + ": " + cudaGetErrorString(err));
}

size_t dtype_bytes(int dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat16:
    case kBFloat16: return 2;
  }
  throw std::invalid_argument("epikern._cuda: unknown logits dtype code " + std::to_string(dtype));
}

Plan make_plan(const DraftArgs& a, int dd, int dp, int path) {
  if (a.K < 1 || a.K > kMaxDrafts)
    throw std::invalid_argument("epikern._cuda: K = " + std::to_string(a.K) +
                                " drafts; the CUDA kernels take 1 to " + std::to_string(kMaxDrafts));
  if (a.V < 1 || a.N < 0)
    throw std::invalid_argument("epikern._cuda: bad shape N = " + std::to_string(a.N) +
                                ", V = " + std::to_string(a.V));
  const DeviceInfo dev = device_info();
  const size_t de = dtype_bytes(dd), pe = a.target != nullptr ? dtype_bytes(dp) : 0;
  Plan plan;
  plan.vec = rows_aligned(a, de, dtype_bytes(dp));

  // Clusters above 8 CTAs need a non-portable opt-in that a device may refuse: then try <= 8.
  for (const int max_cluster : {kMaxCluster, 8}) {
    if (path == kPathSplit || !plan.vec || dev.major < 9) break;
    const int c = choose_cluster(a, dd, dp, dev, max_cluster);
    if (c == 0) continue;
    const int64_t slice = round_up8(ceil_div(a.V, c));
    const size_t smem = cluster_smem_bytes(a.K, a.target != nullptr, slice, dd, dp);
    if (cluster_fits(dd, dp, c, smem)) {
      plan.use_cluster = true;
      plan.cluster = c;
      plan.slice = slice;
      plan.smem = smem;
      plan.rows_per_launch = std::max<int64_t>(1, std::min<int64_t>(a.N, INT_MAX / c));
      return plan;
    }
  }
  if (path == kPathCluster)
    throw std::invalid_argument(
        "epikern._cuda: the cluster path cannot run this call (it needs an sm_90+ device, a "
        "kernel built for it, rows starting 16-byte aligned and a row that fits the shared memory "
        "of 16 CTAs)");

  // Split path. With decompose, process rows in blocks whose bytes fit half of L2, so that
  // sweep 2 re-reads them from L2 rather than HBM.
  const int64_t row_bytes = a.V * (int64_t(a.K) * int64_t(de) + int64_t(pe));
  int64_t rows = std::max<int64_t>(a.N, 1);
  if (a.decompose) rows = std::clamp<int64_t>(int64_t(dev.l2_bytes) / 2 / row_bytes, 1, rows);
  const int64_t max_splits = std::max<int64_t>(1, ceil_div(a.V, kMinSlice));
  int64_t splits = std::clamp<int64_t>(ceil_div(int64_t(kSplitCtasPerSm) * dev.sms, rows), 1, max_splits);
  plan.slice = round_up8(ceil_div(a.V, splits));
  splits = ceil_div(a.V, plan.slice);
  plan.splits = int(splits);
  plan.rows_per_launch = std::min<int64_t>(rows, INT_MAX / splits);

  const size_t R = size_t(plan.rows_per_launch), S = size_t(splits), K1 = size_t(a.K) + 1;
  plan.off_counters = 0;
  plan.off_part1 = align16(R * sizeof(unsigned));
  plan.off_lse = plan.off_part1 + R * S * K1 * sizeof(SoftmaxState);
  plan.off_part2 = align16(plan.off_lse + R * K1 * sizeof(float));
  plan.workspace = align16(plan.off_part2 + R * S * 3 * sizeof(float));
  return plan;
}

void launch(const DraftArgs& a, int dd, int dp, const Plan& plan, void* workspace,
            size_t workspace_bytes, cudaStream_t stream) {
  if (a.N == 0) return;
  if (plan.use_cluster) {
    for (int64_t r0 = 0; r0 < a.N; r0 += plan.rows_per_launch)
      launch_cluster(a, dd, dp, plan, r0, std::min(plan.rows_per_launch, a.N - r0), stream);
    return;
  }
  if (workspace == nullptr || workspace_bytes < plan.workspace ||
      reinterpret_cast<uintptr_t>(workspace) % 16 != 0)
    throw std::invalid_argument("epikern._cuda: the workspace must be 16-byte aligned and hold " +
                                std::to_string(plan.workspace) + " bytes, got " +
                                std::to_string(workspace_bytes));
  char* ws = static_cast<char*>(workspace);
  SplitArgs s;
  s.splits = plan.splits;
  s.slice = plan.slice;
  s.vec = plan.vec;
  s.counters = reinterpret_cast<unsigned*>(ws + plan.off_counters);
  s.part1 = reinterpret_cast<SoftmaxState*>(ws + plan.off_part1);
  s.lse = reinterpret_cast<float*>(ws + plan.off_lse);
  s.part2 = reinterpret_cast<float*>(ws + plan.off_part2);
  // The kernels leave the counters at zero; they start there once per call.
  check(cudaMemsetAsync(s.counters, 0, size_t(plan.rows_per_launch) * sizeof(unsigned), stream),
        "cudaMemsetAsync (workspace counters)");
  for (int64_t r0 = 0; r0 < a.N; r0 += plan.rows_per_launch) {
    s.row0 = r0;
    launch_split(a, dd, dp, s, std::min(plan.rows_per_launch, a.N - r0), stream);
  }
}

}  // namespace gpu
}  // namespace epikern
