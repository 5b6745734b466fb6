// The CPU serving path of a frozen CAFE collection in one op: a KJT's ids -> the physical rows
// its quantized tables read, with the inner KJT's lengths (the twin of the torch ops
// of FrozenCafeEmbeddingBagCollection.physical_input). One pass per feature does the checks on
// the lengths, the feature permute, the pre-hash, the probe of the frozen hot keys (FBGEMM's
// pruned hash map, read in place, keyed by each key's sketch bucket and tag), the row-wise block
// routing, the hashed rows and the plain tables' modulo (plus their first row when they share
// the group's table).
#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "common.h"

namespace {

// Columns of the frozen module's feature_info [F, 8] (cafe_torchrec.inference.frozen.INFO_COLUMNS).
enum Column : int64_t {
  kSaltOffset, kSlot, kRegion, kNumTables, kBlockSize, kLastBlock, kPlainRows, kZeroRow, kBucketHash, kColumns
};

constexpr int64_t kAbsent = -1;     // the hash map's answer for a key it does not hold (frozen.ABSENT)
constexpr int64_t kMedium = -2;     // its value for a medium key (frozen.MEDIUM)
constexpr int64_t kEmptySlot = -1;  // the key word of an empty hash-map slot
constexpr int64_t kChunk = 64;      // keys hashed (vectorised), then their slots prefetched, then probed

// MurmurHash3's 64-bit finaliser: FBGEMM's pruned hash map puts a key's first slot at this mod
// the region's capacity (pruned_hash_function in its CPU and CUDA kernels), then probes linearly.
inline uint64_t murmur_finaliser(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ULL;
  k ^= k >> 33;
  return k;
}

// x mod d for every 64-bit x, d >= 1, without a division (Lemire, Kaser and Kurz, "Faster
// remainder by direct computation", 2019): with M = 2^128 / d rounded up, x mod d is the top 64
// bits of (M * x mod 2^128) * d. Four multiplications, where a 64-bit division costs as much as
// the rest of an id's work.
class Modulus {
 public:
  explicit Modulus(uint64_t d) : d_(d), m_(~static_cast<unsigned __int128>(0) / d + 1) {
    const uint64_t r = (*this)(~uint64_t{0}) + 1;  // 2^64 mod d, as (2^64 - 1) mod d + 1, mod d
    wrap_ = r == d ? 0 : r;
  }
  uint64_t operator()(uint64_t x) const {
    const unsigned __int128 low = m_ * x;
    const unsigned __int128 bottom = (static_cast<unsigned __int128>(static_cast<uint64_t>(low)) * d_) >> 64;
    return static_cast<uint64_t>((bottom + static_cast<unsigned __int128>(static_cast<uint64_t>(low >> 64)) * d_) >> 64);
  }
  // x mod d in [0, d) for a signed x, as torch.remainder: a negative x is its unsigned bits less
  // 2^64, so its remainder is theirs less 2^64 mod d (wrap_), taken mod d once more.
  int64_t floor_mod(int64_t x) const {
    const uint64_t r = (*this)(static_cast<uint64_t>(x));
    const uint64_t shifted = r >= wrap_ ? r - wrap_ : r + d_ - wrap_;
    return static_cast<int64_t>(x < 0 ? shifted : r);
  }

