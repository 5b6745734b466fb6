// The CPU hot path of the remap, fused: ids prepared (reordered, pre-hashed into keys) in one pass, and keys -> rows in one pass
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


// A KJT's ids prepared for the inner collection in one pass (FeatureMap.prepare on CPU): output
// feature j is input feature order[j] (length_per_key[order[j]] ids from its offset), each id
// pre-hashed into its key, ((mix64(id, salts[j]) >> slot_bits) << slot_bits) | table_slots[j], where
// modulus[j] is 0 (a CAFE group's feature), else id mod modulus[j] in [0, modulus[j]) (a plain
// table's, torch.remainder's sign). int32 ids are read as they are (sign-extended), so they give
// what the same int64 ids give, without a copy; the output is int64, feature after feature.
template <typename Id>
void prepare_ids_from(const Id* in, int64_t* out, int64_t total, const int64_t* lpk, int64_t in_features,
                      const int64_t* order, const int64_t* salts, const int64_t* slots, const int64_t* modulus,
                      int64_t out_features, int64_t slot_bits) {
  std::vector<int64_t> offsets(static_cast<size_t>(in_features) + 1, 0);
  for (int64_t f = 0; f < in_features; ++f) offsets[f + 1] = offsets[f] + lpk[f];
  TORCH_CHECK(offsets[in_features] == total, "length_per_key does not cover the values");
  TORCH_CHECK(out_features == in_features, "order must name every input feature once");
  std::vector<bool> seen(static_cast<size_t>(in_features), false);
  int64_t pos = 0;
  for (int64_t j = 0; j < out_features; ++j) {
    const int64_t f = order[j];
    TORCH_CHECK(f >= 0 && f < in_features && !seen[f], "order must name every input feature once");
    seen[f] = true;
    const Id* src = in + offsets[f];
    int64_t* dst = out + pos;
    const int64_t n = lpk[f], salt = salts[j], slot = slots[j], m = modulus[j];
    if (m == 0) {
      for (int64_t i = 0; i < n; ++i) dst[i] = ((mix64(static_cast<int64_t>(src[i]), salt) >> slot_bits) << slot_bits) | slot;
    } else {
      TORCH_CHECK(m > 0, "modulus must be >= 0");
      for (int64_t i = 0; i < n; ++i) {
        const int64_t r = static_cast<int64_t>(src[i]) % m;
        dst[i] = r < 0 ? r + m : r;
      }
    }
    pos += n;
  }
}

at::Tensor prepare_ids(const at::Tensor& values, const at::Tensor& length_per_key, const at::Tensor& order,
                       const at::Tensor& salts, const at::Tensor& table_slots, const at::Tensor& modulus,
                       int64_t slot_bits) {
  TORCH_CHECK(values.dim() == 1 && (values.scalar_type() == at::kLong || values.scalar_type() == at::kInt),
              "values: 1-D int32 or int64");
  const at::Tensor v = values.contiguous();
  const at::Tensor lpk = length_per_key.to(at::kLong).contiguous();
  const at::Tensor ord = order.to(at::kLong).contiguous();
  const at::Tensor sa = salts.to(at::kLong).contiguous();
  const at::Tensor sl = table_slots.to(at::kLong).contiguous();
  const at::Tensor mo = modulus.to(at::kLong).contiguous();
  TORCH_CHECK(ord.numel() == sa.numel() && sa.numel() == sl.numel() && sl.numel() == mo.numel(),
              "one order entry, salt, table slot and modulus per output feature");
  at::Tensor out = at::empty({v.numel()}, v.options().dtype(at::kLong));
  const auto run = [&](const auto* in) {
    prepare_ids_from(in, out.data_ptr<int64_t>(), v.numel(), lpk.data_ptr<int64_t>(), lpk.numel(),
                     ord.data_ptr<int64_t>(), sa.data_ptr<int64_t>(), sl.data_ptr<int64_t>(), mo.data_ptr<int64_t>(),
                     ord.numel(), slot_bits);
  };
  if (v.scalar_type() == at::kInt) {
    run(v.data_ptr<int32_t>());
  } else {
    run(v.data_ptr<int64_t>());
  }
  return out;
}

// How a key names its table slot and hashed rows (cafe_torchrec.hashing: SLOT_MASK, LEVEL_MULTIPLIERS).
struct KeyFormat {
  int64_t slot_mask, level1, level2;
};

// Where remap_lookup writes each key's rows (l2 and m are null when single-level).
struct LookupOut {
  int64_t* p;
  int64_t* l2;
  bool* m;
  int32_t* h;
};

