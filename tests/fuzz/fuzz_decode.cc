// decode and decode_batch of arbitrary id lists (the input read as little-endian uint32s, most of them folded
// into a range just above the vocabulary): ids below vocab_size decode, and the first one above it raises
// std::invalid_argument naming it; nothing else may happen.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const fuzz::Level level = data[0] & 1 ? fuzz::Level::kChar : fuzz::Level::kByte;
  const fuzz::Model& model = fuzz::model(level);
  const uint32_t vocab = static_cast<uint32_t>(model.vocab_size());
  std::vector<fuzz::TokenId> ids;
  for (size_t pos = 1; pos + 4 <= size; pos += 4) {
    uint32_t raw;
    std::memcpy(&raw, data + pos, 4);
    // Mostly ids near the vocabulary (valid ones and just-too-large ones), sometimes any uint32.
    ids.push_back(raw >> 31 ? raw : raw % (vocab + 8));
  }
  size_t first_bad = ids.size();
  for (size_t i = 0; i < ids.size() && first_bad == ids.size(); ++i) {
    if (ids[i] >= vocab) first_bad = i;
  }
  try {
    const std::string text = model.decode(ids.data(), ids.size());
    FUZZ_CHECK(first_bad == ids.size());
    // The batch: ids twice, then an empty text, as one flat array with offsets.
    std::vector<fuzz::TokenId> flat(ids);
    flat.insert(flat.end(), ids.begin(), ids.end());
    const std::vector<int64_t> offsets{0, static_cast<int64_t>(ids.size()), static_cast<int64_t>(flat.size()),
                                       static_cast<int64_t>(flat.size())};
    const std::vector<std::string> batch = model.decode_batch(flat.data(), offsets, 2);
    FUZZ_CHECK(batch.size() == 3 && batch[0] == text && batch[1] == text && batch[2].empty());
  } catch (const std::invalid_argument& error) {
    FUZZ_CHECK(first_bad != ids.size());
    const std::string expected = "id " + std::to_string(ids[first_bad]) + " (at position " +
                                 std::to_string(first_bad) + ")";
    FUZZ_CHECK(std::string(error.what()).find(expected) != std::string::npos);
  }
  return 0;
}