 private:
  uint64_t d_;
  unsigned __int128 m_;
  uint64_t wrap_;  // 2^64 mod d
};

// The value the map holds for `key`, or kAbsent, probing from slot `home` as FBGEMM does.
inline int64_t probe(const int64_t* slots, int64_t capacity, int64_t key, int64_t home) {
  for (int64_t s = home;;) {
    const int64_t held = slots[2 * s];
    if (held == key) return slots[2 * s + 1];
    if (held == kEmptySlot) return kAbsent;
    s = s + 1 == capacity ? 0 : s + 1;
  }
}

// One inner feature as the op serves it: its feature_info row and, for a CAFE feature, its
// group's region of the hash map; `mod` reduces by the map's capacity (CAFE) or the table's
// rows (plain).
struct Feature {
  int64_t salt_offset, slot, region, num_tables, block_size, last_block, plain_rows, zero_row, bucket_hash;
  const int64_t* map;
  int64_t capacity;
  Modulus mod;
  int64_t plain_offset;  // a plain feature's first row: its region's level-1 offset (0 in a table of its own)
};

// The regions [offset1, rows1, offset2, rows2] of a key's table slot in the row-wise block
// TorchRec's block bucketization routed it to in training (key // block size).
inline int64_t block_of(const Feature& f, int64_t key) { return std::min(key / f.block_size, f.last_block); }

// The key the frozen hash map holds for a sketch slot: the slot's bucket, counted across the
// group's blocks (hash: the block sketch's bucket multiplier, buckets and first bucket in the
// group), and the key's tag (cafe::tag_of): a sketch knows a key by exactly these.
inline int64_t served_key(const int64_t* hash, int64_t key) {
  const int64_t bucket = hash[2] + cafe::bounded(cafe::fold(key, hash[0]), hash[1]);
  return bucket << 32 | static_cast<int64_t>(cafe::tag_of(key));
}

// Rows of one CAFE feature's n ids, kRowsPerId per id (2: its level-2 row if medium, else the
// zero row, after its first). Per chunk: keys, hashed rows and the murmur mixes in one loop
// that vectorises (8 keys per AVX-512 instruction), then the first slots, each prefetched, then
// the probes, whose loads the prefetches have started.
template <typename Id, int64_t kRowsPerId, bool kBlocks>
__attribute__((always_inline)) inline void cafe_rows(const Id* ids, int64_t n, const Feature& f,
                                                     const int64_t* regions, const int64_t* bucket_hashes,
                                                     int64_t key_bits, int64_t level1, int64_t level2, int64_t* out) {
  // what the loops read, in locals: their int64 stores could alias the struct, forcing reloads
  const int64_t salt_offset = f.salt_offset, slot = f.slot, zero_row = f.zero_row;
  const int64_t* map = f.map;
  const int64_t capacity = f.capacity;
  const Modulus mod = f.mod;
  const int64_t* fixed = regions + 4 * f.region;  // the regions and bucket hash when there is one block
  const int64_t* hash = bucket_hashes + 3 * f.bucket_hash;
  const int64_t off1 = fixed[0], rows1 = fixed[1], off2 = fixed[2], rows2 = fixed[3];
  int64_t keys[kChunk], first[kChunk], second[kChunk], mixes[kChunk], held[kChunk];
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t m = std::min(kChunk, n - c);
    for (int64_t j = 0; j < m; ++j) {
      // mix64 with seed -1 adds nothing (-golden + golden): splitmix64 of id + salt_offset,
      // where salt_offset = salt * golden + golden is the salt's share, precomputed per feature
      const int64_t key = (cafe::mix64(static_cast<int64_t>(ids[c + j]) + salt_offset, -1) & key_bits) | slot;
      keys[j] = key;
      if constexpr (kBlocks) {
        const int64_t block = block_of(f, key);
        const int64_t* r = regions + 4 * (f.region + block * f.num_tables);
        keys[j] = served_key(hash + 3 * block, key);
        first[j] = r[0] + cafe::bounded(cafe::fold(key, level1), r[1]);
        if constexpr (kRowsPerId == 2) second[j] = r[2] + cafe::bounded(cafe::fold(key, level2), r[3]);
      } else {
        keys[j] = served_key(hash, key);
        first[j] = off1 + cafe::bounded(cafe::fold(key, level1), rows1);
        if constexpr (kRowsPerId == 2) second[j] = off2 + cafe::bounded(cafe::fold(key, level2), rows2);
      }
      mixes[j] = static_cast<int64_t>(murmur_finaliser(static_cast<uint64_t>(keys[j])));
    }
    if (capacity == 0) {  // a region without slots passes keys through, as FBGEMM's lookup does
      for (int64_t j = 0; j < m; ++j) held[j] = keys[j];
    } else {
      int64_t* homes = mixes;  // each mix becomes its first slot
      if ((capacity & (capacity - 1)) == 0) {  // a power of two: the remainder is the low bits
        const uint64_t mask = static_cast<uint64_t>(capacity) - 1;
        for (int64_t j = 0; j < m; ++j) homes[j] = static_cast<int64_t>(static_cast<uint64_t>(mixes[j]) & mask);
      } else {
        for (int64_t j = 0; j < m; ++j) homes[j] = static_cast<int64_t>(mod(static_cast<uint64_t>(mixes[j])));
      }
      for (int64_t j = 0; j < m; ++j) __builtin_prefetch(map + 2 * homes[j]);
      for (int64_t j = 0; j < m; ++j) held[j] = probe(map, capacity, keys[j], homes[j]);
    }
    int64_t* o = out + kRowsPerId * c;
    for (int64_t j = 0; j < m; ++j) {
      o[kRowsPerId * j] = held[j] >= 0 ? held[j] : first[j];
      if constexpr (kRowsPerId == 2) o[2 * j + 1] = held[j] == kMedium ? second[j] : zero_row;
    }
  }
}

