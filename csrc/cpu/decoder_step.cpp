// Fused CPU decode step of a DraftEnsemble (launcher: epikern/models/fused_step.py): T new tokens of
// B rows through the L stacked Llama-family decoder layers (G = 1 trunk group or G = K branch
// groups each), their keys and values written into the DraftCache buffers in place, and the K
// drafts' logits of the last `keep` positions. float32 throughout.
//
// Why: a draft step of the small drafts speculative decoding wants is ~25 ATen ops a layer, each
// 1-10 µs of dispatch for microseconds of arithmetic, so the step costs a third of the target's
// although it does a fraction of its work. Here it is one call.
//
// Per layer and group g (x [R, H], R = B·T rows, row r = b·T + t):
//   h = rmsnorm(x) · w_in;  [q | k | v] = h W_qkv (+ b);  q, k ← rotary at position[b, t]
//   K/V cache[g, b, :, past + t] ← k, v
//   a = softmax(scale · q K^T over keys j ≤ past + t with mask[b, j] ≠ 0) V   (GQA: query head h
//       reads kv head h / (heads / kv_heads); a row with no key allowed gets a = 0)
//   x += a W_o (+ b);  h = rmsnorm(x) · w_post;  [u | v] = h W_gate_up (+ b);  x += (silu(u) v) W_down (+ b)
// and last, per draft k: logits = rmsnorm(x_k) · w_norm_k  W_head_k. Before the first branch layer
// every draft shares the trunk's x.
//
// Matrices are "in-major" (epikern.models.layers.in_major): W[g] of a projection with `in` inputs
// and `out` outputs is [in][out] in memory, so one row of inputs scales contiguous rows of W (the
// axpy form; it reads each weight once for up to four input rows).
#include <omp.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "isa.h"
#include "simd.h"

namespace py = pybind11;

EPIKERN_CPU_NAMESPACE_BEGIN
namespace {

namespace S = simd;
using S::vf;
constexpr int64_t W = S::kWidth;
// Parallel matmuls/attention only above this many multiply-adds (below, a fork costs more).
constexpr int64_t kParallelWork = int64_t{1} << 18;
// Widest column tile of a matmul, in vectors: 3 rows × 8 accumulators + 8 weights fill AVX-512's 32
// registers.
constexpr int64_t kTileVectors = 8;

// One block of RB rows × NV vectors of columns: y[r, o0 + c] = init + Σ_i x[r, i] W[i, o0 + c].
template <int RB, int NV>
void tile(const float* x, int64_t in, const float* w, int64_t out, float* y, const float* bias, bool accumulate) {
  vf acc[RB][NV];
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = accumulate ? S::load(y + r * out + v * W) : bias ? S::load(bias + v * W) : S::splat(0.f);
  for (int64_t i = 0; i < in; ++i) {
    vf wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = S::load(w + i * out + v * W);
    for (int r = 0; r < RB; ++r) {
      const vf a = S::splat(x[r * in + i]);
      for (int v = 0; v < NV; ++v) acc[r][v] += a * wv[v];
    }
  }
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) S::store(y + r * out + v * W, acc[r][v]);
}

template <int NV>
void tile_rows(const float* x, int64_t R, int64_t in, const float* w, int64_t out, float* y, const float* bias,
               bool accumulate) {
  int64_t r = 0;
  for (; r + 3 <= R; r += 3) tile<3, NV>(x + r * in, in, w, out, y + r * out, bias, accumulate);
  if (R - r == 2) tile<2, NV>(x + r * in, in, w, out, y + r * out, bias, accumulate);
  if (R - r == 1) tile<1, NV>(x + r * in, in, w, out, y + r * out, bias, accumulate);
}

