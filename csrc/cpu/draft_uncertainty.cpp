// Fused CPU kernel of epikern::draft_uncertainty (math: epikern/online_softmax.h; vector code:
// simd.h).
//
// Inputs: K draft rows and (optionally) one reference row per token, logits of dtype fp32, fp16
// or bf16 read in place with unit stride over V and arbitrary (int64) strides over K and N.
// Outputs, float32: stats[6, N] (eu, jsd, kl, draft_entropy, mixture_entropy, target_entropy),
// draft_lse[K, N], target_lse[N].
//
// OpenMP over rows (each row computed by one thread in a fixed order, so the results do not
// depend on the thread count); with fewer than kSplitRows rows and V ≥ 2·kSplitSpan over
// (row, vocabulary span) items instead, partial states merged in span order. Per row/span:
//
//   sweep 1: blocks of kBlock entries, ONE vectorised pass per distribution and block: 2^{x − r}
//            (base 2, see kLn2) with the origin r = the max of the earlier blocks (one
//            exponential per logit), accumulating s, t, the cross term c against the reference
//            and the block max; the origin then moves to the new max (a block that starts a row,
//            or rises more than kMaxAhead above the origin, is redone from its own max). With the
//            split, when the row's (or the few rows') K·V exponentials fit the cache budget
//            (`keep_bytes`), the drafts' 2^{x − r} are KEPT in a per-thread buffer with their
//            block origins r.
//   sweep 2 (decompose only), per entry v, drafts with w_k > 0:
//            w_k q_kv = kept e_kv · w_k 2^{r_kb − lse_k}   (one multiply; no exponential)
//                       or 2^{log2 w_k + x_kv − lse_k}     (one exponential, when not kept)
//            q̄_v = Σ_k w_k q_kv,  log2 q̄_v (the one logarithm per entry),
//            jsd += Σ_k w_k q_kv (log q_kv − log q̄_v),  H(q̄) −= q̄_v log q̄_v,
//            KL(q̄ ‖ p) += q̄_v (log q̄_v − y_v + lse_p).
//            So the split costs K + 1 exponentials and one logarithm per entry in all (the floor
//            of an exact method) when kept, 2K + 1 and one otherwise (the old kernel: 2K + 2).
//            q̄ is summed in linear space: the w_k q_k are normalised probabilities (≤ 1, no
//            overflow; the sum has no cancellation), and an entry whose q̄ underflows (< 1e-38)
//            changes no output by more than 1e-36 — the log-sum-exp form of the header
//            (mixture_terms, used by the CUDA kernel) would cost one more exponential per entry.
//            Blocks go from the end of the row backwards: sweep 1 read the end last, so the
//            re-read comes mostly from cache.
//
// draft_uncertainty_rows (the engine-layout op) is the same kernel with row maps: output row n reads
// draft row draft_index[n] and target row target_index[n] (int32 or int64, read in place) at its
// own temperature; a row whose map entry is negative (padding) or out of range, or whose inverse
// temperature is not finite and > 0, is written as NaN without reading its logits.
//
// The kernel returns its work: logit elements read ((K + has_p)·N·V in sweep 1, the same minus
// the drafts with w_k = 0 in sweep 2) and the exponentials and logarithms it evaluated in the
// vector loops (the per-block scalar rescales are not counted).
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <vector>

#include "dtype.h"
#include "epikern/online_softmax.h"
#include "isa.h"
#include "simd.h"

namespace py = pybind11;