// Rows of one plain feature's n ids: its first row + id mod rows, made non-negative as
// torch.remainder does, then the zero row when kRowsPerId is 2.
template <typename Id, int64_t kRowsPerId>
__attribute__((always_inline)) inline void plain_rows(const Id* ids, int64_t n, const Feature& f, int64_t* out) {
  const Modulus rows = f.mod;
  const int64_t zero_row = f.zero_row, first = f.plain_offset;
  for (int64_t i = 0; i < n; ++i) {
    out[kRowsPerId * i] = first + rows.floor_mod(static_cast<int64_t>(ids[i]));
    if constexpr (kRowsPerId == 2) out[2 * i + 1] = zero_row;
  }
}

// The input KJT's arrays, dtypes resolved: bag lengths (with their element stride) or offsets.
template <typename Id, typename Len>
struct Input {
  const Id* ids;
  bool by_lengths;  // whether the KJT gave lengths (else offsets only); not the pointers: an empty
                    // lengths tensor (no bags) has a null data pointer
  const Len* lengths;
  int64_t lengths_stride;
  const Len* offsets;
  const char* weights;  // null when not weighted
  int64_t weight_size;  // bytes per weight
};

struct Outputs {
  int64_t* rows;
  int64_t* lengths;
  char* weights;
};

// Ids of input feature src (bags [src * batch, (src + 1) * batch)); false if a length is negative.
template <typename Id, typename Len>
__attribute__((always_inline)) inline bool count_ids(const Input<Id, Len>& in, int64_t src, int64_t batch,
                                                     int64_t* count) {
  if (!in.by_lengths) {
    const Len* o = in.offsets + src * batch;
    bool negative = false;
    for (int64_t b = 0; b < batch; ++b) negative |= o[b + 1] < o[b];
    *count = static_cast<int64_t>(o[batch]) - static_cast<int64_t>(o[0]);
    return !negative;
  }
  const Len* l = in.lengths + src * batch * in.lengths_stride;
  const int64_t step = in.lengths_stride;
  int64_t sum = 0;
  Len low = 0;  // the smallest length (or 0): an or of sign bits would not vectorise as well
  if (step == 1) {
    for (int64_t b = 0; b < batch; ++b) {
      sum += static_cast<int64_t>(l[b]);
      low = std::min(low, l[b]);
    }
  } else {
    for (int64_t b = 0; b < batch; ++b) {
      sum += static_cast<int64_t>(l[b * step]);
      low = std::min(low, l[b * step]);
    }
  }
  *count = sum;
  return low >= 0;
}

// The per-call constants, read and checked once.
struct Plan {
  int64_t features, batch, num_ids;
  const int64_t* order;
  const int64_t* regions;
  const int64_t* bucket_hashes;
  int64_t key_bits, level1, level2;
  bool multi_level;
};

