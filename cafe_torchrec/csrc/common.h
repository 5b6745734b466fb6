// Shared by the CAFE CPU ops: the hashes, the 12-byte sketch slot, per-thread scratch.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace cafe {

constexpr uint32_t kEmptyTag = 0;  // the tag of an unused slot (a key's tag is never 0)
constexpr int32_t kNoRow = -1;      // what a query says for a key without a hot row

// A slot's row word is, with a hot row, the row (bits 0-29) and a hit flag (bit 30: hit since
// the last rebalance), a non-negative word; without one, a negative word: the sign bit, the
// float32 bits of its Space-Saving error (the evicted key's score it inherited) with the three
// low mantissa bits cleared, and three flags there (the twin of sketch/types.py).
constexpr int32_t kRowMask = 0x3FFFFFFF;
constexpr int32_t kHitBit = 0x40000000;
constexpr int32_t kColdWord = INT32_MIN;  // no hot row, error 0, confirmed
constexpr int32_t kNewcomerBit = 1;       // placed by Space-Saving, not hit since: not medium yet
constexpr int32_t kCandidateBit = 2;      // transient inside one insert: a promotion candidate
constexpr int32_t kReservedBit = 4;       // a rebalance reserved a free row for it: it takes it at its next hit
constexpr uint32_t kErrorBits = 0x7FFFFFF8u;
constexpr float kErrorDiscount = 0.5f;    // estimate = score - kErrorDiscount * error

// A slot holds a key's 32-bit tag, not the key: 12 bytes, so a hot row's four slots cost 48.
struct Slot {
  uint32_t tag;
  float score;
  int32_t row;
};
static_assert(sizeof(Slot) == 12, "a slot is 12 bytes");

// A key's tag: bits 31-62 of the 63-bit key (hash bits only: the low 15 name the table slot),
// 0 read as 1 so that 0 marks an empty slot. The bucket comes from all the key's bits through
// a multiplication (bucket_base), so two keys of one bucket share a tag with probability 2^-32
// (the twin of cafe_torchrec.sketch.types.tags_of).
inline uint32_t tag_of(int64_t key) {
  const uint32_t t = static_cast<uint32_t>(static_cast<uint64_t>(key) >> 31);
  return t + (t == 0);
}

// The hot row of a non-negative row word.
inline int64_t row_of(int32_t word) { return word & kRowMask; }

// The row word of a slot without a hot row: error (finite, >= 0) and newcomer flag.
inline int32_t cold_word(float error, bool newcomer) {
  uint32_t bits;
  std::memcpy(&bits, &error, sizeof bits);
  return static_cast<int32_t>(0x80000000u | (bits & kErrorBits) | static_cast<uint32_t>(newcomer));
}

// The error a row word holds; 0 for a hot slot. A hot slot's word is a row index, whose bits
// would read as a denormal float, and arithmetic on denormals is slow on x86 (a microcode
// assist): the sign bit masks the bits to 0 instead, so hot keys cost what cold ones do.
inline float error_of(int32_t word) {
  const uint32_t bits = static_cast<uint32_t>(word) & kErrorBits & static_cast<uint32_t>(word >> 31);
  float error;
  std::memcpy(&error, &bits, sizeof error);
  return error;
}

// A slot's estimated score: its score less half its error (its score when hot: error 0).
inline float estimate(float score, int32_t word) { return score - kErrorDiscount * error_of(word); }
inline float estimate(const Slot& s) { return estimate(s.score, s.row); }

// A hot row's word after a hit, or a cold word after a hit (a hit confirms a newcomer),
// without a branch (hot or not is a coin flip to a predictor).
inline int32_t hit_word(int32_t word) {
  const int32_t cold = word >> 31;  // all ones if cold
  return (word & ~(cold & kNewcomerBit)) | (~cold & kHitBit);
}

// Held without a hot row and hit since it was placed: may be medium.
inline bool confirmed_cold(int32_t word) { return (word < 0) & ((word & kNewcomerBit) == 0); }

// splitmix64(x + seed * golden), masked to 63 bits: the twin of cafe_torchrec.hashing.mix64.
// Used where raw ids enter (the pre-hash); keys are uniform 63-bit values from then on.
constexpr int64_t mix64(int64_t x, int64_t seed) {
  uint64_t z = static_cast<uint64_t>(x) + static_cast<uint64_t>(seed) * 0x9E3779B97F4A7C15ULL +
               0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z = z ^ (z >> 31);
  return static_cast<int64_t>(z & 0x7FFFFFFFFFFFFFFFULL);
}

// A key (already a uniform hash) re-spread by one multiplication, as a 63-bit value: the twin
// of cafe_torchrec.hashing.fold. The top bits of key * odd depend on every bit of the key.
inline int64_t fold(int64_t key, int64_t multiplier) {
  return static_cast<int64_t>((static_cast<uint64_t>(key) * static_cast<uint64_t>(multiplier)) >> 1);
}

// [0, n) for n <= 2^31 from a 63-bit hash: the twin of cafe_torchrec.hashing.bounded.
inline int64_t bounded(int64_t h, int64_t n) { return ((h >> 32) * n) >> 31; }

// First slot of a key's bucket among w buckets of c slots.
inline int64_t bucket_base(int64_t key, int64_t multiplier, int64_t w, int64_t c) {
  return bounded(fold(key, multiplier), w) * c;
}