EPIKERN_CPU_NAMESPACE_BEGIN
namespace {

namespace S = simd;
using S::vf;
constexpr int64_t W = S::kWidth;

constexpr int64_t kBlock = 2048;             // sweep-1 block: one origin per draft and block
constexpr int64_t kSplitRows = 8;            // fewer rows: split the vocabulary across threads
constexpr int64_t kSplitSpan = 8 * kBlock;   // vocabulary span of one work item when split
// Default budget of kept exponentials (4 bytes per draft with w_k > 0 and entry) per row, or for
// all rows of the split path. Measured on a 2-core AMD EPYC (Zen 3, 512 KiB L2), one thread, bf16
// logits over V = 128256: keeping beats recomputing at K = 8 (4 MB: 3.75 vs 4.55 cycles per
// logit) and K = 16 (8 MB: 4.08 vs 4.96), so up to 8 MiB per thread is kept.
constexpr int64_t kKeepBytes = int64_t{8} << 20;
// Not kept: sweep 2 computes the w_k q_k of a stretch of entries first, ≤ this many floats.
constexpr int64_t kStretchFloats = 4096;
// The sweeps work in base 2 (bits): x = logit · log2(e)/T, exponentials 2^{x − r} (simd::exp2),
// log2 q̄; the states (m, s, t, c) of the header are then in bits and finish1 converts them to
// nats (m, t, c times ln 2).
constexpr float kLn2 = 0.693147180559945309f;
// How far (bits) above the current origin a block may reach before it is redone from its own
// max. It keeps the sums far from overflow (kBlock · 2^24 · 24 ≪ FLT_MAX), keeps 2^{x − r} inside
// the range of simd::exp2, and bounds the cancellation in the rescale t' = a·(t + (m − m')·s) of
// the block's own terms to ≈ ε·24 relative.
constexpr float kMaxAhead = 24.f;
// x − r (and log2 q) are clamped here (NaN kept): 2^{−150} = 0 in fp32, so e·(x − r) = 0 for
// x = −inf without a 0·(−inf), and nothing with a nonzero probability is clamped.
constexpr float kFloor = -150.f;

int64_t round_up(int64_t n) { return (n + W - 1) / W * W; }
int64_t blocks_of(int64_t span) { return (span + kBlock - 1) / kBlock; }

struct LibmExp2 {  // the header's rescale and merge, in bits
  float operator()(float x) const { return std::exp2(x); }
};

// Work of one call (or thread).
struct Work {
  int64_t read = 0, exps = 0, logs = 0;
  Work& operator+=(const Work& o) {
    read += o.read;
    exps += o.exps;
    logs += o.logs;
    return *this;
  }
};
#pragma omp declare reduction(+ : Work : omp_out += omp_in)

// An int32/int64 map of output rows to input rows among `rows` (nullptr: the identity).
struct RowMap {
  const void* index = nullptr;
  bool is64 = false;
  int64_t rows = 0;
  int64_t operator()(int64_t n) const {
    if (index == nullptr) return n;
    return is64 ? static_cast<const int64_t*>(index)[n] : static_cast<const int32_t*>(index)[n];
  }
  bool valid(int64_t n) const { return index == nullptr || ((*this)(n) >= 0 && (*this)(n) < rows); }
};

struct Args {
  const void* draft;
  int64_t K, N, V, draft_stride_k, draft_stride_n;
  const void* target;  // nullptr: no reference
  int64_t target_stride_n;
  const float* weights;
  float bits_per_logit;  // log2(e)/T
  bool decompose;
  float* stats;
  int64_t stats_stride_row, stats_stride_n;
  float* draft_lse;
  int64_t draft_lse_stride_k, draft_lse_stride_n;
  float* target_lse;
  int64_t target_lse_stride_n;
  int64_t keep_bytes;
  // draft_uncertainty_rows only (nullptr: row n is row n, at bits_per_logit).
  RowMap draft_index{}, target_index{};  // output row → draft row (of draft_rows), target row
  const float* inv_temperature = nullptr;  // per output row 1/T, times log2(e) here
  int64_t inv_temperature_stride = 0;
};

// ---- sweep 1 --------------------------------------------------------------------------------------

// Sums of one vectorised pass over a block, relative to the origin r (x = logit · log2(e)/T).
struct PassSums {
  float s, t, c;  // Σ e, Σ e·(x − r), Σ e·(x − y) with e = 2^{x − r}
  float max;      // block max of x (NaN ignored; −inf if none finite)
  float ymin;     // kStoreY: min of the stored x (−inf present: the drafts guard their cross term)
};

// One pass over src[0, len) relative to r. kCross: cross term against the scaled reference y
// (kGuard: y holds −inf, so e = 0 must give 0, not 0·inf; a finite x against y = −inf gives +inf,
// as the header's softmax_terms). kKeep: 2^{x − r} to out. kStoreY (the reference itself): x to
// out, and 0 in the padding lanes after len. inv_t: log2(e)/T.
template <class T, bool kCross, bool kGuard, bool kKeep, bool kStoreY>
PassSums pass1(const T* __restrict src, int64_t len, float inv_t, float r, const float* __restrict y,
               float* __restrict out) {
  const vf vinv = S::splat(inv_t), vr = S::splat(r), vnr = S::splat(-r), lo = S::splat(kFloor);
  vf s{}, t{}, c{}, mx = S::splat(-INFINITY), mn = S::splat(INFINITY);
  const auto step = [&](vf v, int64_t i) {
    mx = S::max_skip_nan(mx, v);
    const vf d = S::max_keep_nan(lo, v * vinv + vnr);
    const vf e = S::exp2(d);
    s += e;
    t += e * d;
    if constexpr (kCross) {
      const vf yv = S::load(y + i), u = e * ((d + vr) - yv);
      // kGuard: 0 where e = 0 (no 0·inf), but +inf for a finite x against y = −inf, also where
      // d was clamped (the unclamped x − y; −inf − (−inf) is NaN, not +inf)
      c += kGuard ? S::where_posinf(v * vinv - yv, S::where_nonzero(e, u)) : u;
    }
    if constexpr (kKeep) S::store(out + i, e);
    if constexpr (kStoreY) {
      const vf x = v * vinv;
      mn = S::min_skip_nan(mn, x);
      S::store(out + i, x);
    }
  };
  int64_t i = 0;
  for (; i + W <= len; i += W) step(S::load(src + i), i);
  float ymin = S::hmin(mn);
  if (i < len) {
    const vf tail = S::load_partial(src + i, len - i, -INFINITY);
    if constexpr (kStoreY) mn = S::splat(INFINITY);
    step(tail, i);
    if constexpr (kStoreY) {
      for (int64_t j = i; j < len; ++j) ymin = out[j] < ymin ? out[j] : ymin;
      for (int64_t j = len; j < i + W; ++j) out[j] = 0.f;  // finite y: no 0·inf in the drafts
    }
  }
  return {S::hsum(s), S::hsum(t), S::hsum(c), S::hmax(mx) * inv_t, ymin};
}

template <class T>
float block_max(const T* __restrict src, int64_t len) {
  vf mx = S::splat(-INFINITY);
  int64_t i = 0;
  for (; i + W <= len; i += W) mx = S::max_skip_nan(mx, S::load(src + i));
  if (i < len) mx = S::max_skip_nan(mx, S::load_partial(src + i, len - i, -INFINITY));
  return S::hmax(mx);
}

// Adds the block src[0, len) to `st` (lazy origin, see the file comment); returns the origin r of
// the pass that counted (the exponent origin of the kept e values) and adds its exponentials to
// `exps`. `ymin` receives the reference's block min when kStoreY.
template <class T, bool kCross, bool kGuard, bool kKeep, bool kStoreY>
float accumulate(SoftmaxState& st, const T* src, int64_t len, float inv_t, const float* y, float* out,
                 int64_t& exps, float* ymin) {
  float r;
  PassSums b;
  const bool fresh = st.m == -INFINITY;  // no origin yet: take the block's own max
  if (fresh) {
    r = exp_origin(block_max(src, len) * inv_t);
    b = pass1<T, kCross, kGuard, kKeep, kStoreY>(src, len, inv_t, r, y, out);
    exps += len;
  } else {
    r = st.m;
    b = pass1<T, kCross, kGuard, kKeep, kStoreY>(src, len, inv_t, r, y, out);
    exps += len;
    if (b.max > r + kMaxAhead) {  // rare: a jump of the max
      r = b.max;
      b = pass1<T, kCross, kGuard, kKeep, kStoreY>(src, len, inv_t, r, y, out);
      exps += len;
    }
  }
  if (kStoreY) *ymin = b.ymin;
  if (!fresh && r == st.m) {  // the common case: add at the shared origin, then move it
    st.s += b.s;
    st.t += b.t;
    st.c += b.c;
    if (b.max > st.m) softmax_rescale(st, b.max, LibmExp2{});
  } else {  // st is empty (or all −inf/NaN so far), or the block was redone at r = its max
    if (b.max > st.m) softmax_rescale(st, b.max, LibmExp2{});
    st.s += b.s;
    st.t += b.t;
    st.c += b.c;
  }
  return r;
}

// ---- sweep 2 --------------------------------------------------------------------------------------

struct MixtureSums {
  float jsd, entropy, kl;
};

// What sweep 2 needs of one draft with w_k > 0 over one stretch of entries.
template <class TD>
struct DraftBlock {
  const TD* x;     // logits
  const float* e;  // e_k with w_k q_k = e_k·f: the kept 2^{x − r}, or w_k q_k itself (f = 1)
  float f;         // w_k 2^{r − lse_k} (kept), or 1
  float neg_lse;   // −lse_k
};

// Two accumulators per loop (the loops are short: one FMA chain would bound them by its latency).
struct Acc2 {
  vf a{}, b{};
  float sum() const { return S::hsum(a + b); }
};

// Sweep-2 sums over entries [0, len) of one stretch, in L1-sized passes that keep few values
// live (16 vector registers on AVX2 do not hold K drafts' constants and the accumulators; a loop
// fusing A1 and A2 for K ≤ 8 measured no faster):
//   A1: q̄ = Σ_k e_k f_k into qbar; A2: log q̄ into lq, with H(q̄) and KL(q̄ ‖ p);
//   B, per draft: Σ e_k (log q_k − log q̄), times f_k (f is constant over the stretch).
// qbar and lq hold round_up(len) floats. Everything in bits.
template <bool kHasP, class TD, class TP>
MixtureSums mixture_block(const DraftBlock<TD>* dk, int64_t kd, const TP* __restrict yp, float inv_t,
                          float lse_p, int64_t len, float* __restrict qbar, float* __restrict lq) {
  const int64_t full = len / W * W, n = len - full;  // n: entries of the last, partial vector
  const vf vinv = S::splat(inv_t), lo = S::splat(kFloor);
  for (int64_t k = 0; k < kd; ++k) {  // A1
    const float* __restrict e = dk[k].e;
    const vf f = S::splat(dk[k].f);
    for (int64_t i = 0; i < full; i += W) S::store(qbar + i, (k ? S::load(qbar + i) : vf{}) + S::load(e + i) * f);
    if (n) S::store(qbar + full, (k ? S::load(qbar + full) : vf{}) + S::load_partial(e + full, n, 0.f) * f);
  }
  Acc2 H, KL;  // A2
  const vf vlse_p = S::splat(lse_p);
  const auto entropy_kl = [&](vf q, vf y, vf& h, vf& kl, float* out) {
    const vf l = S::log2(q);  // finite for q̄ = 0, whose terms are 0 below
    S::store(out, l);
    h += q * l;
    if (kHasP) kl += S::where_nonzero(q, q * ((l + vlse_p) - y * vinv));
  };
  int64_t i = 0;
  for (; i + 2 * W <= full; i += 2 * W) {
    entropy_kl(S::load(qbar + i), kHasP ? S::load(yp + i) : vf{}, H.a, KL.a, lq + i);
    entropy_kl(S::load(qbar + i + W), kHasP ? S::load(yp + i + W) : vf{}, H.b, KL.b, lq + i + W);
  }
  if (i < full) entropy_kl(S::load(qbar + i), kHasP ? S::load(yp + i) : vf{}, H.a, KL.a, lq + i);
  if (n) entropy_kl(S::load(qbar + full), kHasP ? S::load_partial(yp + full, n, 0.f) : vf{}, H.b, KL.b, lq + full);
  float jsd = 0.f;
  for (int64_t k = 0; k < kd; ++k) {  // B
    const TD* __restrict x = dk[k].x;
    const float* __restrict e = dk[k].e;
    const vf neg_lse = S::splat(dk[k].neg_lse);
    // e·(log q_k − log q̄), log q_k clamped at kFloor (where e = 0: no 0·(−inf))
    const auto term = [&](vf xv, int64_t j, vf ev) { return ev * (S::max_keep_nan(lo, xv * vinv + neg_lse) - S::load(lq + j)); };
    Acc2 J;
    int64_t j = 0;
    for (; j + 2 * W <= full; j += 2 * W) {
      J.a += term(S::load(x + j), j, S::load(e + j));
      J.b += term(S::load(x + j + W), j + W, S::load(e + j + W));
    }
    if (j < full) J.a += term(S::load(x + j), j, S::load(e + j));
    if (n) J.b += term(S::load_partial(x + full, n, -INFINITY), full, S::load_partial(e + full, n, 0.f));
    jsd += prob_times(dk[k].f, J.sum());
  }
  return {jsd, -H.sum(), KL.sum()};
}

// The not-kept case: w_k q_k = 2^{log2 w_k + log2 q_k} of one stretch into e (K rows of ld floats).
template <class TD>
void mixture_weights(DraftBlock<TD>* dk, int64_t kd, const float* log_w, float inv_t, int64_t len,
                     float* __restrict e, int64_t ld) {
  const vf vinv = S::splat(inv_t), lo = S::splat(kFloor);
  for (int64_t k = 0; k < kd; ++k) {
    const TD* __restrict x = dk[k].x;
    float* __restrict ek = e + k * ld;
    const vf neg_lse = S::splat(dk[k].neg_lse), lw = S::splat(log_w[k]);
    int64_t i = 0;
    for (; i + W <= len; i += W) S::store(ek + i, S::exp2(S::max_keep_nan(lo, S::load(x + i) * vinv + neg_lse) + lw));
    if (i < len)
      S::store(ek + i, S::exp2(S::max_keep_nan(lo, S::load_partial(x + i, len - i, -INFINITY) * vinv + neg_lse) + lw));
    dk[k].e = ek;
    dk[k].f = 1.f;
  }
}

// ---- the kernel -----------------------------------------------------------------------------------

// Sweep-1 results of one row.
struct RowSweep1 {
  float lse2_p;  // the reference's log-normaliser in bits (for sweep 2)
  float eu, draft_entropy, target_entropy;
};

// Per-thread buffers of one range (row or span): the reference block, the kept exponentials
// (K × ld floats) and their block origins (K × blocks).
struct RangeBuffers {
  float* y;
  float* e;        // nullptr: not kept
  float* origins;  // K × blocks
  int64_t ld, blocks;
};

// The kernel over ranges [vb, ve) of a row's vocabulary, shared by the row-parallel path and the
// split-vocabulary path.
template <class TD, class TP, bool kHasP>
struct DraftUncertaintyKernel {
  const Args& a;
  std::vector<float> log_w;   // log2 w_k (−inf for w_k = 0)
  std::vector<int64_t> active;  // drafts with w_k > 0: the only ones in the mixture
  bool keep;                  // sweep 1 keeps the active drafts' exponentials for sweep 2