// Input feature names in input order, as Python prints a list of them, for error messages.
std::string input_names(const c10::List<std::string>& names, const int64_t* order, int64_t features) {
  std::vector<std::string> by_input(features);
  for (int64_t f = 0; f < features; ++f) by_input[order[f]] = names.get(f);
  std::ostringstream out;
  out << "[";
  for (int64_t i = 0; i < features; ++i) out << (i ? ", '" : "'") << by_input[i] << "'";
  out << "]";
  return out.str();
}

// The whole op for one pair of id and length dtypes, after the constants are checked; a
// template body instantiated twice below, for the baseline ISA and for AVX-512.
template <typename Id, typename Len, int64_t k>
__attribute__((always_inline)) inline void serve_rows(const Input<Id, Len>& in, const Plan& p,
                                                      const std::vector<Feature>& info,
                                                      const c10::List<std::string>& names, Outputs out) {
  const int64_t features = p.features, batch = p.batch;
  // where each input feature's ids start; lengths checked in input order, as checked_input does
  std::vector<int64_t> start(features + 1, 0);
  for (int64_t src = 0; src < features; ++src) {
    int64_t count;
    if (!count_ids(in, src, batch, &count)) {
      const int64_t f = std::find(p.order, p.order + features, src) - p.order;
      TORCH_CHECK_VALUE(false, "feature '", names.get(f), "' has negative lengths");
    }
    start[src + 1] = start[src] + count;
  }
  TORCH_CHECK_VALUE(start[features] == p.num_ids, "lengths sum to ", start[features], " but there are ", p.num_ids,
                    " ids (features ", input_names(names, p.order, features), ")");
  int64_t written = 0;  // ids written so far, in inner order
  for (int64_t f = 0; f < features; ++f) {
    const int64_t src = p.order[f];
    int64_t* lengths = out.lengths + f * batch;
    if (!in.by_lengths) {
      const Len* o = in.offsets + src * batch;
      for (int64_t b = 0; b < batch; ++b) lengths[b] = k * (static_cast<int64_t>(o[b + 1]) - static_cast<int64_t>(o[b]));
    } else if (in.lengths_stride == 1) {
      const Len* l = in.lengths + src * batch;
      for (int64_t b = 0; b < batch; ++b) lengths[b] = k * static_cast<int64_t>(l[b]);
    } else {
      const Len* l = in.lengths + src * batch * in.lengths_stride;
      for (int64_t b = 0; b < batch; ++b) lengths[b] = k * static_cast<int64_t>(l[b * in.lengths_stride]);
    }
    const Id* ids = in.ids + start[src];
    const int64_t n = start[src + 1] - start[src];
    int64_t* rows = out.rows + k * written;
    const Feature& feature = info[f];
    if (feature.plain_rows > 0) {
      plain_rows<Id, k>(ids, n, feature, rows);
    } else if (feature.last_block > 0) {
      cafe_rows<Id, k, true>(ids, n, feature, p.regions, p.bucket_hashes, p.key_bits, p.level1, p.level2, rows);
    } else {
      cafe_rows<Id, k, false>(ids, n, feature, p.regions, p.bucket_hashes, p.key_bits, p.level1, p.level2, rows);
    }
    if (in.weights != nullptr) {  // weights ride along: permuted, and doubled when multi-level
      const int64_t size = in.weight_size;
      const char* from = in.weights + start[src] * size;
      char* to = out.weights + k * written * size;
      if (k == 1) {
        std::memcpy(to, from, n * size);
      } else {
        for (int64_t i = 0; i < n; ++i) {
          std::memcpy(to + 2 * i * size, from + i * size, size);
          std::memcpy(to + (2 * i + 1) * size, from + i * size, size);
        }
      }
    }
    written += n;
  }
}

template <typename Id, typename Len>
__attribute__((always_inline)) inline void serve_body(const Input<Id, Len>& in, const Plan& p,
                                                      const std::vector<Feature>& info,
                                                      const c10::List<std::string>& names, Outputs out) {
  p.multi_level ? serve_rows<Id, Len, 2>(in, p, info, names, out) : serve_rows<Id, Len, 1>(in, p, info, names, out);
}

