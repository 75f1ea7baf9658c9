// epikern._cuda: the CUDA kernels behind a pybind11 interface of raw device pointers (ints),
// element strides, dtype codes and a cudaStream_t (int). No libtorch: epikern/backends/cuda.py
// passes tensor.data_ptr(), strides and torch.cuda.current_stream().cuda_stream, with the
// tensors' device current. CUDA errors surface as RuntimeError naming the kernel or API call.
#include <pybind11/pybind11.h>

#include <cmath>
#include <stdexcept>

#include "draft_uncertainty.h"

namespace py = pybind11;
using namespace epikern::gpu;

namespace {

DraftArgs make_args(uintptr_t draft, int64_t draft_stride_k, int64_t draft_stride_n,
                    uintptr_t target, int64_t target_stride_n, int64_t K, int64_t N, int64_t V,
                    double temperature, bool decompose) {
  if (K < 1 || K > INT32_MAX) throw std::invalid_argument("epikern._cuda: K must be >= 1");
  if (!(temperature > 0.0) || !std::isfinite(temperature))
    throw std::invalid_argument("epikern._cuda: temperature must be finite and > 0");
  DraftArgs a{};
  a.draft = reinterpret_cast<const void*>(draft);
  a.draft_stride_k = draft_stride_k;
  a.draft_stride_n = draft_stride_n;
  a.target = reinterpret_cast<const void*>(target);
  a.target_stride_n = target_stride_n;
  a.K = int(K);
  a.N = N;
  a.V = V;
  a.scale = float(1.0 / temperature);
  a.decompose = decompose;
  return a;
}

// The row maps of draft_uncertainty_rows (all zero: the dense op), as pybind11 keyword arguments.
struct RowMaps {
  uintptr_t draft_index = 0;
  bool draft_index64 = false;
  int64_t draft_rows = 0;
  uintptr_t target_index = 0;
  bool target_index64 = false;
  int64_t target_rows = 0;
  uintptr_t inv_temperature = 0;
  int64_t inv_temperature_stride = 0;

