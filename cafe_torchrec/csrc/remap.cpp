// The CPU hot path of the remap, fused: pre-hash ids into keys, and keys -> rows in one pass
// (sketch probe, hashed rows, medium mask, per-table lookup counts).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

using cafe::kNoRow;
using cafe::mix64;
using cafe::Slot;

constexpr int64_t kSlotBits = 15;
constexpr int64_t kSlotMask = (1 << kSlotBits) - 1;
constexpr int64_t kLevel1Seed = 101;
constexpr int64_t kLevel2Seed = 202;

// keys of values laid out feature by feature (length_per_key[f] values of feature f)
at::Tensor make_keys(const at::Tensor& values, const at::Tensor& length_per_key, const at::Tensor& salts,
                     const at::Tensor& table_slots) {
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kLong, "values: 1-D int64");
  const at::Tensor v = values.contiguous();
  const at::Tensor lpk = length_per_key.to(at::kLong).contiguous();
  const at::Tensor sa = salts.to(at::kLong).contiguous();
  const at::Tensor sl = table_slots.to(at::kLong).contiguous();
  TORCH_CHECK(lpk.numel() == sa.numel() && sa.numel() == sl.numel(), "one salt and slot per feature");
  at::Tensor keys = at::empty_like(v);
  const int64_t* in = v.data_ptr<int64_t>();
  int64_t* out = keys.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t f = 0; f < lpk.numel(); ++f) {
    const int64_t n = lpk.data_ptr<int64_t>()[f], salt = sa.data_ptr<int64_t>()[f], slot = sl.data_ptr<int64_t>()[f];
    TORCH_CHECK(start + n <= v.numel(), "length_per_key exceeds the values");
    for (int64_t i = start; i < start + n; ++i) out[i] = ((mix64(in[i], salt) >> kSlotBits) << kSlotBits) | slot;
    start += n;
  }
  TORCH_CHECK(start == v.numel(), "length_per_key does not cover the values");
  return keys;
}

// The slot of `key` in the bucket starting at `base`, or -1. With the bucket size known at
// compile time the probe is branch-free (keys are unique within a bucket).
template <int64_t C>
inline int64_t find_slot(const Slot* slots, int64_t base, int64_t c, int64_t key) {
  int64_t found = -1;
  if constexpr (C > 0) {
    for (int64_t j = C - 1; j >= 0; --j) found = slots[base + j].key == key ? base + j : found;
  } else {
    for (int64_t j = base; j < base + c; ++j) {
      if (slots[j].key == key) { found = j; break; }
    }
  }
  return found;
}

// The probe loop of remap_lookup; C is the bucket size when known at compile time, else 0.
template <int64_t C>
void lookup_loop(const Slot* slots, const int64_t* keys, int64_t n, int64_t w, int64_t c, int64_t seed,
                 const int64_t* regions, int64_t tables, float medium_threshold, int64_t* p, int64_t* l2,
                 bool* m, int64_t* h, int64_t* stats) {
  // each key's bucket is hashed kAhead keys early, so the probe finds it prefetched
  constexpr int64_t kAhead = 8;
  int64_t ring[kAhead];
  auto stage = [&](int64_t i) {
    ring[i % kAhead] = cafe::bounded(mix64(keys[i], seed), w) * c;
    __builtin_prefetch(slots + ring[i % kAhead]);
  };
  for (int64_t i = 0; i < std::min(kAhead, n); ++i) stage(i);
  // per-table counts are kept in registers while keys of one table run (the common layout)
  int64_t run_table = -1, lookups = 0, hot_lookups = 0, medium_lookups = 0;
  auto flush = [&]() {
    if (stats != nullptr && run_table >= 0) {
      stats[3 * run_table] += lookups;
      stats[3 * run_table + 1] += hot_lookups;
      stats[3 * run_table + 2] += medium_lookups;
    }
    lookups = hot_lookups = medium_lookups = 0;
  };
  for (int64_t i = 0; i < n; ++i) {
    const int64_t base = ring[i % kAhead];
    if (i + kAhead < n) stage(i + kAhead);
    const int64_t key = keys[i], t = key & kSlotMask;
    if (t != run_table) {
      TORCH_CHECK(t < tables, "key names table slot ", t, " but the group has ", tables);
      flush();
      run_table = t;
    }
    const int64_t* reg = regions + 4 * t;
    const int64_t found = find_slot<C>(slots, base, c, key);
    const Slot& slot = slots[found >= 0 ? found : base];
    const bool hot = found >= 0 && slot.row >= 0;
    const bool med = found >= 0 && !hot && slot.score >= medium_threshold;
    const int64_t level1 = reg[0] + cafe::bounded(mix64(key, kLevel1Seed), reg[1]);
    h[i] = found;
    p[i] = hot ? slot.row : level1;
    if (l2 != nullptr) l2[i] = reg[2] + cafe::bounded(mix64(key, kLevel2Seed), reg[3]);
    m[i] = med;
    lookups += 1;
    hot_lookups += hot;
    medium_lookups += med;
  }
  flush();
}

