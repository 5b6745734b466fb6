// HotSketch insert and query on CPU: the semantics of torch_kernel.py, without sorting.
// Phase A touches each occurrence's bucket once (one cache line at 4 slots); only the keys
// that miss are coalesced, through a small open-addressing map.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace {

using cafe::kEmptyKey;
using cafe::kNoRow;
using cafe::mix64;
using cafe::Slot;
using cafe::slots_of;
constexpr int32_t kCandidate = -2;  // transient mark during one insert: promotion candidate
constexpr float kFloatMax = std::numeric_limits<float>::max();

inline bool valid_score(float v) { return std::isfinite(v) && v >= 0.0f; }

// Open-addressing map key -> index of its first miss, at most ~2/3 full. An entry holds key
// and index side by side (one cache line per probe); the table is thread-local and keeps its
// capacity, so a step neither allocates nor faults in fresh pages.
class MissIndex {
 public:
  explicit MissIndex(int64_t n) : table_(storage()) {
    uint64_t size = 16;
    while (size < static_cast<uint64_t>(n + n / 2)) size <<= 1;
    table_.assign(size, Entry{kEmptyKey, 0});
    mask_ = size - 1;
  }
  // Index of key; if absent, stores next and sets *added.
  int32_t find_or_add(int64_t key, int32_t next, bool* added) {
    uint64_t i = (static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ULL >> 20) & mask_;
    while (table_[i].key != kEmptyKey) {
      if (table_[i].key == key) { *added = false; return table_[i].index; }
      i = (i + 1) & mask_;
    }
    table_[i] = Entry{key, next};
    *added = true;
    return next;
  }

 private:
  struct Entry {
    int64_t key;
    int32_t index;
  };
  static std::vector<Entry>& storage() { thread_local std::vector<Entry> table; return table; }
  std::vector<Entry>& table_;
  uint64_t mask_;
};

