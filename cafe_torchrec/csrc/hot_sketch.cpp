// HotSketch insert and query on CPU: the semantics of torch_kernel.py, without sorting.
// Phase A touches each occurrence's slot once (through the forward's hint when it still holds
// the key's tag, else by probing one bucket of 48 bytes at 4 slots); only the keys that miss are
// coalesced, through a small open-addressing map.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#include <xmmintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using cafe::cold_word;
using cafe::kAhead;
using cafe::kCandidateBit;
using cafe::kColdWord;
using cafe::kEmptyTag;
using cafe::kHitBit;
using cafe::kNewcomerBit;
using cafe::kNoRow;
using cafe::kReservedBit;
using cafe::row_of;
using cafe::Slot;
using cafe::slots_of;
using cafe::tag_of;
constexpr float kFloatMax = std::numeric_limits<float>::max();
constexpr float kMarkMax = 65504.0f;  // the largest finite float16: a stale mark's ceiling

inline uint32_t bits_of(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
}
inline float float_of(uint32_t bits) {
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}

// A bucket's first empty slot and its minimum-score non-hot slot (lowest index on ties), each
// c if none, without a branch: choices are bit masks, which GCC keeps as such where it turns
// a ?: into a branch.
inline std::pair<int64_t, int64_t> choose_any(const Slot* b, int64_t c) {
  int64_t empty = c, victim = c;
  uint32_t least = 0;  // the victim's score bits
  for (int64_t j = 0; j < c; ++j) {
    const int64_t take_empty = -static_cast<int64_t>((b[j].tag == kEmptyTag) & (empty == c));
    empty = (j & take_empty) | (empty & ~take_empty);
    const float score = b[j].score;
    const int64_t take = -static_cast<int64_t>((b[j].row < 0) & ((victim == c) | (score < float_of(least))));
    victim = (j & take) | (victim & ~take);
    least = (bits_of(score) & static_cast<uint32_t>(take)) | (least & ~static_cast<uint32_t>(take));
  }
  return {empty, victim};
}

// choose_any for a bucket of four: its 48 bytes as three SSE2 vectors, shuffled into tags,
// scores and row words, so each choice is four compares and a bit scan (choose_any itself
// where SSE2 is missing, e.g. on ARM: the same choices).
#if !defined(__SSE2__)
inline std::pair<int64_t, int64_t> choose4(const Slot* b) { return choose_any(b, 4); }
#else
inline std::pair<int64_t, int64_t> choose4(const Slot* b) {
  static_assert(sizeof(Slot) == 12 && offsetof(Slot, score) == 4 && offsetof(Slot, row) == 8, "slot layout");
  const float* f = reinterpret_cast<const float*>(b);
  // v0 = [t0 s0 r0 t1], v1 = [s1 r1 t2 s2], v2 = [r2 t3 s3 r3]
  const __m128 v0 = _mm_loadu_ps(f), v1 = _mm_loadu_ps(f + 4), v2 = _mm_loadu_ps(f + 8);
  const __m128 t23 = _mm_shuffle_ps(v1, v2, _MM_SHUFFLE(1, 1, 2, 2));
  const __m128 tag = _mm_shuffle_ps(v0, t23, _MM_SHUFFLE(2, 0, 3, 0));
  const __m128 score = _mm_shuffle_ps(_mm_shuffle_ps(v0, v1, _MM_SHUFFLE(0, 0, 1, 1)),
                                      _mm_shuffle_ps(v1, v2, _MM_SHUFFLE(2, 2, 3, 3)), _MM_SHUFFLE(2, 0, 2, 0));
  const __m128 row = _mm_shuffle_ps(_mm_shuffle_ps(v0, v1, _MM_SHUFFLE(1, 1, 2, 2)),
                                    _mm_shuffle_ps(v2, v2, _MM_SHUFFLE(3, 3, 0, 0)), _MM_SHUFFLE(2, 0, 2, 0));
  const __m128i is_empty = _mm_cmpeq_epi32(_mm_castps_si128(tag), _mm_setzero_si128());  // tag == kEmptyTag
  const __m128 cold = _mm_castsi128_ps(_mm_srai_epi32(_mm_castps_si128(row), 31));  // row word < 0
  // hot slots read as +inf; the minimum's lanes, masked to the cold ones, hold the victim
  const __m128 x = _mm_or_ps(_mm_and_ps(cold, score), _mm_andnot_ps(cold, _mm_set1_ps(INFINITY)));
  __m128 m = _mm_min_ps(x, _mm_shuffle_ps(x, x, _MM_SHUFFLE(2, 3, 0, 1)));
  m = _mm_min_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
  const int least = _mm_movemask_ps(_mm_cmpeq_ps(x, m)) & _mm_movemask_ps(cold);
  return {__builtin_ctz(_mm_movemask_ps(_mm_castsi128_ps(is_empty)) | 16), __builtin_ctz(least | 16)};
}
#endif

