// Fused CPU kernel of epikern::draft_uncertainty (math: epikern/online_softmax.h).
//
// Inputs: K draft rows and (optionally) one reference row per token, logits of dtype fp32, fp16
// or bf16 read in place with unit stride over V and arbitrary (int64) strides over K and N.
// Outputs, float32: stats[6, N] (eu, jsd, kl, draft_entropy, mixture_entropy, target_entropy),
// draft_lse[K, N], target_lse[N].
//
// OpenMP over rows (schedule static: each row is computed by one thread in a fixed order, so the
// results do not depend on the thread count); with fewer than kSplitRows rows and V ≥ 2·kSplitSpan
// over (row, vocabulary span) items instead, partial states merged in span order. Per row/span:
//   sweep 1: blocks of kBlock1 entries, ONE vectorised pass per distribution and block: convert
//            to fp32 · 1/T (kept in an L1 buffer), take e^{x − origin} with the origin = the max
//            of the earlier blocks, accumulate s, t and the cross term c against the reference
//            and the block max, then move the origin to the new max (accumulate_lazy).
//   sweep 2 (decompose only): re-reads the row (still in L2) in blocks of block2 entries: l_k into
//            an L1 buffer, then for K ≤ 8 one vectorised pass with an entry's K values in registers
//            (mixture_terms of the header), for larger K the same stages as loops over k.
// The kernel returns the number of logit elements it read: (K + has_p)·N·V per sweep.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "dtype.h"
#include "epikern/online_softmax.h"
#include "fast_math.h"

namespace py = pybind11;

namespace epikern::cpu {
namespace {

constexpr int64_t kBlock1 = 2048;       // sweep-1 block (two 8 KiB buffers)
constexpr int64_t kSweep2Floats = 8192;  // sweep-2 scratch budget (32 KiB): (2K + 5)·block floats
constexpr int kMaxFixedK = 8;            // sweep 2 keeps K ≤ 8 values per entry in registers
constexpr int64_t kSplitRows = 8;        // fewer rows: split the vocabulary across threads
constexpr int64_t kSplitSpan = 8 * kBlock1;  // vocabulary span of one work item when split

struct FastExp {
  EPIKERN_INLINE float operator()(float x) const { return fast_exp(x); }
};
// Sweep 2 takes logs of S = Σ_k e^{l_k − max_k l_k} ∈ [1, K] only (NaN rows stay NaN through
// q̄ = S·e^r and the jsd terms), so the log without special cases suffices.
struct FastLogGe1 {
  EPIKERN_INLINE float operator()(float x) const { return fast_log_normal(x); }
};

struct Args {
  const void* draft;
  int64_t K, N, V, draft_stride_k, draft_stride_n;
  const void* target;  // nullptr: no reference
  int64_t target_stride_n;
  const float* weights;
  float inv_temperature;
  bool decompose;
  float* stats;
  int64_t stats_stride_row, stats_stride_n;
  float* draft_lse;
  int64_t draft_lse_stride_k, draft_lse_stride_n;
  float* target_lse;
  int64_t target_lse_stride_n;
};

// dst[i] = src[i] · inv_t for i < len; returns the max of dst (NaN ignored, −inf if none finite).
template <class T>
EPIKERN_INLINE float load_scaled(const T* __restrict src, int64_t len, float inv_t, float* __restrict dst) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int64_t i = 0; i < len; ++i) {
    const float v = to_float(src[i]) * inv_t;
    dst[i] = v;
    mx = v > mx ? v : mx;
  }
  return mx;
}