  explicit DraftUncertaintyKernel(const Args& args) : a(args), log_w(args.K) {
    for (int64_t k = 0; k < a.K; ++k) {
      log_w[k] = std::log2(a.weights[k]);
      if (a.weights[k] > 0.f || std::isnan(a.weights[k])) active.push_back(k);
    }
    const int64_t rows = split() ? a.N : 1;  // the split path keeps all its rows at once
    keep = a.decompose && rows * static_cast<int64_t>(active.size()) * a.V * 4 <= a.keep_bytes;
  }

  bool split() const { return a.N < kSplitRows && a.V >= 2 * kSplitSpan; }

  // Per-thread storage, uninitialised (every float is written before it is read): the reference
  // block; the kept exponentials (K × ld) and block origins (K × blocks) of `ranges` ranges of
  // `span` entries; sweep 2's draft table, q̄ and log q̄ of a block and, when not kept, the
  // w_k q_k of a stretch (active drafts × stretch, L1-sized).
  struct ThreadBuffers {
    int64_t kept, blocks, ld, stretch;
    std::unique_ptr<float[]> y, e, origins, qbar, lq, w;
    std::vector<DraftBlock<TD>> dk;
    std::vector<float> active_log_w;
    ThreadBuffers(const DraftUncertaintyKernel& kr, int64_t span, int64_t ranges)
        : kept(kr.keep ? kr.a.K * round_up(span) : 0), blocks(blocks_of(span)), ld(round_up(span)),
          stretch(std::clamp<int64_t>(kStretchFloats / static_cast<int64_t>(kr.active.size()) / W * W, W, kBlock)),
          y(new float[kBlock + W]), e(kr.keep ? new float[ranges * kept] : nullptr),
          origins(new float[ranges * kr.a.K * blocks]), qbar(new float[kBlock + W]),
          lq(new float[kBlock + W]),
          w(kr.keep || !kr.a.decompose ? nullptr : new float[kr.active.size() * stretch]),
          dk(kr.active.size()) {
      for (int64_t k : kr.active) active_log_w.push_back(kr.log_w[k]);
    }
    RangeBuffers range(int64_t slot, int64_t K) const {
      return {y.get(), e ? e.get() + slot * kept : nullptr, origins.get() + slot * K * blocks, ld, blocks};
    }
  };

