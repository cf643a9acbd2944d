#include "bpe/unicode.h"

#include <algorithm>
#include <vector>

#include "bpe/unicode_tables.h"

namespace fastlm::bpe {
namespace {

// A two-stage table (256 code points per block, identical blocks shared) built once from the generated ranges:
// one lookup per code point in the pre-split hot loop instead of a binary search.
constexpr uint32_t kBlockBits = 8;
constexpr uint32_t kBlockSize = 1u << kBlockBits;
constexpr uint32_t kNumCodePoints = 0x110000;

class ClassTable {
 public:
  ClassTable() {
    std::vector<uint8_t> flat(kNumCodePoints, 0);
    for (const auto& range : tables::kClassRanges) {
      for (uint32_t c = range.first; c <= range.last; ++c) flat[c] = range.flags;
    }
    block_of_.resize(kNumCodePoints / kBlockSize);
    for (uint32_t block = 0; block < block_of_.size(); ++block) {
      const uint8_t* values = flat.data() + block * kBlockSize;
      uint32_t found = static_cast<uint32_t>(blocks_.size() / kBlockSize);
      for (uint32_t seen = 0; seen * kBlockSize < blocks_.size(); ++seen) {
        if (std::equal(values, values + kBlockSize, blocks_.begin() + seen * kBlockSize)) {
          found = seen;
          break;
        }
      }
      if (found * kBlockSize == blocks_.size()) blocks_.insert(blocks_.end(), values, values + kBlockSize);
      block_of_[block] = static_cast<uint16_t>(found);
    }
  }

  uint8_t lookup(uint32_t code_point) const {
    if (code_point >= kNumCodePoints) return 0;
    return blocks_[block_of_[code_point >> kBlockBits] * kBlockSize + (code_point & (kBlockSize - 1))];
  }

 private:
  std::vector<uint16_t> block_of_;
  std::vector<uint8_t> blocks_;
};

const ClassTable& class_table() {
  static const ClassTable table;
  return table;
}

}  // namespace

uint8_t code_point_class(uint32_t code_point) { return class_table().lookup(code_point); }

void append_utf8(uint32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

size_t first_invalid_utf8(std::string_view text) {
  size_t pos = 0;
  while (pos < text.size()) {
    const Decoded d = decode_utf8(text, pos);
    if (!d.valid) return pos;
    pos += d.length;
  }
  return text.size();
}

}  // namespace fastlm::bpe