// Adds a block x[0, len) whose max is `block_max` to `st` (its cross term against y when kCross):
// origin moved to the block max first, then one vectorised pass.
template <bool kCross>
inline void accumulate(SoftmaxState& st, float block_max, const float* __restrict x,
                       const float* __restrict y, int64_t len) {
  softmax_rescale(st, block_max, FastExp{});
  const float r = exp_origin(st.m);
  float s = 0.f, t = 0.f, c = 0.f;
#pragma omp simd reduction(+ : s, t, c)
  for (int64_t i = 0; i < len; ++i) {
    const SoftmaxTerms d = softmax_terms(x[i], kCross ? y[i] : x[i], r, FastExp{});
    s += d.e;
    t += d.t;
    if (kCross) c += d.c;
  }
  st.s += s;
  st.t += t;
  st.c += c;
}

// How far above the current origin a block may reach before it is redone from its own max. It
// keeps the sums far from overflow (kBlock1 · e^16 · 16 ≪ FLT_MAX) and bounds the cancellation in
// the rescale t' = a·(t + (m − m')·s) of the block's own terms to ≈ ε·16 relative.
constexpr float kMaxAhead = 16.f;

// Adds the block src[0, len) · inv_t to `st` in ONE pass over the logits: the exponentials are
// taken relative to the current origin (the max of the earlier blocks) while the block max is
// gathered, and the origin moves to the new max afterwards (the rescale of the header). Elements
// more than 87 below the origin flush to 0: they are below e^-87 of the row's largest term. The
// scaled values are kept in `x` (L1); a block that starts a row (no origin yet), or that rises
// more than kMaxAhead above the origin, is redone from `x` with its own max as the origin.
template <bool kCross, class T>
inline void accumulate_lazy(SoftmaxState& st, const T* __restrict src, int64_t len, float inv_t,
                            float* __restrict x, const float* __restrict y) {
  if (st.m == -INFINITY) {
    accumulate<kCross>(st, load_scaled(src, len, inv_t, x), x, y, len);
    return;
  }
  const float r = exp_origin(st.m);
  float s = 0.f, t = 0.f, c = 0.f, mx = -INFINITY;
#pragma omp simd reduction(+ : s, t, c) reduction(max : mx)
  for (int64_t i = 0; i < len; ++i) {
    const float v = to_float(src[i]) * inv_t;
    x[i] = v;
    mx = v > mx ? v : mx;
    const SoftmaxTerms d = softmax_terms(v, kCross ? y[i] : v, r, FastExp{});
    s += d.e;
    t += d.t;
    if (kCross) c += d.c;
  }
  if (mx > r + kMaxAhead) {  // rare: a jump of the max by more than kMaxAhead
    accumulate<kCross>(st, mx, x, y, len);
    return;
  }
  st.s += s;
  st.t += t;
  st.c += c;
  softmax_rescale(st, mx, FastExp{});
}

// Per-thread scratch, sized once per call.
struct Scratch {
  std::vector<float> x, y;           // sweep 1: one draft block; sweeps 1/2: the reference block
  std::vector<float> l, e;           // sweep 2: K × block2 log-weights l_k; e^{l_k − r} if K > 8
  std::vector<float> r, S, J, lq;    // sweep 2, K > kMaxFixedK: per entry origin, Σ e_k, Σ jsd, log q̄
  Scratch(int64_t K, int64_t block2)
      : x(kBlock1), y(std::max(kBlock1, block2)), l(K * block2), e(K > kMaxFixedK ? K * block2 : 0),
        r(K > kMaxFixedK ? block2 : 0), S(r.size()), J(r.size()), lq(r.size()) {}
};

// Sweep-2 sums over one block of entries.
struct MixtureSums {
  float jsd, entropy, kl;
};

// Sums of the sweep-2 terms over entries [0, len) of a block, from l_k in sc.l (row k at
// k·ld), the reference block in sc.y (kHasP) and the K log-weights.
using MixtureBlockFn = MixtureSums (*)(Scratch& sc, int64_t ld, int64_t K, const float* log_w,
                                       float lse_p, int64_t len);