  const TD* draft_row(int64_t n, int64_t k) const {
    return static_cast<const TD*>(a.draft) + a.draft_index(n) * a.draft_stride_n + k * a.draft_stride_k;
  }
  const TP* target_row(int64_t n) const {
    return static_cast<const TP*>(a.target) + a.target_index(n) * a.target_stride_n;
  }
  // log2(e)/T of output row n.
  float bits(int64_t n) const {
    return a.inv_temperature ? 1.4426950408889634f * a.inv_temperature[n * a.inv_temperature_stride]
                             : a.bits_per_logit;
  }
  // Padding, an out-of-range map entry or a temperature that is not finite and > 0.
  bool skipped(int64_t n) const {
    const float b = bits(n);
    return !a.draft_index.valid(n) || (kHasP && !a.target_index.valid(n)) || !(b > 0.f && b < INFINITY);
  }

  template <bool kCross, bool kGuard, bool kKeep, class T>
  static float accumulate_draft(SoftmaxState& st, const T* src, int64_t len, float inv_t,
                                const float* y, float* out, int64_t& exps) {
    return accumulate<T, kCross, kGuard, kKeep, false>(st, src, len, inv_t, y, out, exps, nullptr);
  }

  // Sweep 1 over [vb, ve) of row n into states[0, K) (drafts, with their cross terms) and
  // states[K] (the reference); kept exponentials and origins into `buf`.
  Work sweep1(int64_t n, int64_t vb, int64_t ve, SoftmaxState* states, const RangeBuffers& buf) const {
    const float inv_t = bits(n);
    Work w;
    for (int64_t v0 = vb, b = 0; v0 < ve; v0 += kBlock, ++b) {
      const int64_t len = std::min(kBlock, ve - v0);
      bool guard = false;
      if (kHasP) {
        float ymin;
        accumulate<TP, false, false, false, true>(states[a.K], target_row(n) + v0, len, inv_t,
                                                  nullptr, buf.y, w.exps, &ymin);
        guard = ymin == -INFINITY;
        w.read += len;
      }
      for (int64_t k = 0; k < a.K; ++k) {
        const TD* src = draft_row(n, k) + v0;
        float* out = buf.e && a.weights[k] != 0.f ? buf.e + k * buf.ld + (v0 - vb) : nullptr;
        SoftmaxState& st = states[k];
        float r;
        if (!kHasP)
          r = out ? accumulate_draft<false, false, true>(st, src, len, inv_t, nullptr, out, w.exps)
                  : accumulate_draft<false, false, false>(st, src, len, inv_t, nullptr, out, w.exps);
        else if (guard)
          r = out ? accumulate_draft<true, true, true>(st, src, len, inv_t, buf.y, out, w.exps)
                  : accumulate_draft<true, true, false>(st, src, len, inv_t, buf.y, out, w.exps);
        else
          r = out ? accumulate_draft<true, false, true>(st, src, len, inv_t, buf.y, out, w.exps)
                  : accumulate_draft<true, false, false>(st, src, len, inv_t, buf.y, out, w.exps);
        buf.origins[k * buf.blocks + b] = r;
        w.read += len;
      }
    }
    return w;
  }

