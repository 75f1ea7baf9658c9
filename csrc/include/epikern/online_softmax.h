// Framework-free math of draft_uncertainty shared by the CPU (C++17) and CUDA kernels.
//
// Per row, with x = z_k / T (a draft) and y = z_p / T (the reference p):
//
//   sweep 1 (online softmax, one read of every logit), state (m, s, t, c) per draft:
//     m = running max (the exponent origin),  s = Σ e^{x−m},  t = Σ e^{x−m}(x − m),
//     c = Σ e^{x−m}(x − y)                         (cross term, drafts only, when p is given)
//     lse = m + log s,   H(q) = log s − t/s,   KL(q ‖ p) = c/s − lse_q + lse_p
//   Rescaling to a new origin m' ≥ m (a = e^{m−m'}):
//     s' = a·s,   t' = a·(t + (m − m')·s),   c' = a·c          (nothing to do while s = 0)
//   c = +inf (mass where the reference is −inf) stays +inf: a > 0 in exact arithmetic, but an
//   exponential that flushes (the device's ex2.approx.ftz below d ≈ −87.3, or any exp below −104)
//   returns 0, and 0·inf would be NaN.
//   Two partial states over disjoint parts of a row merge by rescaling both to max(m_a, m_b) and
//   adding.
//
//   sweep 2 (decompose only), per vocabulary entry v with l_k = log w_k + x_k − lse_k:
//     log q̄ = logsumexp_k l_k = M + log Σ_k e^{l_k − M},   M = max_k l_k
//     jsd    += Σ_k e^{l_k} (x_k − lse_k − log q̄)       (= Σ_k w_k q_k (log q_k − log q̄))
//     H(q̄)   += −q̄ log q̄,        KL(q̄ ‖ p) += q̄ (log q̄ − y + lse_p)
//
// Conventions (design §1): a term whose probability factor is exactly 0 contributes 0, whatever the
// other factor (0·(−inf) = 0, 0·log 0 = 0); a positive probability against y = −inf gives +inf;
// NaN propagates (the guards test `== 0`, which is false for NaN). While every element seen so
// far is −inf the origin m stays −inf and exponentials are taken relative to 0 (exp_origin), so
// an all −inf row ends with s = 0 → lse = −inf, H = NaN, and a NaN element makes s = NaN.
#pragma once

#include <math.h>

// EPIKERN_INLINE: always inlined, so that the vectoriser sees straight-line code in the callers'
// loops whatever the inliner's budget (e.g. under LTO).
#ifdef __CUDACC__
#define EPIKERN_HOST_DEVICE __host__ __device__
#define EPIKERN_INLINE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define EPIKERN_HOST_DEVICE
#define EPIKERN_INLINE inline __attribute__((always_inline))
#else
#define EPIKERN_HOST_DEVICE
#define EPIKERN_INLINE inline
#endif