// finite and non-negative (NaN fails both compares)
inline bool valid_score(float v) { return v >= 0.0f && v <= kFloatMax; }

// Open-addressing map key -> index of its first miss, at most 2/3 full. An entry holds key,
// index and the stamp of the map that wrote it; the table is thread-local and keeps its
// capacity between calls, and a new map takes a new stamp, so entries of earlier calls read as
// empty and the table is not cleared per call (only when it grows or the stamp wraps).
class MissIndex {
 public:
  explicit MissIndex(int64_t n) {
    uint64_t size = 16;
    while (size < static_cast<uint64_t>(n + n / 2)) size <<= 1;
    Table& t = table();
    if (t.entries.size() < size || ++t.stamp == 0) {
      t.entries.assign(std::max<size_t>(size, t.entries.size()), Entry{-1, 0, 0});
      t.stamp = 1;
    }
    entries_ = t.entries.data();
    stamp_ = t.stamp;
    mask_ = size - 1;
  }
  uint64_t home(int64_t key) const { return (static_cast<uint64_t>(key) * 0x9E3779B97F4A7C15ULL >> 20) & mask_; }
  void prefetch(uint64_t home) const { __builtin_prefetch(entries_ + home); }
  // Index of key (probing from its home); if absent, stores and returns next (so the caller
  // knows it was added: every stored index is below next).
  int32_t find_or_add(int64_t key, uint64_t i, int32_t next) {
    Entry* t = entries_;
    while (t[i].stamp == stamp_) {
      if (t[i].key == key) return t[i].index;
      i = (i + 1) & mask_;
    }
    t[i] = Entry{key, next, stamp_};
    return next;
  }

 private:
  struct Entry {
    int64_t key;
    int32_t index;
    uint32_t stamp;
  };
  struct Table {
    std::vector<Entry> entries;
    uint32_t stamp = 0;
  };
  static Table& table() { thread_local Table t; return t; }
  Entry* entries_;
  uint32_t stamp_;
  uint64_t mask_;
};

// Keys are 63-bit hashes; a negative one is a caller's bug (ValueError in Python).
void check_non_negative(const int64_t* k, int64_t n) {
  int64_t sign = 0;  // OR of all keys: negative iff some key is
  for (int64_t i = 0; i < n; ++i) sign |= k[i];
  TORCH_CHECK_VALUE(sign >= 0, "keys must be non-negative 63-bit hashes (use cafe_torchrec.hashing.mix64)");
}

at::Tensor to_tensor(const std::vector<int64_t>& v) {
  at::Tensor t = at::empty({static_cast<int64_t>(v.size())}, at::kLong);
  std::copy(v.begin(), v.end(), t.data_ptr<int64_t>());
  return t;
}

// What phase A leaves for the rest of the insert: views into this thread's scratch buffers.
struct PhaseA {
  int64_t* candidates;  // slot << 32 | an input position holding its key, of the slots marked kCandidateBit
  int64_t num_candidates = 0;
  int64_t* miss_positions;  // input position of each occurrence whose key is absent
  int64_t* miss_bases;  // and its bucket's first slot
  int64_t num_misses = 0;
  int64_t skipped = 0;
  double batch_total = 0.0;
};

// The sum of the valid scores in float64, and how many scores are not valid. Four partial sums
// combined in a fixed order: one running sum would make the loop a chain of dependent
// additions. The order does not depend on the hints, so neither does the total.
std::pair<double, int64_t> valid_total(const float* s, int64_t n) {
  double part[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t valid = 0;
  const auto take = [&](int64_t i, int r) __attribute__((always_inline)) {
    const float v = s[i];
    const bool ok = valid_score(v);
    part[r] += ok ? static_cast<double>(v) : 0.0;  // + 0.0 keeps a sum that starts at +0.0
    valid += ok;
  };
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int r = 0; r < 4; ++r) take(i + r, r);
  }
  for (; i < n; ++i) take(i, static_cast<int>(i & 3));
  return {(part[0] + part[1]) + (part[2] + part[3]), n - valid};
}