at::Tensor to_tensor(const std::vector<int64_t>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sketch_insert(
    at::Tensor slots_t, at::Tensor free_rows, at::Tensor free_count, at::Tensor total_score,
    const at::Tensor& in_keys, const at::Tensor& in_scores, const at::Tensor& in_hints, int64_t c,
    double threshold_d, double decay_d, double trigger, int64_t seed) {
  Slot* slots = slots_of(slots_t, c);
  TORCH_CHECK(free_rows.is_contiguous() && free_rows.scalar_type() == at::kInt, "free_rows: int32");
  TORCH_CHECK(free_count.scalar_type() == at::kLong && free_count.numel() == 1, "free_count: int64 [1]");
  TORCH_CHECK(total_score.scalar_type() == at::kDouble && total_score.numel() == 1, "total_score: float64 [1]");
  TORCH_CHECK(in_keys.dim() == 1 && in_keys.scalar_type() == at::kLong, "keys: 1-D int64");
  TORCH_CHECK(in_scores.dim() == 1 && in_scores.scalar_type() == at::kFloat, "scores: 1-D float32");
  TORCH_CHECK(in_keys.numel() == in_scores.numel(), "keys and scores differ in length");
  const at::Tensor ik = in_keys.contiguous();
  const at::Tensor is = in_scores.contiguous();
  const at::Tensor ih = in_hints.contiguous();
  const int64_t n = ik.numel();
  TORCH_CHECK(ih.numel() == 0 || (ih.numel() == n && ih.scalar_type() == at::kLong), "hints: int64 [N] or empty");
  const int64_t* hints = ih.numel() ? ih.data_ptr<int64_t>() : nullptr;
  const int64_t* k = ik.data_ptr<int64_t>();
  const float* s = is.data_ptr<float>();
  int32_t* fr = free_rows.data_ptr<int32_t>();
  int64_t& fc = *free_count.data_ptr<int64_t>();
  double& total = *total_score.data_ptr<double>();
  const int64_t w = slots_t.size(0) / c;
  const float threshold = static_cast<float>(threshold_d);
  const float decay = static_cast<float>(decay_d);
  int64_t sign = 0;  // OR of all keys: negative iff some key is
  for (int64_t i = 0; i < n; ++i) sign |= k[i];
  TORCH_CHECK(sign >= 0, "keys must be non-negative 63-bit hashes");

  std::vector<int64_t> demoted_keys, demoted_rows;
  int64_t decayed = 0;
  if (total > trigger) {
    decayed = 1;
    for (int64_t j = 0; j < w * c; ++j) {
      Slot& sl = slots[j];
      const float d = sl.score * decay;
      if (sl.row != kNoRow && d < threshold) {
        demoted_keys.push_back(sl.key);
        demoted_rows.push_back(sl.row);
        fr[fc++] = sl.row;
        sl.row = kNoRow;
      }
      sl.score = d;
    }
    total = 0.0;
  }

  // phase A: present keys add their scores; misses are remembered for phase B. A valid hint
  // is the slot where the forward pass found the key (verified before use); other keys are
  // hashed kAhead positions early so their bucket can be prefetched.
  std::vector<int64_t> candidates;  // slot indices marked kCandidate
  std::vector<std::pair<int64_t, int64_t>> misses;  // (input position, bucket's first slot)
  const bool may_promote = fc > 0;
  const int64_t num_slots = w * c;
  int64_t skipped = 0;
  double batch_total = 0.0;
  constexpr int64_t kAhead = 8;
  int64_t ring[kAhead];  // bucket of key i, for keys without a usable hint
  auto has_hint = [&](int64_t i) { return hints && hints[i] >= 0 && hints[i] < num_slots; };
  auto stage = [&](int64_t i) {
    if (has_hint(i)) {
      __builtin_prefetch(slots + hints[i]);
    } else {
      ring[i % kAhead] = cafe::bounded(mix64(k[i], seed), w) * c;
      __builtin_prefetch(slots + ring[i % kAhead]);
    }
  };
  for (int64_t i = 0; i < std::min(kAhead, n); ++i) stage(i);
  for (int64_t i = 0; i < n; ++i) {
    const bool hinted = has_hint(i);
    const int64_t base = hinted ? -1 : ring[i % kAhead];
    if (i + kAhead < n) stage(i + kAhead);
    const float v = s[i];
    if (!valid_score(v)) { ++skipped; continue; }
    batch_total += static_cast<double>(v);
    Slot* hit = nullptr;
    if (hinted && slots[hints[i]].key == k[i]) {
      hit = slots + hints[i];
    } else {
      Slot* b = slots + (hinted ? cafe::bounded(mix64(k[i], seed), w) * c : base);
      for (int64_t j = 0; j < c; ++j) {
        if (b[j].key == k[i]) { hit = b + j; break; }
      }
      if (hit == nullptr) { misses.emplace_back(i, b - slots); continue; }
    }
    hit->score = std::min(hit->score + v, kFloatMax);
    if (may_promote && hit->row == kNoRow && hit->score >= threshold) {
      hit->row = kCandidate;
      candidates.push_back(hit - slots);
    }
  }
  total += batch_total;

  // phase B: coalesce the misses, place them in first-occurrence order
  MissIndex index(static_cast<int64_t>(misses.size()));
  std::vector<int64_t> ukeys, ubases;
  std::vector<float> usums;
  for (const auto& [i, base] : misses) {
    bool added;
    const int32_t u = index.find_or_add(k[i], static_cast<int32_t>(ukeys.size()), &added);
    if (added) { ukeys.push_back(k[i]); ubases.push_back(base); usums.push_back(s[i]); }
    else { usums[u] += s[i]; }
  }
  int64_t dropped = 0;
  for (size_t u = 0; u < ukeys.size(); ++u) {
    if (u + kAhead < ukeys.size()) __builtin_prefetch(slots + ubases[u + kAhead]);
    Slot* b = slots + ubases[u];
    int64_t empty = -1, victim = -1;
    for (int64_t j = 0; j < c; ++j) {
      if (b[j].key == kEmptyKey) { empty = j; break; }
      if (b[j].row < 0 && (victim < 0 || b[j].score < b[victim].score)) victim = j;
    }
    if (empty >= 0) {
      b[empty] = Slot{ukeys[u], usums[u], kNoRow};
    } else if (victim >= 0) {
      b[victim] = Slot{ukeys[u], std::min(b[victim].score + usums[u], kFloatMax), kNoRow};
    } else {
      ++dropped;
    }
  }

  // promotions in slot order; a replaced candidate lost its mark in phase B
  std::sort(candidates.begin(), candidates.end());
  std::vector<int64_t> promoted_keys, promoted_rows;
  for (int64_t j : candidates) {
    if (slots[j].row != kCandidate) continue;
    if (fc > 0) {
      slots[j].row = fr[--fc];
      promoted_keys.push_back(slots[j].key);
      promoted_rows.push_back(slots[j].row);
    } else {
      slots[j].row = kNoRow;
    }
  }
  at::Tensor counts = at::empty({3}, at::kLong);
  counts.data_ptr<int64_t>()[0] = skipped;
  counts.data_ptr<int64_t>()[1] = dropped;
  counts.data_ptr<int64_t>()[2] = decayed;
  return {to_tensor(promoted_keys), to_tensor(promoted_rows), to_tensor(demoted_keys),
          to_tensor(demoted_rows), counts};
}

std::tuple<at::Tensor, at::Tensor> sketch_query(const at::Tensor& slots_t, const at::Tensor& in_keys,
                                                int64_t c, double medium_threshold_d, int64_t seed) {
  const Slot* slots = slots_of(slots_t, c);
  TORCH_CHECK(in_keys.dim() == 1 && in_keys.scalar_type() == at::kLong, "keys: 1-D int64");
  const at::Tensor ik = in_keys.contiguous();
  const int64_t n = ik.numel();
  const int64_t w = slots_t.size(0) / c;
  const int64_t* k = ik.data_ptr<int64_t>();
  const float medium = static_cast<float>(medium_threshold_d);
  at::Tensor rows = at::empty({n}, ik.options());
  at::Tensor is_medium = at::empty({n}, ik.options().dtype(at::kBool));
  int64_t* r = rows.data_ptr<int64_t>();
  bool* m = is_medium.data_ptr<bool>();
  at::parallel_for(0, n, 8192, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Slot* b = slots + cafe::bounded(mix64(k[i], seed), w) * c;
      r[i] = kNoRow;
      m[i] = false;
      for (int64_t j = 0; j < c; ++j) {
        if (b[j].key == k[i]) {
          r[i] = b[j].row;
          m[i] = b[j].row == kNoRow && b[j].score >= medium;
          break;
        }
      }
    }
  });
  return {rows, is_medium};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cafe, m) {
  m.def("sketch_insert(Tensor(a!) slots, Tensor(b!) free_rows, Tensor(c!) free_count, "
        "Tensor(d!) total_score, Tensor keys, Tensor scores, Tensor hints, int slots_per_bucket, float threshold, "
        "float decay, float decay_trigger, int seed) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("sketch_query(Tensor slots, Tensor keys, int slots_per_bucket, float medium_threshold, "
        "int seed) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cafe, CPU, m) {
  m.impl("sketch_insert", &sketch_insert);
  m.impl("sketch_query", &sketch_query);
}