// primary row (hot row, else level-1 row), level-2 row, medium mask, and the slot holding each
// key (-1 if absent: a hint for the insert in backward); stats [T, 3] += lookups, hot, medium.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> remap_lookup(
    const at::Tensor& slots_t, const at::Tensor& keys_t, const at::Tensor& regions_t, int64_t c,
    double medium_threshold_d, int64_t seed, bool multi_level, at::Tensor stats_t) {
  const Slot* slots = cafe::slots_of(slots_t, c);
  TORCH_CHECK(keys_t.dim() == 1 && keys_t.scalar_type() == at::kLong, "keys: 1-D int64");
  TORCH_CHECK(regions_t.dim() == 2 && regions_t.size(1) == 4 && regions_t.scalar_type() == at::kLong,
              "regions: int64 [T, 4]");
  const at::Tensor keys_c = keys_t.contiguous();
  const at::Tensor regions_c = regions_t.contiguous();
  const int64_t n = keys_c.numel(), w = slots_t.size(0) / c, tables = regions_c.size(0);
  const bool count = stats_t.numel() > 0;
  TORCH_CHECK(!count || (stats_t.is_contiguous() && stats_t.scalar_type() == at::kLong && stats_t.numel() == 3 * tables),
              "stats: int64 [T, 3]");
  const int64_t* keys = keys_c.data_ptr<int64_t>();
  const int64_t* regions = regions_c.data_ptr<int64_t>();
  int64_t* stats = count ? stats_t.data_ptr<int64_t>() : nullptr;
  const float medium_threshold = static_cast<float>(medium_threshold_d);
  at::Tensor primary = at::empty({n}, keys_c.options());
  at::Tensor level2 = at::empty({multi_level ? n : 0}, keys_c.options());
  at::Tensor medium = at::empty({n}, keys_c.options().dtype(at::kBool));
  at::Tensor hint = at::empty({n}, keys_c.options());
  int64_t* p = primary.data_ptr<int64_t>();
  int64_t* l2 = multi_level ? level2.data_ptr<int64_t>() : nullptr;
  bool* m = medium.data_ptr<bool>();
  int64_t* h = hint.data_ptr<int64_t>();
  if (c == 4) {
    lookup_loop<4>(slots, keys, n, w, c, seed, regions, tables, medium_threshold, p, l2, m, h, stats);
  } else {
    lookup_loop<0>(slots, keys, n, w, c, seed, regions, tables, medium_threshold, p, l2, m, h, stats);
  }
  return {primary, level2, medium, hint};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cafe, m) {
  m.def("make_keys(Tensor values, Tensor length_per_key, Tensor salts, Tensor table_slots) -> Tensor");
  m.def("remap_lookup(Tensor slots, Tensor keys, Tensor regions, int slots_per_bucket, float medium_threshold, "
        "int seed, bool multi_level, Tensor(a!) stats) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cafe, CPU, m) {
  m.impl("make_keys", &make_keys);
  m.impl("remap_lookup", &remap_lookup);
}