// K ≤ kMaxFixedK: one vectorised pass, the K values of an entry in registers (mixture_terms).
template <int K, bool kHasP>
MixtureSums mixture_block_fixed(Scratch& sc, int64_t ld, int64_t, const float* log_w, float lse_p,
                                int64_t len) {
  float lw[K];
  for (int k = 0; k < K; ++k) lw[k] = log_w[k];
  const float* __restrict lb = sc.l.data();
  const float* __restrict yb = sc.y.data();
  float bj = 0.f, bh = 0.f, bk = 0.f;
#pragma omp simd reduction(+ : bj, bh, bk)
  for (int64_t i = 0; i < len; ++i) {
    const MixtureTerms mt = mixture_terms(lb + i, ld, lw, K, kHasP, kHasP ? yb[i] : 0.f, lse_p,
                                          FastExp{}, FastLogGe1{});
    bj += mt.jsd;
    bh += mt.entropy;
    bk += mt.kl;
  }
  return {bj, bh, bk};
}

// Any K: the stages of mixture_terms as loops over k outside and entries inside.
template <bool kHasP>
MixtureSums mixture_block_staged(Scratch& sc, int64_t ld, int64_t K, const float* log_w,
                                 float lse_p, int64_t len) {
  float* __restrict rb = sc.r.data();
  float* __restrict Sb = sc.S.data();
  float* __restrict Jb = sc.J.data();
  float* __restrict lqb = sc.lq.data();
  const float* __restrict yb = sc.y.data();
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    rb[i] = -INFINITY;
    Sb[i] = 0.f;
    Jb[i] = 0.f;
  }
  for (int64_t k = 0; k < K; ++k) {
    const float* __restrict lk = sc.l.data() + k * ld;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) rb[i] = lk[i] > rb[i] ? lk[i] : rb[i];
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) rb[i] = exp_origin(rb[i]);
  for (int64_t k = 0; k < K; ++k) {
    const float* __restrict lk = sc.l.data() + k * ld;
    float* __restrict ek = sc.e.data() + k * ld;
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) {
      ek[i] = fast_exp(lk[i] - rb[i]);
      Sb[i] += ek[i];
    }
  }
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) lqb[i] = rb[i] + fast_log_normal(Sb[i]);  // S ∈ [1, K]
  for (int64_t k = 0; k < K; ++k) {
    const float* __restrict lk = sc.l.data() + k * ld;
    const float* __restrict ek = sc.e.data() + k * ld;
    const float lw = log_w[k];
#pragma omp simd
    for (int64_t i = 0; i < len; ++i) Jb[i] += mixture_jsd_term(ek[i], lk[i], lw, lqb[i]);
  }
  float bj = 0.f, bh = 0.f, bk = 0.f;
#pragma omp simd reduction(+ : bj, bh, bk)
  for (int64_t i = 0; i < len; ++i) {
    const MixtureTerms mt = mixture_finish(rb[i], Sb[i], Jb[i], lqb[i], kHasP,
                                           kHasP ? yb[i] : 0.f, lse_p, FastExp{});
    bj += mt.jsd;
    bh += mt.entropy;
    bk += mt.kl;
  }
  return {bj, bh, bk};
}

template <bool kHasP, int... Ks>
MixtureBlockFn select_mixture_block(int64_t K, std::integer_sequence<int, Ks...>) {
  MixtureBlockFn fn = mixture_block_staged<kHasP>;
  ((K == Ks + 1 ? (fn = mixture_block_fixed<Ks + 1, kHasP>, 0) : 0), ...);
  return fn;
}

template <bool kHasP>
MixtureBlockFn select_mixture_block(int64_t K) {
  return select_mixture_block<kHasP>(K, std::make_integer_sequence<int, kMaxFixedK>{});
}

// Sweep-1 results of one row.
struct RowSweep1 {
  float lse_p, eu, draft_entropy, target_entropy;
};

// The kernel over spans [vb, ve) of a row's vocabulary, shared by the row-parallel path and the
// split-vocabulary path.
template <class TD, class TP, bool kHasP>
struct DraftUncertaintyKernel {
  const Args& a;
  int64_t block2;               // sweep-2 block
  std::vector<float> log_w;     // log w_k (−inf for w_k = 0)
  MixtureBlockFn mixture_block; // sweep-2 block sums for this K