  static RowMaps from(const py::kwargs& kw) {
    RowMaps m;
    for (const auto& item : kw) {
      const std::string key = py::cast<std::string>(item.first);
      if (key == "draft_index") m.draft_index = py::cast<uintptr_t>(item.second);
      else if (key == "draft_index64") m.draft_index64 = py::cast<bool>(item.second);
      else if (key == "draft_rows") m.draft_rows = py::cast<int64_t>(item.second);
      else if (key == "target_index") m.target_index = py::cast<uintptr_t>(item.second);
      else if (key == "target_index64") m.target_index64 = py::cast<bool>(item.second);
      else if (key == "target_rows") m.target_rows = py::cast<int64_t>(item.second);
      else if (key == "inv_temperature") m.inv_temperature = py::cast<uintptr_t>(item.second);
      else if (key == "inv_temperature_stride") m.inv_temperature_stride = py::cast<int64_t>(item.second);
      else throw std::invalid_argument("epikern._cuda: unknown keyword argument " + key);
    }
    return m;
  }
  void apply(DraftArgs& a) const {
    a.draft_index = reinterpret_cast<const void*>(draft_index);
    a.draft_index64 = draft_index64;
    a.draft_rows = draft_rows;
    a.target_index = reinterpret_cast<const void*>(target_index);
    a.target_index64 = target_index64;
    a.target_rows = target_rows;
    a.inv_temperature = reinterpret_cast<const float*>(inv_temperature);
    a.inv_temperature_stride = inv_temperature_stride;
  }
};

py::dict plan_dict(const Plan& p) {
  py::dict d;
  d["path"] = p.use_cluster ? "cluster" : "split";
  d["cluster"] = p.cluster;
  d["splits"] = p.splits;
  d["vec"] = p.vec;
  d["slice"] = p.slice;
  d["rows_per_launch"] = p.rows_per_launch;
  d["smem"] = p.smem;
  d["workspace"] = p.workspace;
  return d;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "epikern CUDA kernels (raw pointers, strides in elements, dtype codes 0=f32 1=f16 2=bf16)";

  m.def(
      "draft_uncertainty_plan",
      [](uintptr_t draft, int draft_dtype, int64_t draft_stride_k, int64_t draft_stride_n,
         uintptr_t target, int target_dtype, int64_t target_stride_n, int64_t K, int64_t N,
         int64_t V, bool decompose, int path, const py::kwargs& row_maps) {
        DraftArgs a = make_args(draft, draft_stride_k, draft_stride_n, target, target_stride_n, K,
                                N, V, 1.0, decompose);
        RowMaps::from(row_maps).apply(a);
        return plan_dict(make_plan(a, draft_dtype, target_dtype, path));
      },
      "How a call runs on the current device: path, sizes and the workspace bytes it needs "
      "(keyword arguments: the row maps of `draft_uncertainty`).",
      py::arg("draft"), py::arg("draft_dtype"), py::arg("draft_stride_k"),
      py::arg("draft_stride_n"), py::arg("target"), py::arg("target_dtype"),
      py::arg("target_stride_n"), py::arg("K"), py::arg("N"), py::arg("V"), py::arg("decompose"),
      py::arg("path") = int(kPathAuto));

  m.def(
      "draft_uncertainty",
      [](uintptr_t draft, int draft_dtype, int64_t draft_stride_k, int64_t draft_stride_n,
         uintptr_t target, int target_dtype, int64_t target_stride_n, uintptr_t weights,
         int64_t weights_stride, int64_t K, int64_t N, int64_t V, double temperature,
         bool decompose, uintptr_t stats, int64_t stats_stride, uintptr_t draft_lse,
         int64_t draft_lse_stride, uintptr_t target_lse, uintptr_t workspace,
         size_t workspace_bytes, uintptr_t stream, int path, const py::kwargs& row_maps) {
        DraftArgs a = make_args(draft, draft_stride_k, draft_stride_n, target, target_stride_n, K,
                                N, V, temperature, decompose);
        RowMaps::from(row_maps).apply(a);
        a.weights = reinterpret_cast<const float*>(weights);
        a.weights_stride = weights_stride;
        a.stats = reinterpret_cast<float*>(stats);
        a.stats_stride = stats_stride;
        a.draft_lse = reinterpret_cast<float*>(draft_lse);
        a.draft_lse_stride = draft_lse_stride;
        a.target_lse = reinterpret_cast<float*>(target_lse);
        const Plan plan = make_plan(a, draft_dtype, target_dtype, path);
        launch(a, draft_dtype, target_dtype, plan, reinterpret_cast<void*>(workspace),
               workspace_bytes, reinterpret_cast<cudaStream_t>(stream));
      },
      "Enqueue draft_uncertainty on `stream` (see epikern/backends/cuda.py for the contract). "
      "Keyword arguments draft_index, draft_index64, draft_rows, target_index, target_index64, "
      "target_rows, inv_temperature, inv_temperature_stride: the row maps of "
      "draft_uncertainty_rows (N output rows read through int32/int64 maps at per-row 1/T).",
      py::arg("draft"), py::arg("draft_dtype"), py::arg("draft_stride_k"),
      py::arg("draft_stride_n"), py::arg("target"), py::arg("target_dtype"),
      py::arg("target_stride_n"), py::arg("weights"), py::arg("weights_stride"), py::arg("K"),
      py::arg("N"), py::arg("V"), py::arg("temperature"), py::arg("decompose"), py::arg("stats"),
      py::arg("stats_stride"), py::arg("draft_lse"), py::arg("draft_lse_stride"),
      py::arg("target_lse"), py::arg("workspace"), py::arg("workspace_bytes"), py::arg("stream"),
      py::arg("path") = int(kPathAuto));

  m.def(
      "kernel_attributes",
      []() {
        std::vector<KernelInfo> infos;
        append_split_infos(infos);
        append_cluster_infos(infos);
        py::list out;
        for (const KernelInfo& k : infos) {
          py::dict d;
          d["name"] = k.name;
          d["registers"] = k.attr.numRegs;
          d["local_bytes"] = k.attr.localSizeBytes;
          d["static_smem_bytes"] = k.attr.sharedSizeBytes;
          d["max_threads"] = k.attr.maxThreadsPerBlock;
          d["binary_version"] = k.attr.binaryVersion;
          d["ptx_version"] = k.attr.ptxVersion;
          out.append(d);
        }
        return out;
      },
      "cudaFuncGetAttributes of every kernel on the current device (registers, spills, arch).");

  m.def(
      "device_count",
      []() {
        int n = 0;
        const cudaError_t err = cudaGetDeviceCount(&n);
        if (err != cudaSuccess) {
          (void)cudaGetLastError();
          return 0;
        }
        return n;
      },
      "Number of CUDA devices the runtime sees (0 when there is no driver or device).");

  m.attr("PATH_AUTO") = int(kPathAuto);
  m.attr("PATH_SPLIT") = int(kPathSplit);
  m.attr("PATH_CLUSTER") = int(kPathCluster);
}
