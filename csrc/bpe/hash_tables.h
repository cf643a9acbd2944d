// Open-addressing hash tables for the hot loops (std::unordered_map allocates per node and chases pointers).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace fastlm::bpe {

inline uint64_t mix64(uint64_t x) {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

// A fast non-cryptographic hash of a byte string (8 bytes at a time).
inline uint64_t hash_bytes(std::string_view s) {
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ s.size();
  size_t i = 0;
  for (; i + 8 <= s.size(); i += 8) {
    uint64_t chunk;
    std::memcpy(&chunk, s.data() + i, 8);
    h = mix64(h ^ chunk) + 0x9E3779B97F4A7C15ULL;
  }
  uint64_t tail = 0;
  std::memcpy(&tail, s.data() + i, s.size() - i);
  return mix64(h ^ tail);
}

// The power-of-two slot count that keeps `expected` entries at most half full (short linear probes).
inline size_t table_capacity(size_t expected) {
  size_t capacity = 16;
  while (capacity < expected * 2) capacity *= 2;
  return capacity;
}

// uint64 key -> uint32 value. Keys must never equal kEmptyKey (pairs of 32-bit ids below 2^32-1 never do).
class U64Map {
 public:
  static constexpr uint64_t kEmptyKey = ~0ULL;
  static constexpr uint32_t kMissing = ~0U;

  explicit U64Map(size_t expected = 16) { rehash(table_capacity(expected)); }

  uint32_t find(uint64_t key) const {
    for (size_t i = mix64(key) & mask_;; i = (i + 1) & mask_) {
      const Slot& slot = slots_[i];
      if (slot.key == key) return slot.value;
      if (slot.key == kEmptyKey) return kMissing;
    }
  }

  // Returns a reference to the value of `key`, inserting `initial` when absent.
  uint32_t& find_or_insert(uint64_t key, uint32_t initial) {
    if ((size_ + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    for (size_t i = mix64(key) & mask_;; i = (i + 1) & mask_) {
      Slot& slot = slots_[i];
      if (slot.key == key) return slot.value;
      if (slot.key == kEmptyKey) {
        slot.key = key;
        slot.value = initial;
        ++size_;
        return slot.value;
      }
    }
  }

  size_t size() const { return size_; }

 private:
  struct Slot {
    uint64_t key;
    uint32_t value;
  };

  void rehash(size_t capacity) {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(capacity, Slot{kEmptyKey, 0});
    mask_ = capacity - 1;
    size_ = 0;
    for (const Slot& slot : old) {
      if (slot.key != kEmptyKey) find_or_insert(slot.key, slot.value);
    }
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t size_ = 0;
};

// (left id, right id) -> merged id, all three packed into one 64-bit slot (21 bits each, so ids must be below
// 2^21): eight slots per cache line keep a 32k vocabulary's pair table in L2, where the encoder's lookups hit.
class PairTable {
 public:
  static constexpr uint32_t kIdBits = 21;
  static constexpr uint32_t kMaxIds = 1u << kIdBits;  // ids must be < kMaxIds - 1 (all ones marks an empty slot)
  static constexpr uint32_t kMissing = ~0U;

  explicit PairTable(size_t expected = 16) : PairTable(table_capacity(expected), 0) {}

  uint32_t find(uint32_t left, uint32_t right) const {
    const uint64_t key = pack_key(left, right);
    for (size_t i = mix64(key) & mask_;; i = (i + 1) & mask_) {
      const uint64_t slot = slots_[i];
      if ((slot >> kIdBits) == key) return static_cast<uint32_t>(slot & kIdMask);
      if (slot == kEmpty) return kMissing;
    }
  }

  // Adds the pair unless present (the first value stays).
  void insert(uint32_t left, uint32_t right, uint32_t value) {
    if ((size_ + 1) * 2 > slots_.size()) {
      PairTable bigger(slots_.size() * 2, 0);
      for (uint64_t slot : slots_) {
        if (slot != kEmpty) bigger.insert_slot(slot);
      }
      *this = std::move(bigger);
    }
    const uint64_t key = pack_key(left, right);
    if (find(left, right) == kMissing) insert_slot((key << kIdBits) | value);
  }

  size_t size() const { return size_; }

 private:
  static constexpr uint64_t kIdMask = kMaxIds - 1;
  static constexpr uint64_t kEmpty = ~0ULL;

  PairTable(size_t capacity, int) : slots_(capacity, kEmpty), mask_(capacity - 1) {}

  static uint64_t pack_key(uint32_t left, uint32_t right) { return (uint64_t{left} << kIdBits) | right; }

  void insert_slot(uint64_t slot) {
    size_t i = mix64(slot >> kIdBits) & mask_;
    while (slots_[i] != kEmpty) i = (i + 1) & mask_;
    slots_[i] = slot;
    ++size_;
  }

  std::vector<uint64_t> slots_;
  size_t mask_;
  size_t size_ = 0;
};

// Byte string -> dense index (0, 1, 2... in insertion order); the keys live in one arena. A key of up to 8 bytes
// is also kept whole in its slot, so finding it touches one cache line (most pre-tokens are that short); a longer
// key's slot keeps its hash, and the arena is read only when the hashes match.
class StringTable {
 public:
  static constexpr uint32_t kMissing = ~0U;

  explicit StringTable(size_t expected = 16) { rehash(table_capacity(expected)); }

  uint32_t find(std::string_view key) const { return find(key, hash_bytes(key)); }

  uint32_t find(std::string_view key, uint64_t hash) const {
    const uint64_t summary = summary_of(key, hash);
    for (size_t i = hash & mask_;; i = (i + 1) & mask_) {
      const Slot& slot = slots_[i];
      if (slot.index == kMissing) return kMissing;
      if (matches(slot, key, summary)) return slot.index;
    }
  }

  // Returns the index of `key`, adding it with the next index when absent; `inserted` says which happened.
  uint32_t insert(std::string_view key, bool& inserted) { return insert(key, hash_bytes(key), inserted); }

  uint32_t insert(std::string_view key, uint64_t hash, bool& inserted) {
    if ((size() + 1) * 2 > slots_.size()) rehash(slots_.size() * 2);
    const uint64_t summary = summary_of(key, hash);
    for (size_t i = hash & mask_;; i = (i + 1) & mask_) {
      Slot& slot = slots_[i];
      if (slot.index == kMissing) {
        slot = {summary, static_cast<uint32_t>(size()), static_cast<uint32_t>(std::min<size_t>(key.size(), kLongKey))};
        key_offsets_.push_back(arena_.size());
        arena_.append(key);
        inserted = true;
        return slot.index;
      }
      if (matches(slot, key, summary)) {
        inserted = false;
        return slot.index;
      }
    }
  }

  std::string_view key(uint32_t index) const {
    const size_t begin = key_offsets_[index];
    const size_t end = index + 1 < key_offsets_.size() ? key_offsets_[index + 1] : arena_.size();
    return std::string_view(arena_).substr(begin, end - begin);
  }

  size_t size() const { return key_offsets_.size(); }

  void clear() {
    for (Slot& slot : slots_) slot.index = kMissing;
    key_offsets_.clear();
    arena_.clear();
  }

 private:
  static constexpr size_t kInlineBytes = 8;
  static constexpr uint32_t kLongKey = kInlineBytes + 1;  // the length field of every longer key

  struct Slot {
    uint64_t summary;  // the key's bytes (zero-padded) when it is short, else its hash
    uint32_t index;
    uint32_t length;   // the key's length, or kLongKey
  };

  static uint64_t summary_of(std::string_view key, uint64_t hash) {
    if (key.size() > kInlineBytes) return hash;
    uint64_t bytes = 0;
    std::memcpy(&bytes, key.data(), key.size());
    return bytes;
  }

  bool matches(const Slot& slot, std::string_view key, uint64_t summary) const {
    if (slot.summary != summary) return false;
    if (key.size() <= kInlineBytes) return slot.length == key.size();
    return slot.length == kLongKey && this->key(slot.index) == key;
  }

  void rehash(size_t capacity) {
    std::vector<Slot> old = std::move(slots_);
    slots_.assign(capacity, Slot{0, kMissing, 0});
    mask_ = capacity - 1;
    for (const Slot& slot : old) {
      if (slot.index == kMissing) continue;
      size_t i = hash_bytes(key(slot.index)) & mask_;
      while (slots_[i].index != kMissing) i = (i + 1) & mask_;
      slots_[i] = slot;
    }
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  std::vector<size_t> key_offsets_;
  std::string arena_;
};

}  // namespace fastlm::bpe