  // Row results (nats) of complete sweep-1 states (bits); lse2[K] receives the drafts'
  // log-normalisers in bits for sweep 2. Writes draft_lse and target_lse if `store`.
  RowSweep1 finish1(int64_t n, const SoftmaxState* states, float* lse2, bool store) const {
    const auto nats = [](SoftmaxState st) {
      st.m *= kLn2;
      st.t *= kLn2;
      st.c *= kLn2;
      return st;
    };
    const auto lse_bits = [](const SoftmaxState& st) { return exp_origin(st.m) + std::log2(st.s); };
    const float nan = NAN;
    RowSweep1 r{nan, kHasP ? 0.f : nan, 0.f, nan};
    float lse_p = nan;
    if (kHasP) {
      r.lse2_p = lse_bits(states[a.K]);
      lse_p = r.lse2_p * kLn2;
      r.target_entropy = softmax_entropy(nats(states[a.K]));
    }
    for (int64_t k = 0; k < a.K; ++k) {
      lse2[k] = lse_bits(states[k]);
      const float lse = lse2[k] * kLn2;
      const SoftmaxState st = nats(states[k]);
      if (store) a.draft_lse[k * a.draft_lse_stride_k + n * a.draft_lse_stride_n] = lse;
      r.draft_entropy += prob_times(a.weights[k], softmax_entropy(st));
      if (kHasP) r.eu += prob_times(a.weights[k], softmax_kl(st, lse, lse_p));
    }
    if (store) a.target_lse[n * a.target_lse_stride_n] = lse_p;
    return r;
  }