// Rows of keys [begin, limit), run by run of one table (the KJT layout), adding per-table
// lookups, hot and medium lookups into counts [T, 3]. The body is branch-free (hot or not is a
// coin flip no predictor learns).
template <int64_t C, bool kMultiLevel>
void lookup_range(const Slot* slots, const int64_t* keys, int64_t begin, int64_t limit, int64_t w, int64_t c,
                  int64_t multiplier, KeyFormat format, const int64_t* regions, int64_t tables,
                  float medium_threshold, LookupOut out, int64_t* counts) {
  cafe::ProbeRing ring(keys, begin, limit, multiplier, w, c);
  const int64_t slots_per_bucket = C > 0 ? C : c;
  for (int64_t start = begin, end; start < limit; start = end) {
    const int64_t t = keys[start] & format.slot_mask;
    TORCH_CHECK(t < tables, "key names table slot ", t, " but the group has ", tables);
    for (end = start + 1; end < limit && (keys[end] & format.slot_mask) == t; ++end) {}
    const int64_t* region = regions + 4 * t;
    const int64_t off1 = region[0], rows1 = region[1], off2 = region[2], rows2 = region[3];
    int64_t hot_count = 0, medium_count = 0;
    ring.run<C>(slots, start, end, [&](int64_t i, int64_t key, int64_t base, int64_t j) __attribute__((always_inline)) {
      const bool found = j < slots_per_bucket;
      const Slot slot = slots[base + (found ? j : 0)];
      const bool hot = found & (slot.row >= 0);
      out.h[i] = static_cast<int32_t>(cafe::select(found, base + j, -1));
      out.p[i] = cafe::select(hot, cafe::row_of(slot.row), off1 + cafe::bounded(cafe::fold(key, format.level1), rows1));
      hot_count += hot;
      if constexpr (kMultiLevel) {
        const bool med = found & cafe::confirmed_cold(slot.row) & (cafe::estimate(slot) >= medium_threshold);
        out.l2[i] = off2 + cafe::bounded(cafe::fold(key, format.level2), rows2);
        out.m[i] = med;
        medium_count += med;
      }
    });
    counts[3 * t] += end - start;
    counts[3 * t + 1] += hot_count;
    counts[3 * t + 2] += medium_count;
  }
}

// All keys, split into contiguous ranges across the intra-op threads, which the TBE lookup of one
// physical table leaves idle. Each range counts into its own [T, 3] array; they are summed into
// stats (if given) in range order.
template <int64_t C, bool kMultiLevel>
void lookup_all(const Slot* slots, const int64_t* keys, int64_t n, int64_t w, int64_t c, int64_t multiplier,
                KeyFormat format, const int64_t* regions, int64_t tables, float medium_threshold, LookupOut out,
                int64_t* stats) {
  constexpr int64_t kGrain = 16384;
  const int64_t ranges = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n / kGrain));
  std::vector<int64_t> counts(static_cast<size_t>(ranges * 3 * tables), 0);
  at::parallel_for(0, ranges, 1, [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      lookup_range<C, kMultiLevel>(slots, keys, n * r / ranges, n * (r + 1) / ranges, w, c, multiplier, format, regions,
                                   tables, medium_threshold, out, counts.data() + r * 3 * tables);
    }
  });
  if (stats == nullptr) return;
  for (int64_t r = 0; r < ranges; ++r) {
    for (int64_t x = 0; x < 3 * tables; ++x) stats[x] += counts[r * 3 * tables + x];
  }
}

// primary row (hot row, else level-1 row), level-2 row and medium mask (both empty when single
// level), and the slot holding each key (-1 if absent: a hint for the insert in backward);
// stats [T, 3] += lookups, hot, medium.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> remap_lookup(
    const at::Tensor& slots_t, const at::Tensor& keys_t, const at::Tensor& regions_t, int64_t c,
    double medium_threshold_d, int64_t multiplier, int64_t slot_bits, int64_t level1_multiplier,
    int64_t level2_multiplier, bool multi_level, at::Tensor stats_t) {
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
  const LookupOut out{primary.data_ptr<int64_t>(), multi_level ? level2.data_ptr<int64_t>() : nullptr,
                      multi_level ? medium.data_ptr<bool>() : nullptr, hint.data_ptr<int32_t>()};
  const KeyFormat format{(int64_t{1} << slot_bits) - 1, level1_multiplier, level2_multiplier};
  const auto run = [&](auto all) {
    all(slots, keys, n, w, c, multiplier, format, regions, tables, medium_threshold, out, stats);
  };
  if (c == 4) {
    multi_level ? run(lookup_all<4, true>) : run(lookup_all<4, false>);
  } else {
    multi_level ? run(lookup_all<0, true>) : run(lookup_all<0, false>);
  }
  return {primary, level2, medium, hint};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cafe, m) {
  m.def("prepare_ids(Tensor values, Tensor length_per_key, Tensor order, Tensor salts, Tensor table_slots, "
        "Tensor modulus, int slot_bits) -> Tensor");
  m.def("remap_lookup(Tensor slots, Tensor keys, Tensor regions, int slots_per_bucket, float medium_threshold, "
        "int multiplier, int slot_bits, int level1_multiplier, int level2_multiplier, bool multi_level, "
        "Tensor(a!) stats) "
        "-> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cafe, CPU, m) {
  m.impl("prepare_ids", &prepare_ids);
  m.impl("remap_lookup", &remap_lookup);
}
