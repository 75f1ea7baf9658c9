// Row math of the CUDA draft_uncertainty kernels on top of epikern/online_softmax.h, kept
// framework-free and __host__ __device__ so that a host build can check it without a GPU.
//
// The kernels work in base 2: every logit is multiplied once by log2(e)/T, so each exponential is
// one ex2 instruction. The shared formulas are base-independent when given exp2/log2, except for
// the finalisers, which use natural logs: `state_to_natural` converts a merged state first.
// Quantities then come out in bits and are multiplied by ln 2 once per row.
//
// Sweep 2 takes two passes over the K drafts at each vocabulary entry (the max M, then the sums)
// so that any K runs without per-draft storage. The jsd term needs log q̄ before it can be formed
// directly, so it is accumulated as J1 = Σ_k e_k log q_k and finished as J = J1 − S·log q̄, which is
// the same sum Σ_k e_k (log q_k − log q̄) regrouped within one entry (the cancellation is between
// numbers of size S·|log q̄|, i.e. one rounding of the entry's own terms, not between two row
// entropies).
#pragma once

#include "epikern/online_softmax.h"

namespace epikern {
namespace gpu {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// A state gathered from base-2 logits x·log2(e) → the same state for natural-log logits.
EPIKERN_INLINE SoftmaxState state_to_natural(SoftmaxState st) {
  return SoftmaxState{st.m * kLn2, st.s, st.t * kLn2, st.c * kLn2};
}

// log2 Σ 2^x of a base-2 state (−inf for an all −inf row, NaN if the row held a NaN).
EPIKERN_INLINE float lse_base2(const SoftmaxState& st) { return exp_origin(st.m) + log2f(st.s); }

// Sweep 1 over W consecutive elements: one rescale to the chunk max, then W additions. y is the
// reference logit of each element (pass x itself when there is no cross term).
template <int W, class ExpFn>
EPIKERN_INLINE void softmax_add_chunk(SoftmaxState& st, const float (&x)[W], const float (&y)[W],
                                      ExpFn exp_fn) {
  float m = -INFINITY;
  for (int i = 0; i < W; ++i) m = x[i] > m ? x[i] : m;  // NaN skipped here, it reaches s below
  softmax_rescale(st, m, exp_fn);
  for (int i = 0; i < W; ++i) softmax_add(st, x[i], y[i], exp_fn);
}

// Sweep 2, second pass over k at one entry: e_k = 2^{l_k − r}, S += e_k, J1 += e_k (l_k − log w_k).
template <class ExpFn>
EPIKERN_INLINE void mixture_accumulate(float& S, float& J1, float l, float log_w, float r,
                                       ExpFn exp_fn) {
  const float e = exp_fn(l - r);
  S += e;
  J1 += prob_times(e, l - log_w);  // 0 for w_k = 0 or q_k = 0 (where l − log w is NaN or −inf)
}

// Sweep 2 at one entry from r = exp_origin(max_k l_k) and the sums of mixture_accumulate.
template <class ExpFn, class LogFn>
EPIKERN_INLINE MixtureTerms mixture_entry(float r, float S, float J1, bool has_p, float y,
                                          float lse_p, ExpFn exp_fn, LogFn log_fn) {
  const float lq = r + log_fn(S);
  return mixture_finish(r, S, J1 - prob_times(S, lq), lq, has_p, y, lse_p, exp_fn);
}

// Sweep-1 results of one row (natural units).
struct Sweep1Row {
  float eu;              // Σ_k w_k KL(q_k ‖ p), NaN without a reference
  float draft_entropy;   // Σ_k w_k H(q_k)
  float target_entropy;  // H(p), NaN without a reference
};

// Finalise sweep 1 from the merged base-2 states st[0..K−1] (drafts) and st[K] (reference, used
// only when has_p). Writes log2 Σ 2^x of every draft and of the reference to lse2[0..K] (NaN for
// a missing reference): the natural log-normalisers are lse2·ln 2, and sweep 2 reads lse2.
EPIKERN_INLINE Sweep1Row finish_sweep1(const SoftmaxState* st, int K, bool has_p, const float* w,
                                       long w_stride, float* lse2) {
  Sweep1Row row{0.f, 0.f, NAN};
  float lse_p = NAN;
  lse2[K] = NAN;
  if (has_p) {
    const SoftmaxState p = state_to_natural(st[K]);
    lse_p = softmax_lse(p);
    row.target_entropy = softmax_entropy(p);
    lse2[K] = lse_base2(st[K]);
  }
  for (int k = 0; k < K; ++k) {
    const SoftmaxState q = state_to_natural(st[k]);
    const float lse_q = softmax_lse(q);
    const float wk = w[k * w_stride];
    row.draft_entropy += prob_times(wk, softmax_entropy(q));
    row.eu += prob_times(wk, softmax_kl(q, lse_q, lse_p));  // a zero weight silences a +inf KL
    lse2[k] = lse_base2(st[k]);
  }
  if (!has_p) row.eu = NAN;
  return row;
}

}  // namespace gpu
}  // namespace epikern
