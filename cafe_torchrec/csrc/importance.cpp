// Per-occurrence importance in one pass: bag gradient norms, times |per-sample weight|,
// normalised per feature to mean 1 (the twin of cafe_torchrec.importance.occurrence_scores).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace {

// Four partial sums, so the adds pipeline (and vectorise) instead of forming one long chain.
inline float sum_of_squares(const float* x, int64_t n) {
  float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int64_t d = 0;
  for (; d + 4 <= n; d += 4) {
    for (int j = 0; j < 4; ++j) part[j] += x[d + j] * x[d + j];
  }
  float sq = (part[0] + part[1]) + (part[2] + part[3]);
  for (; d < n; ++d) sq += x[d] * x[d];
  return sq;
}

// L2 norms of the `count` consecutive dim-long vectors at x, into out[0], out[stride], ...
// Four vectors at a time share one transpose and one sqrt where SSE is there and dim % 4 == 0.
inline void norms(const float* x, int64_t count, int64_t dim, float* out, int64_t stride) {
  int64_t v = 0;
#if defined(__SSE2__)
  if (dim % 4 == 0) {
    for (; v + 4 <= count; v += 4) {
      const float* p = x + v * dim;
      __m128 a0 = _mm_setzero_ps(), a1 = _mm_setzero_ps(), a2 = _mm_setzero_ps(), a3 = _mm_setzero_ps();
      for (int64_t d = 0; d < dim; d += 4) {
        const __m128 x0 = _mm_loadu_ps(p + d), x1 = _mm_loadu_ps(p + dim + d);
        const __m128 x2 = _mm_loadu_ps(p + 2 * dim + d), x3 = _mm_loadu_ps(p + 3 * dim + d);
        a0 = _mm_add_ps(a0, _mm_mul_ps(x0, x0));
        a1 = _mm_add_ps(a1, _mm_mul_ps(x1, x1));
        a2 = _mm_add_ps(a2, _mm_mul_ps(x2, x2));
        a3 = _mm_add_ps(a3, _mm_mul_ps(x3, x3));
      }
      _MM_TRANSPOSE4_PS(a0, a1, a2, a3);
      alignas(16) float r[4];
      _mm_store_ps(r, _mm_sqrt_ps(_mm_add_ps(_mm_add_ps(a0, a1), _mm_add_ps(a2, a3))));
      for (int j = 0; j < 4; ++j) out[(v + j) * stride] = r[j];
    }
  }
#endif
  for (; v < count; ++v) out[v * stride] = std::sqrt(sum_of_squares(x + v * dim, dim));
}

// grad [B, total columns] float32; the features' columns start at `column`, D each, F features.
at::Tensor occurrence_scores(const at::Tensor& grad_t, int64_t column, int64_t num_features, int64_t dim,
                             const at::Tensor& lengths_t, const at::Tensor& weights_t) {
  TORCH_CHECK(grad_t.dim() == 2 && grad_t.scalar_type() == at::kFloat, "grad: float32 [B, C]");
  const at::Tensor grad = grad_t.contiguous();
  const at::Tensor lengths = lengths_t.to(at::kLong).contiguous();
  const int64_t batch = grad.size(0), cols = grad.size(1);
  TORCH_CHECK(column + num_features * dim <= cols, "feature columns exceed the gradient");
  TORCH_CHECK(lengths.numel() == num_features * batch, "lengths: [F * B]");
  const int64_t* len = lengths.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t i = 0; i < lengths.numel(); ++i) total += len[i];
  const bool weighted = weights_t.numel() > 0;
  const at::Tensor weights = weighted ? weights_t.to(at::kFloat).contiguous() : weights_t;
  TORCH_CHECK(!weighted || weights.numel() == total, "weights: one per occurrence");
  const float* w = weighted ? weights.data_ptr<float>() : nullptr;
  const float* g = grad.data_ptr<float>();
  at::Tensor scores = at::empty({total}, grad.options());
  float* out = scores.data_ptr<float>();
  // bag norms [F, B], read row by row (the gradient is row-major)
  std::vector<float> bag_norms(num_features * batch);
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = g + b * cols + column;
    norms(row, num_features, dim, bag_norms.data() + b, batch);
  }
  int64_t pos = 0;
  for (int64_t f = 0; f < num_features; ++f) {
    const int64_t start = pos;
    const float* fn = bag_norms.data() + f * batch;
    const int64_t* fl = len + f * batch;
    bool one_hot = !weighted;  // every bag holds one id: the scores are the norms
    for (int64_t b = 0; b < batch; ++b) one_hot &= fl[b] == 1;
    if (one_hot) {
      std::copy(fn, fn + batch, out + pos);
      pos += batch;
    } else {
      for (int64_t b = 0; b < batch; ++b) {
        for (int64_t k = 0; k < fl[b]; ++k, ++pos) out[pos] = weighted ? fn[b] * std::fabs(w[pos]) : fn[b];
      }
    }
    // mean 1 per feature: four partial sums keep the adds pipelined; then one multiply each
    double part[4] = {0.0, 0.0, 0.0, 0.0};
    int64_t i = start;
    for (; i + 4 <= pos; i += 4) {
      for (int j = 0; j < 4; ++j) part[j] += out[i + j];
    }
    for (; i < pos; ++i) part[0] += out[i];
    const int64_t n = pos - start;
    const float mean = n ? static_cast<float>(((part[0] + part[1]) + (part[2] + part[3])) / n) : 0.0f;
    const float inverse = mean > 0.0f ? 1.0f / mean : 0.0f;
    if (std::isfinite(inverse)) {
      for (i = start; i < pos; ++i) out[i] *= inverse;
    } else {  // a denormal mean
      for (i = start; i < pos; ++i) out[i] /= mean;
    }
  }
  return scores;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cafe, m) {
  m.def("occurrence_scores(Tensor grad, int column, int num_features, int dim, Tensor lengths, Tensor weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(cafe, CPU, m) { m.impl("occurrence_scores", &occurrence_scores); }