  // Sweep 2 over [vb, ve) of row n (mixture of the active drafts), added to `sums`; blocks
  // backwards (sweep 1 read the end last). Not kept: stretches of `stretch` entries whose
  // w_k q_k are computed into tb.w first.
  // lse2, lse2_p: log-normalisers in bits; the sums are in bits too (write converts them).
  Work sweep2(int64_t n, int64_t vb, int64_t ve, const float* lse2, float lse2_p, MixtureSums& sums,
              const RangeBuffers& buf, ThreadBuffers& tb) const {
    const int64_t kd = static_cast<int64_t>(active.size());
    const bool kept = buf.e != nullptr;
    const int64_t stretch = kept ? kBlock : tb.stretch;
    DraftBlock<TD>* dk = tb.dk.data();
    Work w;
    for (int64_t b = blocks_of(ve - vb) - 1; b >= 0; --b) {
      const int64_t b0 = vb + b * kBlock, b1 = std::min(ve, b0 + kBlock);
      for (int64_t v0 = b0; v0 < b1; v0 += stretch) {
        const int64_t len = std::min(stretch, b1 - v0);
        for (int64_t j = 0; j < kd; ++j) {
          const int64_t k = active[j];
          dk[j].x = draft_row(n, k) + v0;
          dk[j].neg_lse = -lse2[k];
          if (kept) {
            dk[j].e = buf.e + k * buf.ld + (v0 - vb);
            dk[j].f = a.weights[k] * std::exp2(buf.origins[k * buf.blocks + b] - lse2[k]);
          }
        }
        if (!kept) {
          mixture_weights(dk, kd, tb.active_log_w.data(), bits(n), len, tb.w.get(), stretch);
          w.exps += len * kd;
        }
        const MixtureSums s = mixture_block<kHasP>(dk, kd, kHasP ? target_row(n) + v0 : nullptr,
                                                   bits(n), lse2_p, len, tb.qbar.get(), tb.lq.get());
        sums.jsd += s.jsd;
        sums.entropy += s.entropy;
        sums.kl += s.kl;
        w.read += len * (kd + kHasP);  // drafts with w_k = 0 are not read
        w.logs += len;
      }
    }
    return w;
  }

  // Every output of a skipped row n is NaN.
  void write_skipped(int64_t n) const {
    for (int64_t i = 0; i < 6; ++i) a.stats[n * a.stats_stride_n + i * a.stats_stride_row] = NAN;
    for (int64_t k = 0; k < a.K; ++k) a.draft_lse[k * a.draft_lse_stride_k + n * a.draft_lse_stride_n] = NAN;
    a.target_lse[n * a.target_lse_stride_n] = NAN;
  }

  // stats[:, n]; `mix` (sweep 2's sums, in bits) is null without the mixture sweep.
  void write(int64_t n, const RowSweep1& r, const MixtureSums* mix) const {
    const float nan = NAN;
    float* out = a.stats + n * a.stats_stride_n;
    const int64_t rs = a.stats_stride_row;
    out[0 * rs] = r.eu;
    out[1 * rs] = mix ? mix->jsd * kLn2 : nan;
    // KL(q̄ ‖ p) = +inf exactly when some draft with w_k > 0 has KL(q_k ‖ p) = +inf, i.e. when eu
    // is: sweep 2 counts an entry whose q̄ underflowed as 0, yet q̄ > 0 there.
    out[2 * rs] = mix && kHasP ? (r.eu == INFINITY ? r.eu : mix->kl * kLn2) : nan;
    out[3 * rs] = r.draft_entropy;
    out[4 * rs] = mix ? mix->entropy * kLn2 : nan;
    out[5 * rs] = r.target_entropy;
  }

  // OpenMP over rows: each row by one thread, both sweeps back to back (sweep 2 from cache).
  Work run_rows(int threads) const {
    Work work;
#pragma omp parallel num_threads(threads) reduction(+ : work)
    {
      ThreadBuffers tb(*this, a.V, 1);
      const RangeBuffers buf = tb.range(0, a.K);
      std::vector<SoftmaxState> states(a.K + 1);
      std::vector<float> lse(a.K);
#pragma omp for schedule(static)
      for (int64_t n = 0; n < a.N; ++n) {
        if (skipped(n)) {
          write_skipped(n);
          continue;
        }
        std::fill(states.begin(), states.end(), softmax_state_empty());
        work += sweep1(n, 0, a.V, states.data(), buf);
        const RowSweep1 r = finish1(n, states.data(), lse.data(), true);
        MixtureSums mix{0.f, 0.f, 0.f};
        if (a.decompose)
          work += sweep2(n, 0, a.V, lse.data(), r.lse2_p, mix, buf, tb);
        write(n, r, a.decompose ? &mix : nullptr);
      }
    }
    return work;
  }