namespace epikern {

// p · a with 0 · anything = 0 (p is a probability or a weight, never negative). NaN p → NaN.
EPIKERN_INLINE float prob_times(float p, float a) { return p == 0.f ? 0.f : p * a; }

// Exponent origin used for e^{x − origin}: the running max, or 0 while it is still −inf.
EPIKERN_INLINE float exp_origin(float m) { return m == -INFINITY ? 0.f : m; }

// Online softmax statistics of one distribution over the part of a row seen so far.
struct SoftmaxState {
  float m;  // running max of x (the exponent origin); −inf while nothing finite was seen
  float s;  // Σ e^{x−m}
  float t;  // Σ e^{x−m} (x − m)
  float c;  // Σ e^{x−m} (x − y): cross term against the reference (stays 0 if unused)
};

EPIKERN_INLINE SoftmaxState softmax_state_empty() { return SoftmaxState{-INFINITY, 0.f, 0.f, 0.f}; }

// Move the origin of `st` to max(st.m, m_new) (m_new: the max of a new element or block).
// `exp_fn` is the exponential to use (libm expf on the host, an intrinsic on the device).
template <class ExpFn>
EPIKERN_INLINE void softmax_rescale(SoftmaxState& st, float m_new, ExpFn exp_fn) {
  const float m = st.m > m_new ? st.m : m_new;  // NaN m_new is ignored here; it reaches s instead
  if (st.s != 0.f) {  // true for NaN: keeps the NaN
    const float d = exp_origin(st.m) - exp_origin(m);
    const float a = exp_fn(d);
    st.t = a * (st.t + d * st.s);
    st.s = a * st.s;
    st.c = st.c == INFINITY ? st.c : a * st.c;
  }
  st.m = m;
}

// One element's contributions (e^{x−r}, e^{x−r}(x − r), e^{x−r}(x − y)) relative to origin r.
struct SoftmaxTerms {
  float e, t, c;
};

// x − r is clamped at −104 (NaN kept): e^{−104} = 0 in fp32, so e·(x − r) = 0 there without a
// 0·(−inf) for x = −inf. A finite x against y = −inf gives c = +inf even where e underflowed (its
// probability is positive in exact arithmetic), as forward_kl's cross term does.
template <class ExpFn>
EPIKERN_INLINE SoftmaxTerms softmax_terms(float x, float y, float r, ExpFn exp_fn) {
  const float d = -104.f > x - r ? -104.f : x - r;
  const float e = exp_fn(d);
  const float xy = x - y;  // +inf only for a finite x against y = −inf (−inf − (−inf) is NaN)
  return SoftmaxTerms{e, e * d, xy == INFINITY ? xy : prob_times(e, xy)};
}

// Add one element x (with reference logit y; pass y = x when there is no cross term) to a
// state whose origin already covers x (call softmax_rescale first).
template <class ExpFn>
EPIKERN_INLINE void softmax_add(SoftmaxState& st, float x, float y, ExpFn exp_fn) {
  const SoftmaxTerms d = softmax_terms(x, y, exp_origin(st.m), exp_fn);
  st.s += d.e;
  st.t += d.t;
  st.c += d.c;
}

// Merge two partial states of disjoint parts of one row into `a`.
template <class ExpFn>
EPIKERN_INLINE void softmax_merge(SoftmaxState& a, SoftmaxState b, ExpFn exp_fn) {
  const float m = a.m > b.m ? a.m : b.m;
  softmax_rescale(a, m, exp_fn);
  softmax_rescale(b, m, exp_fn);
  a.s += b.s;
  a.t += b.t;
  a.c += b.c;
}

// log Σ e^x: −inf for an all −inf row, NaN if the row held a NaN.
EPIKERN_INLINE float softmax_lse(const SoftmaxState& st) { return exp_origin(st.m) + logf(st.s); }

// Entropy H(q) = log s − t/s (NaN for an all −inf row).
EPIKERN_INLINE float softmax_entropy(const SoftmaxState& st) { return logf(st.s) - st.t / st.s; }

// KL(q ‖ p) = c/s − lse_q + lse_p from q's state (with its cross term against p).
EPIKERN_INLINE float softmax_kl(const SoftmaxState& st, float lse_q, float lse_p) {
  return st.c / st.s - lse_q + lse_p;
}

// Sweep 2, written as stages so that a per-entry loop (CUDA) and a vectorised loop over a block
// of entries (CPU) share the formulas. At one vocabulary entry:
//   l_k = mixture_log_weight(log w_k, x_k, lse_k)        M = max_k l_k,  r = exp_origin(M)
//   e_k = e^{l_k − r},  S = Σ_k e_k,  lq = r + log S     (log q̄ = logsumexp_k l_k)
//   J = Σ_k mixture_jsd_term(e_k, l_k, log w_k, lq)
//   mixture_finish(r, S, J, lq, ...) → the entry's jsd, −q̄ log q̄ and q̄ (log q̄ − y + lse_p).

// l_k = log w_k + x_k − lse_k (−inf when w_k = 0 or x_k = −inf).
EPIKERN_INLINE float mixture_log_weight(float log_w, float x, float lse) { return log_w + x - lse; }

// e^{l_k − r} · (log q_k − log q̄) with log q_k = l_k − log w_k; 0 where e = 0 (also for w_k = 0).
EPIKERN_INLINE float mixture_jsd_term(float e, float l, float log_w, float lq) {
  return prob_times(e, l - log_w - lq);
}

// Per-entry sweep-2 contributions.
struct MixtureTerms {
  float jsd;      // Σ_k w_k q_k (log q_k − log q̄)
  float entropy;  // −q̄ log q̄
  float kl;       // q̄ (log q̄ − y + lse_p); 0 when there is no reference
};

// Combine the stages: q̄ = S·e^r, jsd = e^r·J.
template <class ExpFn>
EPIKERN_INLINE MixtureTerms mixture_finish(float r, float S, float J, float lq, bool has_p, float y,
                                           float lse_p, ExpFn exp_fn) {
  const float eM = exp_fn(r);
  const float q = S * eM;
  MixtureTerms out;
  out.jsd = eM * J;
  out.entropy = prob_times(q, -lq);
  // q̄ that underflowed against y = −inf is still +inf: log q̄ is finite (design §1.1 rule 6)
  const float d = lq - y + lse_p;
  out.kl = has_p ? (d == INFINITY ? d : prob_times(q, d)) : 0.f;
  return out;
}

// All stages at one entry from K values l_k stored `ld` floats apart and the K log-weights.
template <class ExpFn, class LogFn>
EPIKERN_INLINE MixtureTerms mixture_terms(const float* l, long ld, const float* log_w, int K,
                                          bool has_p, float y, float lse_p, ExpFn exp_fn,
                                          LogFn log_fn) {
  float M = -INFINITY;
  for (int k = 0; k < K; ++k) M = l[k * ld] > M ? l[k * ld] : M;
  const float r = exp_origin(M);
  float S = 0.f;
  for (int k = 0; k < K; ++k) S += exp_fn(l[k * ld] - r);
  const float lq = r + log_fn(S);  // −inf when every q_k is 0 here
  float J = 0.f;
  for (int k = 0; k < K; ++k) J += mixture_jsd_term(exp_fn(l[k * ld] - r), l[k * ld], log_w[k], lq);
  return mixture_finish(r, S, J, lq, has_p, y, lse_p, exp_fn);
}

}  // namespace epikern