// Columns [o, o + nv·W) for every row, nv in 1..kTileVectors.
void column_tile(int nv, const float* x, int64_t R, int64_t in, const float* w, int64_t out, float* y,
                 const float* bias, bool accumulate) {
  switch (nv) {
#define EPIKERN_TILE(n) \
    case n: return tile_rows<n>(x, R, in, w, out, y, bias, accumulate);
    EPIKERN_TILE(1) EPIKERN_TILE(2) EPIKERN_TILE(3) EPIKERN_TILE(4)
    EPIKERN_TILE(5) EPIKERN_TILE(6) EPIKERN_TILE(7) EPIKERN_TILE(8)
#undef EPIKERN_TILE
    default: throw std::logic_error("column tile width");
  }
}

// y [R, out] = (accumulate ? y : bias or 0) + x [R, in] · W, W in-major [in][out]. Column tiles of up
// to kTileVectors vectors, each a stream of contiguous stretches of W (one per input, read once for
// all rows), the tile's outputs for ≤ 3 rows held in registers throughout.
void linear(const float* x, int64_t R, int64_t in, const float* w, const float* bias, int64_t out, float* y,
            bool accumulate, int threads) {
  const int64_t vectors = out / W, tiles = (vectors + kTileVectors - 1) / kTileVectors;
  const auto run = [&](int64_t tl) {
    const int64_t o = tl * kTileVectors * W;
    const int nv = static_cast<int>(std::min<int64_t>(kTileVectors, vectors - tl * kTileVectors));
    column_tile(nv, x, R, in, w + o, out, y + o, bias ? bias + o : nullptr, accumulate);
  };
  if (threads > 1 && tiles > 1 && R * in * out >= kParallelWork) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t tl = 0; tl < tiles; ++tl) run(tl);
  } else {  // no OpenMP region at all: even a serialised one costs more than a small matmul
    for (int64_t tl = 0; tl < tiles; ++tl) run(tl);
  }
  for (int64_t o = vectors * W; o < out; ++o) {  // the last out % W columns
    for (int64_t r = 0; r < R; ++r) {
      float s = accumulate ? y[r * out + o] : bias ? bias[o] : 0.f;
      for (int64_t i = 0; i < in; ++i) s += x[r * in + i] * w[i * out + o];
      y[r * out + o] = s;
    }
  }
}

// y [R, H] = weight · x / sqrt(mean(x²) + eps) (HF LlamaRMSNorm in float32).
void rms_norm(const float* x, int64_t R, int64_t H, const float* weight, float eps, float* y) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * H;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < H; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(H) + eps);
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) y[r * H + i] = weight[i] * (xr[i] * inv);
  }
}

// HF apply_rotary_pos_emb on one head: x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁).
void rotate(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t half = d / 2;
  float tmp[512];
  std::copy(x, x + d, tmp);
  for (int64_t j = 0; j < half; ++j) x[j] = tmp[j] * cos[j] - tmp[j + half] * sin[j];
  for (int64_t j = half; j < d; ++j) x[j] = tmp[j] * cos[j] + tmp[j - half] * sin[j];
}

struct Layer {
  int64_t groups;
  const float *qkv_w, *qkv_b, *o_w, *o_b, *gate_up_w, *gate_up_b, *down_w, *down_b, *in_norm, *post_norm;
  float *key, *value;  // [G, B, kv_heads, capacity, d]
  int64_t capacity;
};
constexpr size_t kLayerFields = 14;

template <class T>
T* as_ptr(int64_t v) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(v));
}

