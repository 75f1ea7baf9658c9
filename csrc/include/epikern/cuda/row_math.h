// Row math of the CUDA draft_uncertainty kernels on top of epikern/online_softmax.h, kept
// framework-free and __host__ __device__ so that a host build can check it without a GPU
// (tests/backends/cuda_row_math_host.cpp). Natural-log units throughout, as online_softmax.h
// expects; the kernels pass their own fast exp/log.
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

// Sweep 2, second pass over k at one entry: e_k = e^{l_k − r}, S += e_k, J1 += e_k (l_k − log w_k).
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

// Sweep-1 results of one row.
struct Sweep1Row {
  float eu;              // Σ_k w_k KL(q_k ‖ p), NaN without a reference
  float draft_entropy;   // Σ_k w_k H(q_k)
  float target_entropy;  // H(p), NaN without a reference
};

// Finalise sweep 1 from the merged states st[0..K−1] (drafts) and st[K] (reference, used only
// when has_p). Writes the log-normalisers of the drafts and of the reference to lse[0..K] (NaN for
// a missing reference); sweep 2 reads them.
EPIKERN_INLINE Sweep1Row finish_sweep1(const SoftmaxState* st, int K, bool has_p, const float* w,
                                       long w_stride, float* lse) {
  Sweep1Row row{0.f, 0.f, NAN};
  lse[K] = NAN;
  if (has_p) {
    lse[K] = softmax_lse(st[K]);
    row.target_entropy = softmax_entropy(st[K]);
  }
  for (int k = 0; k < K; ++k) {
    lse[k] = softmax_lse(st[k]);
    const float wk = w[k * w_stride];
    row.draft_entropy += prob_times(wk, softmax_entropy(st[k]));
    row.eu += prob_times(wk, softmax_kl(st[k], lse[k], lse[K]));  // w = 0 silences a +inf KL
  }
  if (!has_p) row.eu = NAN;
  return row;
}

}  // namespace gpu
}  // namespace epikern