  explicit DraftUncertaintyKernel(const Args& args)
      // (2K + 5) floats per entry in the sweep-2 scratch budget, a multiple of 64 entries
      : a(args), block2(std::max<int64_t>(64, (kSweep2Floats / (2 * args.K + 5)) / 64 * 64)),
        log_w(args.K), mixture_block(select_mixture_block<kHasP>(args.K)) {
    for (int64_t k = 0; k < a.K; ++k) log_w[k] = std::log(a.weights[k]);
  }

  const TD* draft_row(int64_t n, int64_t k) const {
    return static_cast<const TD*>(a.draft) + n * a.draft_stride_n + k * a.draft_stride_k;
  }
  const TP* target_row(int64_t n) const {
    return static_cast<const TP*>(a.target) + n * a.target_stride_n;
  }

  // Sweep 1 over [vb, ve) of row n into states[0, K) (drafts, with their cross terms) and
  // states[K] (the reference). Returns the number of logits read.
  int64_t sweep1(int64_t n, int64_t vb, int64_t ve, SoftmaxState* states, Scratch& sc) const {
    const float inv_t = a.inv_temperature;
    int64_t read = 0;
    for (int64_t v0 = vb; v0 < ve; v0 += kBlock1) {
      const int64_t len = std::min(kBlock1, ve - v0);
      if (kHasP) {
        accumulate_lazy<false>(states[a.K], target_row(n) + v0, len, inv_t, sc.y.data(), nullptr);
        read += len;
      }
      for (int64_t k = 0; k < a.K; ++k) {
        accumulate_lazy<kHasP>(states[k], draft_row(n, k) + v0, len, inv_t, sc.x.data(),
                               sc.y.data());
        read += len;
      }
    }
    return read;
  }

  // Row results of complete sweep-1 states and lse[K]; writes draft_lse and target_lse if `store`.
  RowSweep1 finish1(int64_t n, const SoftmaxState* states, float* lse, bool store) const {
    const float nan = NAN;
    RowSweep1 r{kHasP ? softmax_lse(states[a.K]) : nan, 0.f, 0.f,
                kHasP ? softmax_entropy(states[a.K]) : nan};
    for (int64_t k = 0; k < a.K; ++k) {
      lse[k] = softmax_lse(states[k]);
      if (store) a.draft_lse[k * a.draft_lse_stride_k + n * a.draft_lse_stride_n] = lse[k];
      r.draft_entropy += prob_times(a.weights[k], softmax_entropy(states[k]));
      if (kHasP) r.eu += prob_times(a.weights[k], softmax_kl(states[k], lse[k], r.lse_p));
    }
    if (!kHasP) r.eu = nan;
    if (store) a.target_lse[n * a.target_lse_stride_n] = r.lse_p;
    return r;
  }

