// Per-occurrence importance in one pass: bag gradient norms, times |per-sample weight|,
// normalised per feature to mean 1 (the twin of cafe_torchrec.importance.occurrence_scores).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

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
  std::vector<float> norms(num_features * batch);
  for (int64_t b = 0; b < batch; ++b) {
    const float* row = g + b * cols + column;
    for (int64_t f = 0; f < num_features; ++f) {
      float sq = 0.0f;
      for (int64_t d = 0; d < dim; ++d) sq += row[f * dim + d] * row[f * dim + d];
      norms[f * batch + b] = std::sqrt(sq);
    }
  }
  int64_t pos = 0;
  for (int64_t f = 0; f < num_features; ++f) {
    const int64_t start = pos;
    double sum = 0.0;
    for (int64_t b = 0; b < batch; ++b) {
      const float norm = norms[f * batch + b];
      for (int64_t k = 0; k < len[f * batch + b]; ++k, ++pos) {
        const float s = weighted ? norm * std::fabs(w[pos]) : norm;
        out[pos] = s;
        sum += s;
      }
    }
    const int64_t n = pos - start;
    const float mean = n ? static_cast<float>(sum / n) : 0.0f;
    for (int64_t i = start; i < pos; ++i) out[i] = mean > 0.0f ? out[i] / mean : 0.0f;
  }
  return scores;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cafe, m) {
  m.def("occurrence_scores(Tensor grad, int column, int num_features, int dim, Tensor lengths, Tensor weights) -> Tensor");
}

TORCH_LIBRARY_IMPL(cafe, CPU, m) { m.impl("occurrence_scores", &occurrence_scores); }