  // Few rows: OpenMP over (row, span of kSplitSpan entries) for each sweep; the partial states
  // and sums of a row are merged in span order, so the result does not depend on the threads.
  // Each thread takes the same contiguous range of items in both sweeps (so its kept
  // exponentials are its own); one barrier between the sweeps, after which every sweep-2 item
  // merges its row's states itself.
  Work run_split(int threads) const {
    const int64_t spans = (a.V + kSplitSpan - 1) / kSplitSpan, items = a.N * spans, K1 = a.K + 1;
    std::vector<SoftmaxState> part(items * K1, softmax_state_empty());
    std::vector<MixtureSums> sums(items, MixtureSums{0.f, 0.f, 0.f});
    std::vector<RowSweep1> rows(a.N);
    Work work;
#pragma omp parallel num_threads(threads) reduction(+ : work)
    {
      const int64_t tid = omp_get_thread_num(), nth = omp_get_num_threads();
      const int64_t lo = items * tid / nth, hi = items * (tid + 1) / nth;
      ThreadBuffers tb(*this, kSplitSpan, std::max<int64_t>(hi - lo, 1));
      std::vector<SoftmaxState> row(K1);
      std::vector<float> lse(a.K);
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t n = i / spans, vb = (i % spans) * kSplitSpan;
        if (skipped(n)) continue;
        work += sweep1(n, vb, std::min(a.V, vb + kSplitSpan), &part[i * K1], tb.range(i - lo, a.K));
      }
#pragma omp barrier
      for (int64_t i = lo; i < hi; ++i) {
        const int64_t n = i / spans, j = i % spans;
        if ((!a.decompose && j != 0) || skipped(n)) continue;  // without sweep 2: one merge per row
        std::copy(&part[n * spans * K1], &part[(n * spans + 1) * K1], row.begin());
        for (int64_t jj = 1; jj < spans; ++jj)
          for (int64_t k = 0; k < K1; ++k) softmax_merge(row[k], part[(n * spans + jj) * K1 + k], LibmExp2{});
        const RowSweep1 r = finish1(n, row.data(), lse.data(), j == 0);  // same in every item
        if (j == 0) rows[n] = r;
        if (a.decompose) {
          const int64_t vb = j * kSplitSpan;
          work += sweep2(n, vb, std::min(a.V, vb + kSplitSpan), lse.data(), r.lse2_p, sums[i],
                         tb.range(i - lo, a.K), tb);
        }
      }
    }
    for (int64_t n = 0; n < a.N; ++n) {
      if (skipped(n)) {
        write_skipped(n);
        continue;
      }
      MixtureSums mix = sums[n * spans];
      for (int64_t j = 1; j < spans; ++j) {
        mix.jsd += sums[n * spans + j].jsd;
        mix.entropy += sums[n * spans + j].entropy;
        mix.kl += sums[n * spans + j].kl;
      }
      write(n, rows[n], a.decompose ? &mix : nullptr);
    }
    return work;
  }

  // The path depends on the shape (and keep_bytes) only, never on the thread count, so results
  // are reproducible.
  Work run(int threads) const { return split() ? run_split(threads) : run_rows(threads); }
};

// Runs the kernel for the logits' dtypes without the GIL; returns (read, exps, logs).
py::tuple run(const Args& a, int draft_dtype, int target_dtype, int num_threads) {
  const int threads = std::max(1, num_threads);
  Work w;
  {
    py::gil_scoped_release release;
    w = dispatch_dtype(draft_dtype, [&](auto td) -> Work {
      using TD = decltype(td);
      if (a.target == nullptr) return DraftUncertaintyKernel<TD, TD, false>(a).run(threads);
      return dispatch_dtype(target_dtype, [&](auto tp) -> Work {
        return DraftUncertaintyKernel<TD, decltype(tp), true>(a).run(threads);
      });
    });
  }
  return py::make_tuple(w.read, w.exps, w.logs);
}

py::tuple draft_uncertainty(uintptr_t draft, int draft_dtype, int64_t K, int64_t N, int64_t V,
                            int64_t draft_stride_k, int64_t draft_stride_n, uintptr_t target,
                            int target_dtype, int64_t target_stride_n, uintptr_t weights,
                            double temperature, bool decompose, uintptr_t stats,
                            int64_t stats_stride_row, int64_t stats_stride_n, uintptr_t draft_lse,
                            int64_t draft_lse_stride_k, int64_t draft_lse_stride_n,
                            uintptr_t target_lse, int64_t target_lse_stride_n, int num_threads,
                            int64_t keep_bytes) {
  if (K < 1 || N < 0 || V < 1) throw std::invalid_argument("epikern._cpu.draft_uncertainty: bad K/N/V");
  const Args a{reinterpret_cast<const void*>(draft), K, N, V, draft_stride_k, draft_stride_n,
               reinterpret_cast<const void*>(target), target_stride_n,
               reinterpret_cast<const float*>(weights), static_cast<float>(1.4426950408889634 / temperature),
               decompose, reinterpret_cast<float*>(stats), stats_stride_row, stats_stride_n,
               reinterpret_cast<float*>(draft_lse), draft_lse_stride_k, draft_lse_stride_n,
               reinterpret_cast<float*>(target_lse), target_lse_stride_n,
               keep_bytes < 0 ? kKeepBytes : keep_bytes};
  return run(a, draft_dtype, target_dtype, num_threads);
}