  // Sweep 2 over [vb, ve) of row n (the mixture q̄, log q̄ = logsumexp_k l_k), added to `sums`.
  // Blocks go from the end of the span backwards: sweep 1 read the end last, so a row larger
  // than L2 is re-read mostly from L2.
  int64_t sweep2(int64_t n, int64_t vb, int64_t ve, const float* lse, float lse_p,
                 MixtureSums& sums, Scratch& sc) const {
    const float inv_t = a.inv_temperature;
    int64_t read = 0;
    for (int64_t end = ve; end > vb; end -= block2) {
      const int64_t v0 = std::max(vb, end - block2), len = end - v0;
      if (kHasP) {
        load_scaled(target_row(n) + v0, len, inv_t, sc.y.data());
        read += len;
      }
      for (int64_t k = 0; k < a.K; ++k) {
        const TD* __restrict src = draft_row(n, k) + v0;
        float* __restrict lk = sc.l.data() + k * block2;
        const float lw = log_w[k], lse_k = lse[k];
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) lk[i] = mixture_log_weight(lw, to_float(src[i]) * inv_t, lse_k);
        read += len;
      }
      const MixtureSums b = mixture_block(sc, block2, a.K, log_w.data(), lse_p, len);
      sums.jsd += b.jsd;
      sums.entropy += b.entropy;
      sums.kl += b.kl;
    }
    return read;
  }

  // stats[:, n]; `mix` is null without the mixture sweep.
  void write(int64_t n, const RowSweep1& r, const MixtureSums* mix) const {
    const float nan = NAN;
    float* out = a.stats + n * a.stats_stride_n;
    const int64_t rs = a.stats_stride_row;
    out[0 * rs] = r.eu;
    out[1 * rs] = mix ? mix->jsd : nan;
    out[2 * rs] = mix && kHasP ? mix->kl : nan;
    out[3 * rs] = r.draft_entropy;
    out[4 * rs] = mix ? mix->entropy : nan;
    out[5 * rs] = r.target_entropy;
  }

  // OpenMP over rows: each row by one thread, both sweeps back to back (sweep 2 from L2).
  int64_t run_rows(int threads) const {
    int64_t read = 0;
#pragma omp parallel num_threads(threads) reduction(+ : read)
    {
      Scratch sc(a.K, block2);
      std::vector<SoftmaxState> states(a.K + 1);
      std::vector<float> lse(a.K);
#pragma omp for schedule(static)
      for (int64_t n = 0; n < a.N; ++n) {
        std::fill(states.begin(), states.end(), softmax_state_empty());
        read += sweep1(n, 0, a.V, states.data(), sc);
        const RowSweep1 r = finish1(n, states.data(), lse.data(), true);
        MixtureSums mix{0.f, 0.f, 0.f};
        if (a.decompose) read += sweep2(n, 0, a.V, lse.data(), r.lse_p, mix, sc);
        write(n, r, a.decompose ? &mix : nullptr);
      }
    }
    return read;
  }

  // Few rows: OpenMP over (row, span of kSplitSpan entries) for each sweep; the partial states
  // and sums of a row are merged in span order, so the result does not depend on the threads.
  // One barrier (between the sweeps): every sweep-2 item merges its row's states itself.
  int64_t run_split(int threads) const {
    const int64_t spans = (a.V + kSplitSpan - 1) / kSplitSpan, items = a.N * spans, K1 = a.K + 1;
    std::vector<SoftmaxState> part(items * K1, softmax_state_empty());
    std::vector<MixtureSums> sums(items, MixtureSums{0.f, 0.f, 0.f});
    std::vector<RowSweep1> rows(a.N);
    int64_t read = 0;
#pragma omp parallel num_threads(threads) reduction(+ : read)
    {
      Scratch sc(a.K, block2);
      std::vector<SoftmaxState> row(K1);
      std::vector<float> lse(a.K);
#pragma omp for schedule(static)
      for (int64_t i = 0; i < items; ++i) {
        const int64_t n = i / spans, vb = (i % spans) * kSplitSpan;
        read += sweep1(n, vb, std::min(a.V, vb + kSplitSpan), &part[i * K1], sc);
      }
      // sweep 2 items (or, without it, one item per row): merge the row's span states in order
#pragma omp for schedule(static)
      for (int64_t i = 0; i < items; ++i) {
        const int64_t n = i / spans, j = i % spans;
        if (!a.decompose && j != 0) continue;
        std::copy(&part[n * spans * K1], &part[(n * spans + 1) * K1], row.begin());
        for (int64_t jj = 1; jj < spans; ++jj)
          for (int64_t k = 0; k < K1; ++k) softmax_merge(row[k], part[(n * spans + jj) * K1 + k], FastExp{});
        const RowSweep1 r = finish1(n, row.data(), lse.data(), j == 0);  // same in every item
        if (j == 0) rows[n] = r;
        if (a.decompose) {
          const int64_t vb = j * kSplitSpan;
          read += sweep2(n, vb, std::min(a.V, vb + kSplitSpan), lse.data(), r.lse_p, sums[i], sc);
        }
      }
    }
    for (int64_t n = 0; n < a.N; ++n) {
      MixtureSums mix = sums[n * spans];
      for (int64_t j = 1; j < spans; ++j) {
        mix.jsd += sums[n * spans + j].jsd;
        mix.entropy += sums[n * spans + j].entropy;
        mix.kl += sums[n * spans + j].kl;
      }
      write(n, rows[n], a.decompose ? &mix : nullptr);
    }
    return read;
  }

  // The path depends on the shape only (never on the thread count), so results are reproducible.
  int64_t run(int threads) const {
    return a.N < kSplitRows && a.V >= 2 * kSplitSpan ? run_split(threads) : run_rows(threads);
  }
};