// Phase A: present keys add their scores, in input order; misses are remembered for phase B.
// Pass 1 serves the occurrences whose hint (the slot the forward pass found the key in) still
// holds the key, branch-free: one prefetched direct access each (a miss adds 0 to a dummy slot).
// The other valid occurrences are queued for pass 2, which probes their buckets. All
// occurrences of one key share one hint, so each slot still sees its key's scores in input order.
// Candidates are found after both passes, among the slots they hit without a hot row (listed
// as they are hit, with the input position of the key, which a slot no longer holds; few, as
// most hits are hot): scores only grow in phase A, so a slot that ends it with estimate >=
// threshold is one that reached it; a slot with a reserved row is a candidate at any hit. The passes are compiled for each
// of: hints given or not (without them pass 1 only checks and queues), and rows free or not
// (without a free row no slot can become a candidate: nothing to list).
// The loops write raw scratch arrays and call nothing, so a step allocates nothing.
template <bool kHints, bool kPromote>
PhaseA phase_a(Slot* slots, int64_t num_slots, int64_t w, int64_t c, int64_t multiplier, const int64_t* k,
               const float* s, const int32_t* hints, int64_t n, float threshold) {
  int64_t* cold_hits = cafe::scratch(3, n + 1);  // slot << 32 | position, one per hit at most, and one written past
  int64_t num_cold_hits = 0;
  // Misses add to dummies (hot row 0: never listed) taken in turn, so that consecutive misses
  // do not chain through one slot's store and reload.
  constexpr int64_t kDummies = 8;
  Slot dummies[kDummies];
  for (Slot& d : dummies) d = Slot{kEmptyTag, 0.0f, 0};
  // always_inline: GCC kept the lambda as a call per occurrence. Branch-free: whether a hit
  // slot is hot is a coin flip no predictor learns.
  auto add = [&](Slot* t, int64_t j, int64_t i, float v) __attribute__((always_inline)) {  // t: slot j, or a dummy
    const int32_t row = cafe::hit_word(t->row);
    t->score = std::min(t->score + v, kFloatMax);
    t->row = row;
    if constexpr (kPromote) {
      cold_hits[num_cold_hits] = j << 32 | i;
      num_cold_hits += row < 0;
    }
  };
  int64_t* queue = cafe::scratch(1, n);
  int64_t queued = 0;
  if constexpr (kHints) {
    for (int64_t i = 0; i < n; ++i) {
      // a prefetch never faults, so a hint of -1 (absent) or one past the end may be prefetched
      if (i + kAhead < n) __builtin_prefetch(slots + hints[i + kAhead]);
      const float v = s[i];
      if (!valid_score(v)) continue;
      const int64_t h = hints[i];
      const bool in_range = static_cast<uint64_t>(h) < static_cast<uint64_t>(num_slots);
      const bool hit = in_range & (slots[in_range ? h : 0].tag == tag_of(k[i]));
      add(hit ? slots + h : dummies + (i & (kDummies - 1)), hit ? h : 0, i, hit ? v : 0.0f);
      queue[queued] = i;
      queued += !hit;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      queue[queued] = i;
      queued += valid_score(s[i]);
    }
  }
  int64_t* bases = cafe::scratch(2, queued + kAhead);
  for (int64_t q = 0; q < queued; ++q) bases[q] = cafe::bucket_base(k[queue[q]], multiplier, w, c);
  for (int64_t q = queued; q < queued + kAhead; ++q) bases[q] = 0;
  int64_t misses = 0;  // compacted in place: entry `misses` <= q is never read again
  for (int64_t q = 0; q < queued; ++q) {
    __builtin_prefetch(slots + bases[q + kAhead]);
    __builtin_prefetch(slots + bases[q + kAhead] + c - 1);
    const int64_t i = queue[q], base = bases[q];
    Slot* b = slots + base;
    const uint32_t tag = tag_of(k[i]);
    const int64_t j = c == 4 ? cafe::find4(b, tag) : cafe::find_any(b, c, tag);
    if (j < c) {
      add(b + j, base + j, i, s[i]);
    } else {
      queue[misses] = i;
      bases[misses++] = base;
    }
  }
  // The candidates, marked once each (a slot may be listed once per hit), compacted in place
  // into the list: entry num_candidates <= q is never read again.
  int64_t* candidates = cold_hits;
  int64_t num_candidates = 0;
  for (int64_t q = 0; q < num_cold_hits; ++q) {
    const int64_t entry = cold_hits[q];
    Slot& t = slots[entry >> 32];
    const bool candidate =
        ((t.row & kCandidateBit) == 0) & (((t.row & kReservedBit) != 0) | (cafe::estimate(t) >= threshold));
    t.row |= static_cast<int32_t>(candidate) << 1;
    static_assert(kCandidateBit == 2, "the shift above sets kCandidateBit");
    candidates[num_candidates] = entry;
    num_candidates += candidate;
  }
  const auto [batch_total, skipped] = valid_total(s, n);
  return PhaseA{candidates, num_candidates, queue, bases, misses, skipped, batch_total};
}