// The engine-layout op: output rows [N] through the maps; `out` [7 + K, N] float32 packs stats
// (rows 0-5), draft_lse (6 .. 5 + K) and target_lse (6 + K), with element strides out_stride_row
// and out_stride_n. Map dtype codes: 0 = int32, 1 = int64; a map pointer of 0 is the identity.
py::tuple draft_uncertainty_rows(uintptr_t draft, int draft_dtype, int64_t K, int64_t draft_rows,
                                 int64_t V, int64_t draft_stride_k, int64_t draft_stride_n,
                                 uintptr_t target, int target_dtype, int64_t target_rows,
                                 int64_t target_stride_n, uintptr_t draft_index, bool draft_index64,
                                 uintptr_t target_index, bool target_index64, int64_t N,
                                 uintptr_t inv_temperature, int64_t inv_temperature_stride,
                                 uintptr_t weights, bool decompose, uintptr_t out,
                                 int64_t out_stride_row, int64_t out_stride_n, int num_threads) {
  if (K < 1 || N < 0 || V < 1 || draft_rows < 0 || target_rows < 0)
    throw std::invalid_argument("epikern._cpu.draft_uncertainty_rows: bad K/N/V or row counts");
  float* o = reinterpret_cast<float*>(out);
  Args a{reinterpret_cast<const void*>(draft), K, N, V, draft_stride_k, draft_stride_n,
         reinterpret_cast<const void*>(target), target_stride_n,
         reinterpret_cast<const float*>(weights), 1.4426950408889634f, decompose,
         o, out_stride_row, out_stride_n, o + 6 * out_stride_row, out_stride_row, out_stride_n,
         o + (6 + K) * out_stride_row, out_stride_n, kKeepBytes};
  a.draft_index = {reinterpret_cast<const void*>(draft_index), draft_index64, draft_rows};
  a.target_index = {reinterpret_cast<const void*>(target_index), target_index64, target_rows};
  a.inv_temperature = reinterpret_cast<const float*>(inv_temperature);
  a.inv_temperature_stride = inv_temperature_stride;
  return run(a, draft_dtype, target_dtype, num_threads);
}

}  // namespace

void bind_draft_uncertainty(py::module_& m) {
  m.def("draft_uncertainty", &draft_uncertainty, py::arg("draft"), py::arg("draft_dtype"),
        py::arg("K"), py::arg("N"), py::arg("V"), py::arg("draft_stride_k"),
        py::arg("draft_stride_n"), py::arg("target"), py::arg("target_dtype"),
        py::arg("target_stride_n"), py::arg("weights"), py::arg("temperature"),
        py::arg("decompose"), py::arg("stats"), py::arg("stats_stride_row"),
        py::arg("stats_stride_n"), py::arg("draft_lse"), py::arg("draft_lse_stride_k"),
        py::arg("draft_lse_stride_n"), py::arg("target_lse"), py::arg("target_lse_stride_n"),
        py::arg("num_threads"), py::arg("keep_bytes") = -1,
        "Fused draft_uncertainty over raw pointers (element strides; dtype codes 0 = float32, "
        "1 = float16, 2 = bfloat16; target = 0 for none). Writes stats[6, N], draft_lse[K, N] and "
        "target_lse[N] (float32). keep_bytes: budget of the exponentials sweep 1 keeps for sweep 2 "
        "(4 bytes per draft with w_k > 0 and entry, for one row, or for all rows when the "
        "vocabulary is split; −1: the default, 8 MiB; 0: never keep). Returns (logit elements "
        "read, exponentials, logarithms) evaluated in the vector loops.");
  m.def("draft_uncertainty_rows", &draft_uncertainty_rows, py::arg("draft"), py::arg("draft_dtype"),
        py::arg("K"), py::arg("draft_rows"), py::arg("V"), py::arg("draft_stride_k"),
        py::arg("draft_stride_n"), py::arg("target"), py::arg("target_dtype"),
        py::arg("target_rows"), py::arg("target_stride_n"), py::arg("draft_index"),
        py::arg("draft_index64"), py::arg("target_index"), py::arg("target_index64"), py::arg("N"),
        py::arg("inv_temperature"), py::arg("inv_temperature_stride"), py::arg("weights"),
        py::arg("decompose"), py::arg("out"), py::arg("out_stride_row"), py::arg("out_stride_n"),
        py::arg("num_threads"),
        "draft_uncertainty on engine layouts: output row n reads draft row draft_index[n] of "
        "draft[K, draft_rows, V] and target row target_index[n] of target[target_rows, V] (int32, "
        "or int64 when *_index64; 0 = the identity) at 1/T = inv_temperature[n]; out [7 + K, N] "
        "float32 packs stats, draft_lse and target_lse. Rows with a negative or out-of-range map "
        "entry, or 1/T not finite and > 0, are NaN and not read. Returns the work as "
        "draft_uncertainty does.");
}

EPIKERN_CPU_NAMESPACE_END