int64_t draft_uncertainty(uintptr_t draft, int draft_dtype, int64_t K, int64_t N, int64_t V,
                          int64_t draft_stride_k, int64_t draft_stride_n, uintptr_t target,
                          int target_dtype, int64_t target_stride_n, uintptr_t weights,
                          double temperature, bool decompose, uintptr_t stats,
                          int64_t stats_stride_row, int64_t stats_stride_n, uintptr_t draft_lse,
                          int64_t draft_lse_stride_k, int64_t draft_lse_stride_n,
                          uintptr_t target_lse, int64_t target_lse_stride_n, int num_threads) {
  if (K < 1 || N < 0 || V < 1) throw std::invalid_argument("epikern._cpu.draft_uncertainty: bad K/N/V");
  const Args a{reinterpret_cast<const void*>(draft), K, N, V, draft_stride_k, draft_stride_n,
               reinterpret_cast<const void*>(target), target_stride_n,
               reinterpret_cast<const float*>(weights), static_cast<float>(1.0 / temperature),
               decompose, reinterpret_cast<float*>(stats), stats_stride_row, stats_stride_n,
               reinterpret_cast<float*>(draft_lse), draft_lse_stride_k, draft_lse_stride_n,
               reinterpret_cast<float*>(target_lse), target_lse_stride_n};
  const int threads = std::max(1, num_threads);
  return dispatch_dtype(draft_dtype, [&](auto td) -> int64_t {
    using TD = decltype(td);
    if (target == 0) return DraftUncertaintyKernel<TD, TD, false>(a).run(threads);
    return dispatch_dtype(target_dtype, [&](auto tp) -> int64_t {
      return DraftUncertaintyKernel<TD, decltype(tp), true>(a).run(threads);
    });
  });
}

}  // namespace

void bind_draft_uncertainty(py::module_& m) {
  m.def("draft_uncertainty", &draft_uncertainty, py::call_guard<py::gil_scoped_release>(),
        py::arg("draft"), py::arg("draft_dtype"), py::arg("K"), py::arg("N"), py::arg("V"),
        py::arg("draft_stride_k"), py::arg("draft_stride_n"), py::arg("target"),
        py::arg("target_dtype"), py::arg("target_stride_n"), py::arg("weights"),
        py::arg("temperature"), py::arg("decompose"), py::arg("stats"),
        py::arg("stats_stride_row"), py::arg("stats_stride_n"), py::arg("draft_lse"),
        py::arg("draft_lse_stride_k"), py::arg("draft_lse_stride_n"), py::arg("target_lse"),
        py::arg("target_lse_stride_n"), py::arg("num_threads"),
        "Fused draft_uncertainty over raw pointers (element strides; dtype codes 0 = float32, "
        "1 = float16, 2 = bfloat16; target = 0 for none). Writes stats[6, N], draft_lse[K, N] and "
        "target_lse[N] (float32) and returns the number of logit elements read: "
        "(K + has_target)·N·V per sweep, one sweep more when decompose.");
}

}  // namespace epikern::cpu