// Phase B: the misses, their scores summed per key, in order of first occurrence, take the
// first empty slot of their bucket, else replace its minimum non-hot slot (Space-Saving; a
// replaced slot's reservation is given up), else are dropped. Returns how many were dropped.
// Coalescing compacts a's miss arrays in place into one entry per key (entry u <= m is never
// read again), so the loops write raw arrays and call nothing.
int64_t phase_b(Slot* slots, int64_t c, const int64_t* k, const float* s, PhaseA& a, int64_t& reserved) {
  const int64_t n = a.num_misses;
  MissIndex index(n);
  int64_t* homes = cafe::scratch(0, n + kAhead);
  for (int64_t m = 0; m < n; ++m) homes[m] = static_cast<int64_t>(index.home(k[a.miss_positions[m]]));
  for (int64_t m = n; m < n + kAhead; ++m) homes[m] = 0;
  int64_t* ukeys = a.miss_positions;  // each distinct missing key, in order of first occurrence
  int64_t* ubases = a.miss_bases;
  float* usums = reinterpret_cast<float*>(cafe::scratch(4, n));
  int32_t distinct = 0;
  for (int64_t m = 0; m < n; ++m) {
    index.prefetch(static_cast<uint64_t>(homes[m + kAhead]));
    const int64_t i = a.miss_positions[m], base = a.miss_bases[m];
    const int32_t u = index.find_or_add(k[i], static_cast<uint64_t>(homes[m]), distinct);
    if (u == distinct) {
      ukeys[u] = k[i];
      ubases[u] = base;
      usums[u] = s[i] + 0.0f;  // a sum from +0.0, as the twin's: a score of -0.0 is stored as +0.0
      ++distinct;
    } else {
      usums[u] += s[i];
    }
  }
  int64_t dropped = 0;
  // Branch-free over the bucket: whether it has an empty slot, and which slot is the minimum,
  // are coin flips to a predictor. C is 4 for buckets of four (choose4), else 0 (any c).
  const auto place = [&](auto bucket_size) {
    constexpr int64_t C = decltype(bucket_size)::value;
    const int64_t cc = C ? C : c;
    for (int32_t u = 0; u < distinct; ++u) {
      if (u + kAhead < distinct) __builtin_prefetch(slots + ubases[u + kAhead]);
      Slot* b = slots + ubases[u];
      int64_t empty, victim;
      if constexpr (C == 4) {
        std::tie(empty, victim) = choose4(b);
      } else {
        std::tie(empty, victim) = choose_any(b, cc);
      }
      const bool has_empty = empty < cc;
      if (!has_empty & (victim == cc)) {  // every slot hot
        ++dropped;
        continue;
      }
      const int64_t pick = -static_cast<int64_t>(has_empty);  // selects by mask, as in choose_any
      const int64_t j = (empty & pick) | (victim & ~pick);
      const uint32_t keep = ~static_cast<uint32_t>(pick);
      const uint32_t evicted = bits_of(b[victim & ~pick].score) & keep;  // 0.0f into an empty slot
      reserved -= static_cast<int64_t>(!has_empty & ((b[victim & ~pick].row & kReservedBit) != 0));
      const float usum = usums[u];
      const uint32_t sum = (bits_of(usum) & ~keep) | (bits_of(float_of(evicted) + usum) & keep);
      b[j] = Slot{tag_of(ukeys[u]), std::min(float_of(sum), kFloatMax), cold_word(float_of(evicted), true)};
    }
  };
  c == 4 ? place(std::integral_constant<int64_t, 4>{}) : place(std::integral_constant<int64_t, 0>{});
  return dropped;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sketch_insert(
    at::Tensor slots_t, at::Tensor free_bits, at::Tensor free_count, at::Tensor reserved_t, at::Tensor total_score,
    const at::Tensor& in_keys, const at::Tensor& in_scores, const at::Tensor& in_hints, int64_t c,
    double threshold_d, double decay_d, double trigger, int64_t multiplier) {
  Slot* slots = slots_of(slots_t, c);
  cafe::FreeRows free(free_bits, free_count);
  TORCH_CHECK(reserved_t.scalar_type() == at::kLong && reserved_t.numel() == 1, "reserved: int64 [1]");
  TORCH_CHECK(total_score.scalar_type() == at::kDouble && total_score.numel() == 1, "total_score: float64 [1]");
  TORCH_CHECK(in_keys.dim() == 1 && in_keys.scalar_type() == at::kLong, "keys: 1-D int64");
  TORCH_CHECK(in_scores.dim() == 1 && in_scores.scalar_type() == at::kFloat, "scores: 1-D float32");
  TORCH_CHECK(in_keys.numel() == in_scores.numel(), "keys and scores differ in length");
  const at::Tensor ik = in_keys.contiguous();
  const at::Tensor is = in_scores.contiguous();
  const at::Tensor ih = in_hints.contiguous();
  const int64_t n = ik.numel();
  TORCH_CHECK(n < (int64_t{1} << 32), "insert: at most 2^32 - 1 keys per call");
  TORCH_CHECK(ih.numel() == 0 || (ih.numel() == n && ih.scalar_type() == at::kInt), "hints: int32 [N] or empty");
  const int32_t* hints = ih.numel() ? ih.data_ptr<int32_t>() : nullptr;
  const int64_t* k = ik.data_ptr<int64_t>();
  const float* s = is.data_ptr<float>();
  int64_t& reserved = *reserved_t.data_ptr<int64_t>();
  double& total = *total_score.data_ptr<double>();
  const int64_t w = slots_t.size(0) / c;
  const float threshold = static_cast<float>(threshold_d);
  const float decay = static_cast<float>(decay_d);
  check_non_negative(k, n);

  std::vector<int64_t> demoted_rows;
  int64_t decayed = 0;
  if (total > trigger) {
    decayed = 1;
    // Branch-free but for the rare demotion: whether a slot is hot is a coin flip to a predictor.
    for (int64_t j = 0; j < w * c; ++j) {
      Slot& sl = slots[j];
      const int32_t row = sl.row;
      const float d = sl.score * decay;
      const int32_t hot = ~(row >> 31);  // all ones if hot
      const int32_t cold = cold_word(cafe::error_of(row) * decay, row & kNewcomerBit);
      sl.row = (row & hot) | (cold & ~hot);
      sl.score = d;
      // one test on an integer: GCC splits a && or & of two bools into two branches
      const uint32_t demote = (static_cast<uint32_t>(~row) >> 31) & static_cast<uint32_t>(d < threshold);
      if (__builtin_expect(demote, 0)) {
        demoted_rows.push_back(row_of(row));
        free.push(row_of(row));
        sl.row = kColdWord;
      }
    }
    total = 0.0;
    reserved = 0;  // the cold words above were rebuilt without their flags
  }

  const auto run_phase_a = [&](auto has_hints, auto may_promote) {
    return phase_a<decltype(has_hints)::value, decltype(may_promote)::value>(slots, w * c, w, c, multiplier, k, s,
                                                                             hints, n, threshold);
  };
  using Yes = std::true_type;
  using No = std::false_type;
  const bool rows_free = free.count() > 0;
  PhaseA a = hints != nullptr ? (rows_free ? run_phase_a(Yes{}, Yes{}) : run_phase_a(Yes{}, No{}))
                              : (rows_free ? run_phase_a(No{}, Yes{}) : run_phase_a(No{}, No{}));
  total += a.batch_total;

  // promotions in slot order, before phase B: a key that earned its row takes it before this
  // batch's newcomers can replace its slot (a hot slot is never replaced). Every slot holding a
  // reservation takes a row (there are as many reserved rows as such slots); the others take the
  // rows beyond the reservations, in slot order. The key comes from the batch.
  std::sort(a.candidates, a.candidates + a.num_candidates);
  std::vector<int64_t> promoted_keys, promoted_rows;
  const int64_t surplus = free.count() - reserved;
  int64_t taken = 0;  // by slots without a reservation
  for (int64_t q = 0; q < a.num_candidates; ++q) {
    Slot& sl = slots[a.candidates[q] >> 32];
    const bool was_reserved = (sl.row & kReservedBit) != 0;
    if (free.count() > 0 && (was_reserved || taken < surplus)) {
      sl.score = cafe::estimate(sl);  // a hot slot keeps its estimate, no error
      const int64_t row = free.pop();
      sl.row = static_cast<int32_t>(row) | kHitBit;  // hit in this batch
      reserved -= was_reserved;
      taken += !was_reserved;
      promoted_keys.push_back(k[a.candidates[q] & 0xFFFFFFFF]);
      promoted_rows.push_back(row);
    } else {
      sl.row &= ~kCandidateBit;
    }
  }
  const int64_t dropped = phase_b(slots, c, k, s, a, reserved);
  at::Tensor counts = at::empty({3}, at::kLong);
  counts.data_ptr<int64_t>()[0] = a.skipped;
  counts.data_ptr<int64_t>()[1] = dropped;
  counts.data_ptr<int64_t>()[2] = decayed;
  return {to_tensor(promoted_keys), to_tensor(promoted_rows), to_tensor(demoted_rows), counts};
}

std::tuple<at::Tensor, at::Tensor> sketch_query(const at::Tensor& slots_t, const at::Tensor& in_keys,
                                                int64_t c, double medium_threshold_d, int64_t multiplier) {
  const Slot* slots = slots_of(slots_t, c);
  TORCH_CHECK(in_keys.dim() == 1 && in_keys.scalar_type() == at::kLong, "keys: 1-D int64");
  const at::Tensor ik = in_keys.contiguous();
  const int64_t n = ik.numel();
  const int64_t w = slots_t.size(0) / c;
  const int64_t* k = ik.data_ptr<int64_t>();
  check_non_negative(k, n);
  const float medium = static_cast<float>(medium_threshold_d);
  at::Tensor rows = at::empty({n}, ik.options());
  at::Tensor is_medium = at::empty({n}, ik.options().dtype(at::kBool));
  int64_t* r = rows.data_ptr<int64_t>();
  bool* m = is_medium.data_ptr<bool>();
  const auto probe = [&](auto bucket_size) {
    constexpr int64_t C = decltype(bucket_size)::value;
    at::parallel_for(0, n, 8192, [&](int64_t begin, int64_t end) {
      cafe::ProbeRing ring(k, begin, end, multiplier, w, c);
      ring.run<C>(slots, begin, end, [&](int64_t i, int64_t, int64_t base, int64_t j) __attribute__((always_inline)) {
        const bool found = j < c;
        const Slot slot = slots[base + (found ? j : 0)];
        r[i] = cafe::select(found & (slot.row >= 0), row_of(slot.row), kNoRow);
        m[i] = found & cafe::confirmed_cold(slot.row) & (cafe::estimate(slot) >= medium);
      });
    });
  };
  c == 4 ? probe(std::integral_constant<int64_t, 4>{}) : probe(std::integral_constant<int64_t, 0>{});
  return {rows, is_medium};
}

// A float's bits mapped so that unsigned order is the floats' order (-0 read as +0, the value
// it equals), and back.
inline uint32_t ordered_bits(float v) {
  const uint32_t b = bits_of(v + 0.0f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}
inline float from_ordered_bits(uint32_t u) { return float_of((u & 0x80000000u) ? (u & 0x7fffffffu) : ~u); }

// The k-th largest of a list of floats by radix selection, the value nth_element finds: a
// histogram of the top 16 ordered bits, filled as the list is built (`add`), finds the bucket
// holding it, a histogram of the low 16 bits within that bucket the value. One pass over the
// list after it is built, where nth_element's partitioning made the marginal estimate half of
// a rebalance over a large sketch.
class KthLargest {
 public:
  KthLargest() : count_(histogram()) { std::fill(count_.begin(), count_.end(), 0); }
  void add(float v) { ++count_[ordered_bits(v) >> 16]; }
  // the k-th largest of `values` (1 <= k <= size), the floats given to `add`
  float find(const std::vector<float>& values, int64_t k) {
    int64_t rank = k;
    uint32_t high = 0xffff;
    while (count_[high] < rank) rank -= count_[high--];
    std::fill(count_.begin(), count_.end(), 0);
    for (const float v : values) {
      const uint32_t u = ordered_bits(v);
      if ((u >> 16) == high) ++count_[u & 0xffff];
    }
    uint32_t low = 0xffff;
    while (count_[low] < rank) rank -= count_[low--];
    return from_ordered_bits(high << 16 | low);
  }

 private:
  static std::vector<int64_t>& histogram() {
    thread_local std::vector<int64_t> count(size_t{1} << 16);
    return count;
  }
  std::vector<int64_t>& count_;
};

// The rebalance's working lists, per thread, keeping their capacity between calls: over a large
// sketch (half a million slots at 100x on Criteo) fresh vectors cost megabytes of allocation and
// page faults per rebalance, on the thread that overlaps the TBE backward.
struct RebalanceLists {
  std::vector<float> held;
  std::vector<std::pair<float, int32_t>> candidates, hot;  // (estimate, slot): a sketch has < 2^31 slots
};
RebalanceLists& rebalance_lists() {
  thread_local RebalanceLists lists;
  lists.held.clear();
  lists.candidates.clear();
  lists.hot.clear();
  return lists;
}

// The adaptive policy's rebalance: the C++ twin of cafe_torchrec.sketch.policy.rebalance_ (its
// docstring is the spec; this follows it step by step with the same float32, float16 and
// float64 arithmetic, so the two are bit-equal). One pass computes the estimates, a radix
// selection finds the marginal one, and only the hot and candidate slots are sorted.
std::tuple<at::Tensor, double, bool> sketch_rebalance(
    at::Tensor slots_t, at::Tensor free_bits, at::Tensor free_count, at::Tensor reserved_t, at::Tensor marks_t,
    at::Tensor decayed_t, at::Tensor since_t, at::Tensor window_t, int64_t c, int64_t capacity, double horizon,
    double window_horizon, double hysteresis_d, double window_hysteresis_d, double entry_d, double stale_hits_d,
    double stale_burst, int64_t window_length, double stale_factor_d, int64_t decay_steps) {
  Slot* slots = slots_of(slots_t, c);
  cafe::FreeRows free(free_bits, free_count);
  TORCH_CHECK(reserved_t.scalar_type() == at::kLong && reserved_t.numel() == 1, "reserved: int64 [1]");
  TORCH_CHECK(marks_t.is_contiguous() && marks_t.scalar_type() == at::kHalf && marks_t.dim() == 1,
              "marks: float16 [hot rows]");
  TORCH_CHECK(decayed_t.scalar_type() == at::kDouble && since_t.scalar_type() == at::kLong &&
                  window_t.scalar_type() == at::kLong, "decayed f64, since i64, window i64");
  const int64_t n = slots_t.size(0);
  TORCH_CHECK(n < (int64_t{1} << 31), "rebalance: at most 2^31 - 1 slots per sketch");
  int64_t& reserved = *reserved_t.data_ptr<int64_t>();
  at::Half* marks = marks_t.data_ptr<at::Half>();
  double& decayed = *decayed_t.data_ptr<double>();
  int64_t& since = *since_t.data_ptr<int64_t>();
  int64_t& window = *window_t.data_ptr<int64_t>();
  const float entry = static_cast<float>(entry_d);
  const float stale_hits = static_cast<float>(stale_hits_d), stale_factor = static_cast<float>(stale_factor_d);

  // 1. the marginal estimate, the decay factor, stale hot ids
  RebalanceLists& lists = rebalance_lists();
  std::vector<float>& held = lists.held;
  KthLargest select;
  for (int64_t j = 0; j < n; ++j) {
    if (slots[j].tag != kEmptyTag) {
      held.push_back(cafe::estimate(slots[j]));
      select.add(held.back());
    }
  }
  const int64_t k = std::min<int64_t>(capacity, static_cast<int64_t>(held.size()));
  const double q = k > 0 ? select.find(held, k) : 0.0;
  const double before = decayed;
  const int64_t count = since;
  const double total = before + static_cast<double>(count);
  int64_t exponent = 0;
  if (q > 0 && total > 0 && count > 0) {
    // in the stale rule's window after a burst, memory is `window_horizon` (shorter)
    const double rate = static_cast<double>(count) * q / (total * (window > 0 ? window_horizon : horizon));
    // clamped in double before the cast: a huge rate (scores near FLT_MAX) must not overflow int64
    exponent = static_cast<int64_t>(std::min(static_cast<double>(decay_steps), std::nearbyint(decay_steps * rate / std::log(2.0))));
  }
  const float f = static_cast<float>(std::pow(2.0, -static_cast<double>(exponent) / static_cast<double>(decay_steps)));
  const float due = static_cast<float>(1.0 - static_cast<double>(f));
  decayed = total * static_cast<double>(f);
  since = 0;

  // One pass: a hot slot not hit since the last rebalance (its hit flag clear) adds the
  // occurrences this interval's decay takes from it (judged on its score before this decay) to
  // those due since its last hit, its mark (float16; a hit resets it to 0); every hit flag is
  // cleared, every score (and cold slot's error) decayed and every reservation dropped; then
  // slots are listed for re-ranking: hot slots, and candidates (confirmed, no row, estimate >=
  // entry). The scores (before this decay) of all hot ids, and of those whose due occurrences
  // reach `stale_hits` in this rebalance, are summed in float64 in slot order: the stale rule
  // acts after the pass.
  std::vector<std::pair<float, int32_t>>& candidates = lists.candidates;
  std::vector<std::pair<float, int32_t>>& hot = lists.hot;
  double hot_mass = 0.0, stale_mass = 0.0;
  int64_t newly_stale = 0;
  for (int64_t j = 0; j < n; ++j) {
    Slot& sl = slots[j];
    if (sl.tag == kEmptyTag) continue;
    if (sl.row >= 0) {
      const int64_t row = row_of(sl.row);
      const bool missed = (sl.row & kHitBit) == 0;
      const float owed_before = static_cast<float>(marks[row]);
      // capped at float16's largest finite value: an infinite count would reach stale_hits = inf
      const float owed = missed ? static_cast<float>(at::Half(std::min(owed_before + sl.score * due, kMarkMax))) : 0.0f;
      const bool now_stale = missed & (owed >= stale_hits) & (owed_before < stale_hits);
      newly_stale += now_stale;
      hot_mass += sl.score;
      stale_mass += now_stale ? static_cast<double>(sl.score) : 0.0;
      if (f < 1.0f) sl.score = sl.score * f;
      sl.row = static_cast<int32_t>(row);
      marks[row] = at::Half(owed);
      hot.emplace_back(sl.score, static_cast<int32_t>(j));
      continue;
    }
    const int32_t word = sl.row & ~kReservedBit;
    sl.row = word;
    if (f < 1.0f) {
      sl.score = sl.score * f;
      sl.row = cold_word(cafe::error_of(word) * f, word & kNewcomerBit);
    }
    const float e = cafe::estimate(sl);
    if (!(sl.row & kNewcomerBit) && e >= entry) candidates.emplace_back(e, static_cast<int32_t>(j));
  }

  // The stale rule acts in a burst, when the hot ids that went stale in this rebalance held at
  // least `stale_burst` of the hot score (an abrupt drift), and in the `window_length`
  // rebalances after one: every hot id whose due occurrences reached `stale_hits` has its
  // score multiplied by `stale_factor` (0: zeroed) and its count restarts.
  const bool burst = newly_stale > 0 && stale_mass >= stale_burst * hot_mass;
  const bool act = burst || window > 0;
  window = burst ? window_length : std::max<int64_t>(window - 1, 0);
  // a challenger needs less margin where the stale rule acts: after a drift, today's ids
  const float hysteresis = static_cast<float>(act ? window_hysteresis_d : hysteresis_d);
  if (act) {
    for (auto& entry : hot) {
      Slot& sl = slots[entry.second];
      at::Half& mark = marks[row_of(sl.row)];
      if (!(static_cast<float>(mark) >= stale_hits)) continue;
      sl.score = sl.score * stale_factor;
      mark = at::Half(0.0f);
      entry.first = sl.score;
    }
  }

  // 2. re-rank: candidates by estimate descending, hot slots ascending (ties: lower slot first).
  // Only the prefixes the swaps reach need sorting (usually a few slots, not the whole sketch):
  // sort `depth` pairs, and twice as many while every pair sorted so far was a swap.
  const auto descending = [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  const auto ascending = [](const auto& a, const auto& b) {
    return a.first < b.first || (a.first == b.first && a.second < b.second);
  };
  const int64_t fill = std::min<int64_t>(static_cast<int64_t>(candidates.size()), free.count());
  const int64_t pairs = std::min<int64_t>(static_cast<int64_t>(candidates.size()) - fill, static_cast<int64_t>(hot.size()));
  int64_t swaps = 0;
  for (int64_t depth = std::min<int64_t>(pairs, 64);; depth = std::min(pairs, 2 * depth)) {
    std::partial_sort(candidates.begin(), candidates.begin() + fill + depth, candidates.end(), descending);
    std::partial_sort(hot.begin(), hot.begin() + depth, hot.end(), ascending);
    swaps = 0;
    while (swaps < depth && candidates[fill + swaps].first >= hysteresis * hot[swaps].first) ++swaps;
    if (swaps < depth || depth == pairs) break;
  }
  // the losers' rows are freed, and a row is reserved for each winner: it takes one at its
  // next hit, where the insert has its key (a slot holds only a tag) to copy its hashed rows
  std::vector<int64_t> demoted_rows;
  for (int64_t i = 0; i < swaps; ++i) {
    Slot& sl = slots[hot[i].second];
    demoted_rows.push_back(row_of(sl.row));
    free.push(row_of(sl.row));
    sl.row = kColdWord;
  }
  for (int64_t i = 0; i < fill + swaps; ++i) slots[candidates[i].second].row |= kReservedBit;
  reserved = fill + swaps;
  return {to_tensor(demoted_rows), q * static_cast<double>(f), f < 1.0f};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cafe, m) {
  m.def("sketch_insert(Tensor(a!) slots, Tensor(b!) free_bits, Tensor(c!) free_count, Tensor(d!) reserved, "
        "Tensor(e!) total_score, Tensor keys, Tensor scores, Tensor hints, int slots_per_bucket, float threshold, "
        "float decay, float decay_trigger, int multiplier) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("sketch_rebalance(Tensor(a!) slots, Tensor(b!) free_bits, Tensor(c!) free_count, Tensor(d!) reserved, "
        "Tensor(e!) marks, Tensor(f!) decayed, Tensor(g!) since, Tensor(h!) window, int slots_per_bucket, int capacity, "
        "float horizon, float window_horizon, float hysteresis, float window_hysteresis, float entry_score, "
        "float stale_hits, float stale_burst, int window_length, float stale_factor, int decay_steps) "
        "-> (Tensor, float, bool)");
  m.def("sketch_query(Tensor slots, Tensor keys, int slots_per_bucket, float medium_threshold, "
        "int multiplier) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cafe, CPU, m) {
  m.impl("sketch_insert", &sketch_insert);
  m.impl("sketch_query", &sketch_query);
  m.impl("sketch_rebalance", &sketch_rebalance);
}
