// Host emulation of the CUDA draft_uncertainty kernels' arithmetic, built by
// tests/backends/test_cuda_row_math.py with the system C++ compiler (no GPU needed).
//
// It runs the functions of csrc/include/epikern/cuda/row_math.h and epikern/online_softmax.h in
// the order the split kernels use them: logits times 1/T; each row cut into `splits` spans; inside a
// span, `threads` emulated threads take 8-element chunks strided by threads·8 (then a scalar
// tail), holding the states of up to 4 drafts at a time plus the reference's own state; thread
// states merged in order, then span states in span order; finish_sweep1; sweep 2 with the
// two-pass mixture (max, then sums) per entry.
//
// stdin: int32 K, N, V, has_p, decompose, splits, threads; float32 temperature; float32
// weights[K]; float32 draft[K][N][V]; float32 target[N][V] if has_p.
// stdout: float32 stats[6][N], draft_lse[K][N], target_lse[N].
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "epikern/cuda/row_math.h"

using namespace epikern;
using namespace epikern::gpu;

namespace {

// e^x as the device computes it (common.cuh): ex2.approx.ftz of x·log2(e), whose results below
// 2^−126 (x < −87.3) are flushed to 0.
struct Exp {
  float operator()(float x) const {
    const float y = exp2f(x * 1.4426950408889634f);
    return y < FLT_MIN ? 0.f : y;  // false for NaN: NaN stays
  }
};
struct Log {
  float operator()(float x) const { return logf(x); }
};

constexpr int kGroup = 4;

template <class T>
void read(T* p, size_t n) {
  if (std::fread(p, sizeof(T), n, stdin) != n) {
    std::fprintf(stderr, "short read\n");
    std::exit(2);
  }
}

// One emulated thread's sweep 1 over its chunks of [begin, begin + count) with chunk width W.
template <int W>
void thread_sweep1(const float* const* drafts, int kb, const float* p, bool with_p, float scale,
                   int64_t begin, int64_t count, int t, int threads, SoftmaxState* st) {
  for (int64_t i = begin + int64_t(t) * W; i < begin + count; i += int64_t(threads) * W) {
    float y[W], x[W];
    if (p != nullptr) {
      for (int e = 0; e < W; ++e) y[e] = p[i + e] * scale;
      if (with_p) softmax_add_chunk(st[kGroup], y, y, Exp{});
    }
    for (int j = 0; j < kb; ++j) {
      for (int e = 0; e < W; ++e) x[e] = drafts[j][i + e] * scale;
      softmax_add_chunk(st[j], x, p != nullptr ? y : x, Exp{});
    }
  }
}

}  // namespace

int main() {
  int32_t hdr[7];
  read(hdr, 7);
  const int K = hdr[0], splits = hdr[5], threads = hdr[6];
  const int64_t N = hdr[1], V = hdr[2];
  const bool has_p = hdr[3] != 0, decompose = hdr[4] != 0;
  float temperature;
  read(&temperature, 1);
  std::vector<float> w(K), draft(size_t(K) * N * V), target(has_p ? size_t(N) * V : 0);
  read(w.data(), w.size());
  read(draft.data(), draft.size());
  read(target.data(), target.size());

  const float scale = float(1.0 / temperature);
  const int64_t slice = ((V + splits - 1) / splits + 7) / 8 * 8;
  std::vector<float> stats(6 * N), draft_lse(size_t(K) * N), target_lse(N);
  std::vector<float> logw(K);
  for (int k = 0; k < K; ++k) logw[k] = logf(w[k]);

  for (int64_t r = 0; r < N; ++r) {
    const float* p = has_p ? target.data() + r * V : nullptr;
    std::vector<SoftmaxState> merged(K + 1, softmax_state_empty());
    for (int64_t begin = 0; begin < V; begin += slice) {
      const int64_t count = std::min(slice, V - begin), vec_count = count / 8 * 8;
      std::vector<SoftmaxState> span(K + 1, softmax_state_empty());
      for (int k0 = 0; k0 < K; k0 += kGroup) {
        const int kb = std::min(kGroup, K - k0);
        const float* drafts[kGroup];
        for (int j = 0; j < kb; ++j) drafts[j] = draft.data() + (int64_t(k0 + j) * N + r) * V;
        for (int t = 0; t < threads; ++t) {
          SoftmaxState st[kGroup + 1];
          for (auto& s : st) s = softmax_state_empty();
          thread_sweep1<8>(drafts, kb, p, k0 == 0, scale, begin, vec_count, t, threads, st);
          thread_sweep1<1>(drafts, kb, p, k0 == 0, scale, begin + vec_count, count - vec_count, t,
                           threads, st);
          for (int j = 0; j < kb; ++j) softmax_merge(span[k0 + j], st[j], Exp{});
          if (k0 == 0) softmax_merge(span[K], st[kGroup], Exp{});
        }
      }
      for (int k = 0; k <= K; ++k) softmax_merge(merged[k], span[k], Exp{});
    }
    std::vector<float> lse(K + 1);
    const Sweep1Row row = finish_sweep1(merged.data(), K, has_p, w.data(), 1, lse.data());
    for (int k = 0; k < K; ++k) draft_lse[k * N + r] = lse[k];
    target_lse[r] = lse[K];
    stats[0 * N + r] = row.eu;
    stats[3 * N + r] = row.draft_entropy;
    stats[5 * N + r] = row.target_entropy;
    stats[1 * N + r] = stats[2 * N + r] = stats[4 * N + r] = NAN;
    if (!decompose) continue;
    float acc[3] = {0.f, 0.f, 0.f};
    for (int64_t v = 0; v < V; ++v) {
      auto l_of = [&](int k) {
        return mixture_log_weight(logw[k], draft[(int64_t(k) * N + r) * V + v] * scale, lse[k]);
      };
      float M = -INFINITY;
      for (int k = 0; k < K; ++k) M = l_of(k) > M ? l_of(k) : M;
      const float rr = exp_origin(M);
      float S = 0.f, J1 = 0.f;
      for (int k = 0; k < K; ++k) mixture_accumulate(S, J1, l_of(k), logw[k], rr, Exp{});
      const MixtureTerms t = mixture_entry(rr, S, J1, has_p, has_p ? p[v] * scale : 0.f, lse[K],
                                           Exp{}, Log{});
      acc[0] += t.jsd;
      acc[1] += t.entropy;
      acc[2] += t.kl;
    }
    stats[1 * N + r] = acc[0];
    stats[4 * N + r] = acc[1];
    stats[2 * N + r] = has_p ? acc[2] : NAN;
  }
  std::fwrite(stats.data(), sizeof(float), stats.size(), stdout);
  std::fwrite(draft_lse.data(), sizeof(float), draft_lse.size(), stdout);
  std::fwrite(target_lse.data(), sizeof(float), target_lse.size(), stdout);
  return 0;
}