// Index (0..3) of `tag` in a bucket of four slots, or 4 if absent: four compares folded into a
// bit mask, no branch (tags are unique within a bucket, so at most one bit is set).
inline int64_t find4(const Slot* b, uint32_t tag) {
  const unsigned m = static_cast<unsigned>(b[0].tag == tag) | static_cast<unsigned>(b[1].tag == tag) << 1 |
                     static_cast<unsigned>(b[2].tag == tag) << 2 | static_cast<unsigned>(b[3].tag == tag) << 3;
  return __builtin_ctz(m | 16u);
}

// Index of `tag` in a bucket of c slots, or c if absent.
inline int64_t find_any(const Slot* b, int64_t c, uint32_t tag) {
  int64_t j = 0;
  while (j < c && b[j].tag != tag) ++j;
  return j;
}

constexpr int64_t kAhead = 32;  // how many keys ahead a slot is prefetched

// Probes keys in input order, each key's bucket computed and prefetched kAhead keys early and
// kept in a ring of 64 until probed: the bases in flight stay in L1, where an [N] array of them
// would add a pass over memory per batch. One ring serves one contiguous range [begin, limit) of
// keys, probed in runs: visit(i, key, base, j) gets key i's bucket base and its slot j there, or
// the bucket size if absent. C is 4 for buckets of four (the branch-free find4), else 0 (any c).
class ProbeRing {
 public:
  ProbeRing(const int64_t* keys, int64_t begin, int64_t limit, int64_t multiplier, int64_t w, int64_t c)
      : keys_(keys), limit_(limit), multiplier_(multiplier), w_(w), c_(c) {
    for (int64_t i = begin; i < std::min(limit, begin + kAhead); ++i) ring_[i & kMask] = bucket_base(keys[i], multiplier, w, c);
  }
  template <int64_t C, typename Visit>
  __attribute__((always_inline)) void run(const Slot* slots, int64_t begin, int64_t end, Visit&& visit) {
    // members into locals: the visitor's int64 stores could alias them, forcing a reload per key
    const int64_t* keys = keys_;
    const int64_t limit = limit_, multiplier = multiplier_, w = w_, c = c_;
    int64_t* ring = ring_;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t ahead = i + kAhead;
      const int64_t next = ahead < limit ? bucket_base(keys[ahead], multiplier, w, c) : 0;
      __builtin_prefetch(slots + next);
      __builtin_prefetch(slots + next + c - 1);  // a bucket of 48 bytes may cross a cache line
      const int64_t key = keys[i], base = ring[i & kMask];
      ring[ahead & kMask] = next;
      const uint32_t tag = tag_of(key);
      visit(i, key, base, C == 4 ? find4(slots + base, tag) : find_any(slots + base, c, tag));
    }
  }

 private:
  static constexpr int64_t kMask = 63;  // 64 >= kAhead bucket bases, in L1
  static_assert(kMask + 1 >= kAhead, "the ring holds the keys in flight");
  const int64_t* keys_;
  int64_t limit_, multiplier_, w_, c_;
  int64_t ring_[kMask + 1];
};

// a if pick, else b, by masks: for choices the branch predictor cannot learn (hot or not)
inline int64_t select(bool pick, int64_t a, int64_t b) {
  const int64_t mask = -static_cast<int64_t>(pick);
  return (a & mask) | (b & ~mask);
}

// A per-thread int64 buffer of at least n entries that keeps its capacity between calls, so a
// step neither allocates nor faults in fresh pages. `which` picks one of a few independent ones.
inline int64_t* scratch(int which, int64_t n) {
  thread_local std::vector<int64_t> buffers[5];
  std::vector<int64_t>& b = buffers[which];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

inline Slot* slots_of(const at::Tensor& slots, int64_t c) {
  TORCH_CHECK(slots.is_contiguous() && slots.scalar_type() == at::kInt && slots.dim() == 2 &&
                  slots.size(1) == 3,
              "slots: contiguous int32 [W*C, 3]");
  TORCH_CHECK(c > 0 && slots.size(0) % c == 0, "slot count must be a multiple of slots_per_bucket");
  return reinterpret_cast<Slot*>(slots.data_ptr<int32_t>());
}

// The free-row bitmap: bit r of word r / 64 is set when hot row r is free.
class FreeRows {
 public:
  FreeRows(const at::Tensor& bits, const at::Tensor& count) {
    TORCH_CHECK(bits.is_contiguous() && bits.scalar_type() == at::kLong && bits.dim() == 1, "free bits: int64 [ceil(H/64)]");
    TORCH_CHECK(count.scalar_type() == at::kLong && count.numel() == 1, "free_count: int64 [1]");
    bits_ = reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>());
    words_ = bits.numel();
    count_ = count.data_ptr<int64_t>();
  }
  int64_t count() const { return *count_; }
  // the lowest free row, taken (the caller checks count() > 0); the scan resumes where it stopped
  int64_t pop() {
    while (cursor_ < words_ && bits_[cursor_] == 0) ++cursor_;
    TORCH_CHECK(cursor_ < words_, "free rows: the count says ", *count_, " but the bitmap holds none");
    const int64_t bit = __builtin_ctzll(bits_[cursor_]);
    bits_[cursor_] &= bits_[cursor_] - 1;
    --*count_;
    return cursor_ * 64 + bit;
  }
  void push(int64_t row) {
    bits_[row >> 6] |= uint64_t{1} << (row & 63);
    cursor_ = std::min(cursor_, row >> 6);
    ++*count_;
  }

 private:
  uint64_t* bits_;
  int64_t words_;
  int64_t* count_;
  int64_t cursor_ = 0;
};

}  // namespace cafe
