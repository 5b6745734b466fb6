// Shared by the CAFE CPU ops: the 64-bit mixing hash and the 16-byte sketch slot.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace cafe {

constexpr int64_t kEmptyKey = -1;
constexpr int32_t kNoRow = -1;

struct Slot {
  int64_t key;
  float score;
  int32_t row;
};
static_assert(sizeof(Slot) == 16, "a slot is 16 bytes");

// splitmix64(x + seed * golden), masked to 63 bits: the twin of cafe_torchrec.hashing.mix64.
inline int64_t mix64(int64_t x, int64_t seed) {
  uint64_t z = static_cast<uint64_t>(x) + static_cast<uint64_t>(seed) * 0x9E3779B97F4A7C15ULL +
               0x9E3779B97F4A7C15ULL;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  z = z ^ (z >> 31);
  return static_cast<int64_t>(z & 0x7FFFFFFFFFFFFFFFULL);
}

// [0, n) for n <= 2^31 from a 63-bit hash: the twin of cafe_torchrec.hashing.bounded.
inline int64_t bounded(int64_t h, int64_t n) { return ((h >> 32) * n) >> 31; }

inline Slot* slots_of(const at::Tensor& slots, int64_t c) {
  TORCH_CHECK(slots.is_contiguous() && slots.scalar_type() == at::kLong && slots.dim() == 2 &&
                  slots.size(1) == 2,
              "slots: contiguous int64 [W*C, 2]");
  TORCH_CHECK(c > 0 && slots.size(0) % c == 0, "slot count must be a multiple of slots_per_bucket");
  return reinterpret_cast<Slot*>(slots.data_ptr<int64_t>());
}

}  // namespace cafe
