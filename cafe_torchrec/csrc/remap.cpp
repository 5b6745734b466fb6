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

using cafe::mix64;
using cafe::Slot;

constexpr int64_t kSlotBits = 15;
constexpr int64_t kSlotMask = (1 << kSlotBits) - 1;
// the multipliers of the level-1 and level-2 hashed rows (cafe_torchrec.remap's twins)
constexpr int64_t kLevel1Multiplier = cafe::odd_multiplier(101);
constexpr int64_t kLevel2Multiplier = cafe::odd_multiplier(202);

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

// Rows of one run of keys of table `t` in [begin, end): the probe loop of remap_lookup. Each
// key's bucket is computed and prefetched kAhead keys early and kept in a small ring until
// probed (an [N] array of them was ~1.7 MB of extra memory traffic per batch); the body is
// branch-free (hot or not is a coin flip no predictor learns). C is the bucket size when known
// at compile time, else 0.
constexpr int64_t kAhead = 32;
constexpr int64_t kRingMask = 63;  // a ring of 64 >= kAhead bucket indices, in L1
static_assert(kRingMask + 1 >= kAhead, "the ring holds the keys in flight");

template <int64_t C, bool kMultiLevel>
void lookup_run(const Slot* slots, const int64_t* keys, int64_t n, int64_t w, int64_t multiplier, int64_t* ring,
                int64_t begin, int64_t end, int64_t c, const int64_t* region, float medium_threshold, int64_t* p,
                int64_t* l2, bool* m, int32_t* h, int64_t* hot_lookups, int64_t* medium_lookups) {
  const int64_t off1 = region[0], rows1 = region[1], off2 = region[2], rows2 = region[3];
  const int64_t slots_per_bucket = C > 0 ? C : c;
  int64_t hot_count = 0, medium_count = 0;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t ahead = i + kAhead;
    const int64_t next = ahead < n ? cafe::bucket_base(keys[ahead], multiplier, w, c) : 0;
    __builtin_prefetch(slots + next);
    const int64_t key = keys[i], base = ring[i & kRingMask];
    ring[ahead & kRingMask] = next;
    const int64_t j = C > 0 ? cafe::find4(slots + base, key) : cafe::find_any(slots + base, c, key);
    const bool found = j < slots_per_bucket;
    const Slot slot = slots[base + (found ? j : 0)];
    const bool hot = found & (slot.row >= 0);
    h[i] = static_cast<int32_t>(cafe::select(found, base + j, -1));
    p[i] = cafe::select(hot, slot.row, off1 + cafe::bounded(cafe::fold(key, kLevel1Multiplier), rows1));
    hot_count += hot;
    if constexpr (kMultiLevel) {
      const bool med = found & cafe::confirmed_cold(slot.row) & (cafe::estimate(slot) >= medium_threshold);
      l2[i] = off2 + cafe::bounded(cafe::fold(key, kLevel2Multiplier), rows2);
      m[i] = med;
      medium_count += med;
    }
  }
  *hot_lookups += hot_count;
  *medium_lookups += medium_count;
}

template <int64_t C, bool kMultiLevel>
void lookup_loop(const Slot* slots, const int64_t* keys, int64_t n, int64_t w, int64_t c, int64_t multiplier,
                 const int64_t* regions, int64_t tables, float medium_threshold, int64_t* p, int64_t* l2,
                 bool* m, int32_t* h, int64_t* stats) {
  int64_t ring[kRingMask + 1];  // the buckets of keys i .. i + kAhead - 1, at index & kRingMask
  for (int64_t i = 0; i < std::min(n, kAhead); ++i) ring[i] = cafe::bucket_base(keys[i], multiplier, w, c);
  int64_t counts[3] = {0, 0, 0};
  for (int64_t begin = 0, end; begin < n; begin = end) {  // runs of one table (the KJT layout)
    const int64_t t = keys[begin] & kSlotMask;
    TORCH_CHECK(t < tables, "key names table slot ", t, " but the group has ", tables);
    for (end = begin + 1; end < n && (keys[end] & kSlotMask) == t; ++end) {}
    int64_t* count = stats != nullptr ? stats + 3 * t : counts;
    count[0] += end - begin;
    lookup_run<C, kMultiLevel>(slots, keys, n, w, multiplier, ring, begin, end, c, regions + 4 * t, medium_threshold,
                               p, l2, m, h, count + 1, count + 2);
  }
}

// primary row (hot row, else level-1 row), level-2 row and medium mask (both empty when single
// level), and the slot holding each key (-1 if absent: a hint for the insert in backward);
// stats [T, 3] += lookups, hot, medium.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> remap_lookup(
    const at::Tensor& slots_t, const at::Tensor& keys_t, const at::Tensor& regions_t, int64_t c,
    double medium_threshold_d, int64_t multiplier, bool multi_level, at::Tensor stats_t) {
  const Slot* slots = cafe::slots_of(slots_t, c);
  TORCH_CHECK(slots_t.size(0) <= INT32_MAX, "a sketch of at most 2^31 - 1 slots (hints are int32)");
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
  at::Tensor medium = at::empty({multi_level ? n : 0}, keys_c.options().dtype(at::kBool));
  at::Tensor hint = at::empty({n}, keys_c.options().dtype(at::kInt));  // int32: half the traffic of int64
  int64_t* p = primary.data_ptr<int64_t>();
  int64_t* l2 = multi_level ? level2.data_ptr<int64_t>() : nullptr;
  bool* m = multi_level ? medium.data_ptr<bool>() : nullptr;
  int32_t* h = hint.data_ptr<int32_t>();
  const auto run = [&](auto loop) { loop(slots, keys, n, w, c, multiplier, regions, tables, medium_threshold, p, l2, m, h, stats); };
  if (c == 4) {
    multi_level ? run(lookup_loop<4, true>) : run(lookup_loop<4, false>);
  } else {
    multi_level ? run(lookup_loop<0, true>) : run(lookup_loop<0, false>);
  }
  return {primary, level2, medium, hint};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cafe, m) {
  m.def("make_keys(Tensor values, Tensor length_per_key, Tensor salts, Tensor table_slots) -> Tensor");
  m.def("remap_lookup(Tensor slots, Tensor keys, Tensor regions, int slots_per_bucket, float medium_threshold, "
        "int multiplier, bool multi_level, Tensor(a!) stats) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cafe, CPU, m) {
  m.impl("make_keys", &make_keys);
  m.impl("remap_lookup", &remap_lookup);
}