void stacked_decode_step(uintptr_t ids_ptr, uintptr_t positions_ptr, int64_t pos_stride_b, int64_t pos_stride_t,
                         uintptr_t mask_ptr, int64_t mask_stride_b, int64_t B, int64_t T, int64_t past,
                         uintptr_t embed_ptr, uintptr_t cos_ptr, uintptr_t sin_ptr, int64_t table_rows,
                         const std::vector<int64_t>& layer_fields, int64_t K, int64_t H, int64_t heads,
                         int64_t kv_heads, int64_t d, int64_t I, int64_t V, double eps_d, double scale_d,
                         uintptr_t norm_ptr, uintptr_t head_ptr, int64_t keep, uintptr_t out_ptr, int threads) {
  if (layer_fields.size() % kLayerFields != 0) throw std::invalid_argument("layer fields: 14 per layer");
  if (heads % kv_heads != 0 || d > 512 || d % 2 != 0)
    throw std::invalid_argument("heads must be a multiple of kv_heads and head_dim even and <= 512");
  if (keep < 1 || keep > T) throw std::invalid_argument("keep must be in [1, T]");
  const auto* ids = reinterpret_cast<const int64_t*>(ids_ptr);
  const auto* positions = reinterpret_cast<const int64_t*>(positions_ptr);
  const auto* mask = reinterpret_cast<const int64_t*>(mask_ptr);
  const auto* embed = reinterpret_cast<const float*>(embed_ptr);
  const auto* cos_table = reinterpret_cast<const float*>(cos_ptr);
  const auto* sin_table = reinterpret_cast<const float*>(sin_ptr);
  const float eps = static_cast<float>(eps_d), scale = static_cast<float>(scale_d);
  const int64_t R = B * T, q_width = heads * d, kv_width = kv_heads * d, qkv_width = q_width + 2 * kv_width;
  const int64_t group_heads = heads / kv_heads, keys_max = past + T;

  std::vector<Layer> layers(layer_fields.size() / kLayerFields);
  for (size_t l = 0; l < layers.size(); ++l) {
    const int64_t* f = layer_fields.data() + l * kLayerFields;
    layers[l] = Layer{f[0], as_ptr<const float>(f[1]), as_ptr<const float>(f[2]), as_ptr<const float>(f[3]),
                      as_ptr<const float>(f[4]), as_ptr<const float>(f[5]), as_ptr<const float>(f[6]),
                      as_ptr<const float>(f[7]), as_ptr<const float>(f[8]), as_ptr<const float>(f[9]),
                      as_ptr<const float>(f[10]), as_ptr<float>(f[11]), as_ptr<float>(f[12]), f[13]};
    if ((layers[l].groups != 1 && layers[l].groups != K) || layers[l].capacity < keys_max)
      throw std::invalid_argument("layer " + std::to_string(l) + ": groups must be 1 or K and the cache hold past + T");
  }

  std::vector<int64_t> pos(R);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t id = ids[b * T + t], p = positions[b * pos_stride_b + t * pos_stride_t];
      if (id < 0 || id >= V) throw std::out_of_range("token id " + std::to_string(id) + " outside [0, vocab)");
      if (p < 0 || p >= table_rows) throw std::out_of_range("position " + std::to_string(p) + " outside the rotary table");
      pos[b * T + t] = p;
    }

  std::vector<float> x(static_cast<size_t>(K * R * H)), h(static_cast<size_t>(R * std::max(H, I)));
  std::vector<float> qkv(static_cast<size_t>(R * qkv_width)), attn(static_cast<size_t>(R * q_width));
  std::vector<float> gate_up(static_cast<size_t>(R * 2 * I)), scores(static_cast<size_t>(keys_max));
  for (int64_t r = 0; r < R; ++r) std::copy(embed + ids[r] * H, embed + ids[r] * H + H, x.data() + r * H);
  int64_t live = 1;  // groups of x computed so far (1 until the first branch layer)

  for (const Layer& L : layers) {
    if (L.groups < live) throw std::invalid_argument("a trunk layer (G = 1) after a branch layer");
    for (; live < L.groups; ++live) std::copy(x.begin(), x.begin() + R * H, x.begin() + live * R * H);
    for (int64_t g = 0; g < L.groups; ++g) {
      float* xg = x.data() + g * R * H;
      const auto off = [g](const float* p, int64_t n) { return p ? p + g * n : nullptr; };
      rms_norm(xg, R, H, L.in_norm + g * H, eps, h.data());
      linear(h.data(), R, H, L.qkv_w + g * H * qkv_width, off(L.qkv_b, qkv_width), qkv_width, qkv.data(), false, threads);
      for (int64_t r = 0; r < R; ++r) {
        const int64_t b = r / T, t = r % T;
        const float *cs = cos_table + pos[r] * d, *sn = sin_table + pos[r] * d;
        float* row = qkv.data() + r * qkv_width;
        for (int64_t hd = 0; hd < heads + kv_heads; ++hd) rotate(row + hd * d, cs, sn, d);
        for (int64_t kh = 0; kh < kv_heads; ++kh) {
          const int64_t slot = (((g * B + b) * kv_heads + kh) * L.capacity + past + t) * d;
          std::copy(row + q_width + kh * d, row + q_width + kh * d + d, L.key + slot);
          std::copy(row + q_width + kv_width + kh * d, row + q_width + kv_width + kh * d + d, L.value + slot);
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        const int64_t b = r / T, t = r % T, n_keys = past + t + 1;
        const int64_t* mrow = mask ? mask + b * mask_stride_b : nullptr;
        for (int64_t hq = 0; hq < heads; ++hq) {
          const float* q = qkv.data() + r * qkv_width + hq * d;
          const int64_t base = ((g * B + b) * kv_heads + hq / group_heads) * L.capacity * d;
          const float *keys = L.key + base, *values = L.value + base;
          float m = -INFINITY;
          for (int64_t j = 0; j < n_keys; ++j) {
            float s = -INFINITY;
            if (!mrow || mrow[j] != 0) {
              s = 0.f;
#pragma omp simd reduction(+ : s)
              for (int64_t c = 0; c < d; ++c) s += q[c] * keys[j * d + c];
              s *= scale;
            }
            scores[j] = s;
            m = std::max(m, s);
          }
          float* a = attn.data() + r * q_width + hq * d;
          std::fill(a, a + d, 0.f);
          if (m == -INFINITY) continue;  // no key allowed
          float total = 0.f;
          for (int64_t j = 0; j < n_keys; ++j) {
            if (scores[j] == -INFINITY) continue;
            const float p = std::exp(scores[j] - m);
            total += p;
#pragma omp simd
            for (int64_t c = 0; c < d; ++c) a[c] += p * values[j * d + c];
          }
          const float inv = 1.f / total;
          for (int64_t c = 0; c < d; ++c) a[c] *= inv;
        }
      }
      linear(attn.data(), R, q_width, L.o_w + g * q_width * H, off(L.o_b, H), H, xg, true, threads);
      rms_norm(xg, R, H, L.post_norm + g * H, eps, h.data());
      linear(h.data(), R, H, L.gate_up_w + g * H * 2 * I, off(L.gate_up_b, 2 * I), 2 * I, gate_up.data(), false, threads);
      for (int64_t r = 0; r < R; ++r) {
        const float* u = gate_up.data() + r * 2 * I;
        for (int64_t i = 0; i < I; ++i) h[r * I + i] = u[i] / (1.f + std::exp(-u[i])) * u[I + i];
      }
      linear(h.data(), R, I, L.down_w + g * I * H, off(L.down_b, H), H, xg, true, threads);
    }
  }

  const auto* norm = reinterpret_cast<const float*>(norm_ptr);
  const auto* head = reinterpret_cast<const float*>(head_ptr);
  auto* out = reinterpret_cast<float*>(out_ptr);
  std::vector<float> last(static_cast<size_t>(B * keep * H));
  for (int64_t k = 0; k < K; ++k) {
    const float* xk = x.data() + (live == 1 ? 0 : k) * R * H;
    for (int64_t b = 0; b < B; ++b)
      rms_norm(xk + (b * T + T - keep) * H, keep, H, norm + k * H, eps, last.data() + b * keep * H);
    linear(last.data(), B * keep, H, head + k * H * V, nullptr, V, out + k * B * keep * V, false, threads);
  }
}

}  // namespace

void bind_decoder_step(py::module_& m) {
  m.def("stacked_decode_step", &stacked_decode_step, py::call_guard<py::gil_scoped_release>(),
        "Fused decode step of a DraftEnsemble (epikern/models/fused_step.py); raw pointers, float32.");
}

EPIKERN_CPU_NAMESPACE_END