template <typename Id, typename Len>
void serve(const Input<Id, Len>& in, const Plan& p, const std::vector<Feature>& info,
           const c10::List<std::string>& names, Outputs out) {
  serve_body(in, p, info, names, out);
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same body compiled for AVX-512 (the hashing loops become 8 keys per instruction, with
// 64-bit vector multiplies), run where the CPU has it; setup.py compiles for the baseline ISA.
template <typename Id, typename Len>
__attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx512cd,avx2,bmi,bmi2,fma,popcnt")))
void serve_avx512(const Input<Id, Len>& in, const Plan& p, const std::vector<Feature>& info,
                  const c10::List<std::string>& names, Outputs out) {
  serve_body(in, p, info, names, out);
}

bool has_avx512() {
  static const bool has = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  return has;
}
#endif

// rows [N * k] and lengths [F * B] (int64) and weights [N * k] of the quantized
// collection's input, features in inner order (k = 2 with a multi-level group; weights empty when
// not weighted): what FrozenCafeEmbeddingBagCollection's torch ops compute, bit for bit.
// order[f]: the input feature inner feature f reads. The input's dtypes, weights and lengths are
// checked here (ValueError naming the feature), the frozen constants as a bug would break them.
std::tuple<at::Tensor, at::Tensor, at::Tensor> serving_rows(
    const at::Tensor& values, const c10::optional<at::Tensor>& lengths_in,
    const c10::optional<at::Tensor>& offsets_in, const c10::optional<at::Tensor>& weights_in, bool weighted,
    const at::Tensor& order_t, const at::Tensor& info_t, const at::Tensor& bounds_t, const at::Tensor& table_t,
    const at::Tensor& table_offsets_t, const at::Tensor& regions_t, const at::Tensor& bucket_hashes_t, int64_t key_bits,
    int64_t level1, int64_t level2, bool multi_level, const c10::List<std::string>& names) {
  TORCH_CHECK(order_t.dim() == 1 && order_t.scalar_type() == at::kLong && order_t.is_contiguous(),
              "order: contiguous int64 [F]");
  const int64_t features = order_t.numel();
  TORCH_CHECK(features > 0 && static_cast<int64_t>(names.size()) == features, "one name per feature");
  TORCH_CHECK(info_t.dim() == 2 && info_t.size(0) == features && info_t.size(1) == kColumns &&
                  info_t.scalar_type() == at::kLong && info_t.is_contiguous(),
              "feature_info: contiguous int64 [F, ", kColumns, "]");
  TORCH_CHECK(table_t.dim() == 2 && table_t.size(1) == 2 && table_t.scalar_type() == at::kLong &&
                  table_t.is_contiguous(),
              "hash_table: contiguous int64 [capacity, 2]");
  TORCH_CHECK(table_offsets_t.dim() == 1 && table_offsets_t.scalar_type() == at::kLong &&
                  table_offsets_t.is_contiguous() && table_offsets_t.numel() >= 1,
              "hash_offsets: contiguous int64 [T + 1]");
  const int64_t tables = table_offsets_t.numel() - 1;
  TORCH_CHECK(bounds_t.dim() == 1 && bounds_t.scalar_type() == at::kLong && bounds_t.is_contiguous() &&
                  bounds_t.numel() == tables + 1,
              "group_bounds: contiguous int64 [T + 1], one more than the hash map's regions");
  TORCH_CHECK(regions_t.dim() == 2 && regions_t.size(1) == 4 && regions_t.scalar_type() == at::kLong &&
                  regions_t.is_contiguous(),
              "regions: contiguous int64 [R, 4]");
  TORCH_CHECK(bucket_hashes_t.dim() == 2 && bucket_hashes_t.size(1) == 3 && bucket_hashes_t.scalar_type() == at::kLong &&
                  bucket_hashes_t.is_contiguous(),
              "bucket_hashes: contiguous int64 [S, 3]");
  const int64_t* order = order_t.data_ptr<int64_t>();
  std::vector<char> seen(features, 0);
  for (int64_t f = 0; f < features; ++f) {
    TORCH_CHECK(order[f] >= 0 && order[f] < features && !seen[order[f]], "order: a permutation of the features");
    seen[order[f]] = 1;
  }
  // per inner feature its constants and its group's region of the hash map: group_bounds[t] is
  // the first inner feature of region t
  const int64_t* table_offsets = table_offsets_t.data_ptr<int64_t>();
  const int64_t* bounds = bounds_t.data_ptr<int64_t>();
  const int64_t* raw = info_t.data_ptr<int64_t>();
  std::vector<Feature> info;
  info.reserve(features);
  for (int64_t f = 0, t = 0; f < features; ++f) {
    const int64_t* c = raw + kColumns * f;
    while (t < tables && bounds[t + 1] <= f) ++t;
    TORCH_CHECK(c[kPlainRows] >= 0, "feature_info: feature ", f, " has negative plain rows");
    if (c[kPlainRows] > 0) {
      TORCH_CHECK(c[kRegion] >= 0 && c[kRegion] < regions_t.size(0),
                  "feature_info: plain feature ", f, "'s region lies outside the region table");
      info.push_back({c[kSaltOffset], c[kSlot], c[kRegion], c[kNumTables], c[kBlockSize], c[kLastBlock],
                      c[kPlainRows], c[kZeroRow], c[kBucketHash], nullptr, 0, Modulus(c[kPlainRows]),
                      regions_t.data_ptr<int64_t>()[4 * c[kRegion]]});
      continue;
    }
    TORCH_CHECK(t < tables && bounds[t] <= f, "group_bounds: feature ", f, " lies in no hash-map region");
    TORCH_CHECK(table_offsets[t] >= 0 && table_offsets[t] <= table_offsets[t + 1] &&
                    table_offsets[t + 1] <= table_t.size(0),
                "hash_offsets: region ", t, " lies outside the hash table");
    TORCH_CHECK(c[kRegion] >= 0 && c[kNumTables] >= 1 && c[kBlockSize] >= 1 && c[kLastBlock] >= 0 &&
                    c[kRegion] + c[kLastBlock] * c[kNumTables] < regions_t.size(0),
                "feature_info: feature ", f, "'s regions lie outside the region table");
    TORCH_CHECK(c[kBucketHash] >= 0 && c[kBucketHash] + c[kLastBlock] < bucket_hashes_t.size(0),
                "feature_info: feature ", f, "'s bucket hashes lie outside their table");
    const int64_t capacity = table_offsets[t + 1] - table_offsets[t];
    info.push_back({c[kSaltOffset], c[kSlot], c[kRegion], c[kNumTables], c[kBlockSize], c[kLastBlock],
                    c[kPlainRows], c[kZeroRow], c[kBucketHash], table_t.data_ptr<int64_t>() + 2 * table_offsets[t], capacity,
                    Modulus(std::max<int64_t>(capacity, 1)), 0});
  }
  // the input: a user's, so its errors are ValueErrors that say what is wrong
  TORCH_CHECK_VALUE(values.dim() == 1 && (values.scalar_type() == at::kLong || values.scalar_type() == at::kInt),
                    "feature ids must be int32 or int64, got ", values.scalar_type());
  TORCH_CHECK_VALUE(lengths_in.has_value() || offsets_in.has_value(),
                    "the KeyedJaggedTensor has neither lengths nor offsets");
  const bool by_lengths = lengths_in.has_value();
  const at::Tensor bags = by_lengths ? *lengths_in : offsets_in->contiguous();
  TORCH_CHECK_VALUE(bags.dim() == 1 && (bags.scalar_type() == at::kLong || bags.scalar_type() == at::kInt),
                    by_lengths ? "lengths" : "offsets", " must be int32 or int64, got ", bags.scalar_type());
  const int64_t num_bags = by_lengths ? bags.numel() : bags.numel() - 1;
  TORCH_CHECK_VALUE(num_bags >= 0 && num_bags % features == 0, "the KeyedJaggedTensor has ", num_bags,
                    " bags for ", features, " features");
  TORCH_CHECK_VALUE(!weighted || weights_in.has_value(),
                    "this collection is weighted but the KeyedJaggedTensor has no weights");
  const at::Tensor ids = values.contiguous();
  const int64_t n = ids.numel();
  at::Tensor weights;
  if (weighted) {
    weights = weights_in->contiguous();
    TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() == n, "weights: one per id, got ", weights.numel(),
                      " for ", n, " ids");
  }
  const int64_t k = multi_level ? 2 : 1;
  const auto long_options = ids.options().dtype(at::kLong);
  at::Tensor rows = at::empty({k * n}, long_options);
  at::Tensor lengths = at::empty({num_bags}, long_options);
  at::Tensor out_weights = weighted ? at::empty({k * n}, weights.options()) : at::empty({0}, ids.options().dtype(at::kFloat));
  const Outputs out{rows.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
                    weighted ? static_cast<char*>(out_weights.data_ptr()) : nullptr};
  const Plan plan{features, num_bags / features, n, order, regions_t.data_ptr<int64_t>(),
                  bucket_hashes_t.data_ptr<int64_t>(), key_bits, level1, level2, multi_level};
  AT_DISPATCH_INDEX_TYPES(ids.scalar_type(), "serving_rows_ids", [&] {
    using Id = index_t;
    AT_DISPATCH_INDEX_TYPES(bags.scalar_type(), "serving_rows_bags", [&] {
      const index_t* b = bags.data_ptr<index_t>();
      const Input<Id, index_t> in{ids.data_ptr<Id>(),
                                  by_lengths,
                                  by_lengths ? b : nullptr,
                                  by_lengths ? bags.stride(0) : 0,
                                  by_lengths ? nullptr : b,
                                  weighted ? static_cast<const char*>(weights.const_data_ptr()) : nullptr,
                                  weighted ? static_cast<int64_t>(weights.element_size()) : 0};
#if defined(__x86_64__) && defined(__GNUC__)
      if (has_avx512()) return serve_avx512(in, plan, info, names, out);
#endif
      serve(in, plan, info, names, out);
    });
  });
  return {rows, lengths, out_weights};
}

// Shapes only, for torch.export and fake tensors (none depends on the data; sizes stay symbolic).
std::tuple<at::Tensor, at::Tensor, at::Tensor> serving_rows_meta(
    const at::Tensor& values, const c10::optional<at::Tensor>& lengths_in,
    const c10::optional<at::Tensor>& offsets_in, const c10::optional<at::Tensor>& weights_in, bool weighted,
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t, bool multi_level, const c10::List<std::string>&) {
  TORCH_CHECK_VALUE(lengths_in.has_value() || offsets_in.has_value(),
                    "the KeyedJaggedTensor has neither lengths nor offsets");
  TORCH_CHECK_VALUE(!weighted || weights_in.has_value(),
                    "this collection is weighted but the KeyedJaggedTensor has no weights");
  const c10::SymInt ids = values.sym_size(0) * (multi_level ? 2 : 1);
  const c10::SymInt bags = lengths_in.has_value() ? lengths_in->sym_size(0) : offsets_in->sym_size(0) - 1;
  const auto long_options = values.options().dtype(at::kLong);
  return {at::empty_symint({ids}, long_options), at::empty_symint({bags}, long_options),
          weighted ? at::empty_symint({ids}, weights_in->options()) : at::empty({0}, values.options().dtype(at::kFloat))};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(cafe, m) {
  m.def("serving_rows(Tensor values, Tensor? lengths, Tensor? offsets, Tensor? weights, bool weighted, "
        "Tensor order, Tensor feature_info, Tensor group_bounds, Tensor hash_table, Tensor hash_offsets, "
        "Tensor regions, Tensor bucket_hashes, int key_bits, int level1_multiplier, int level2_multiplier, bool multi_level, "
        "str[] names) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(cafe, CPU, m) { m.impl("serving_rows", &serving_rows); }

TORCH_LIBRARY_IMPL(cafe, Meta, m) { m.impl("serving_rows", &serving_rows_meta); }
