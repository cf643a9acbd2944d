// encode, encode_batch and decode of arbitrary bytes at both levels: no crash or sanitizer finding, never a
// special id, decode(encode(text)) == text ('▁' reads as a space at char level), and encode_batch (texts cut at
// '\n', on 2 threads) agrees with encode text by text.
#include <cstddef>
#include <cstdint>

#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> lines;
  for (size_t start = 0;;) {
    const size_t end = text.find('\n', start);
    lines.push_back(text.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start));
    if (end == std::string_view::npos) break;
    start = end + 1;
  }
  for (fuzz::Level level : {fuzz::Level::kByte, fuzz::Level::kChar}) {
    const fuzz::Model& model = fuzz::model(level);
    std::vector<fuzz::TokenId> ids;
    model.encode(text, ids);
    for (fuzz::TokenId id : ids) FUZZ_CHECK(id >= fuzz::kNumSpecial && id < model.vocab_size());
    FUZZ_CHECK(model.decode(ids.data(), ids.size()) == fuzz::round_tripped(level, text));

    std::vector<fuzz::TokenId> flat;
    std::vector<int64_t> offsets;
    model.encode_batch(lines, 2, flat, offsets);
    FUZZ_CHECK(offsets.size() == lines.size() + 1 && static_cast<size_t>(offsets.back()) == flat.size());
    for (size_t i = 0; i < lines.size(); ++i) {
      std::vector<fuzz::TokenId> expected;
      model.encode(lines[i], expected);
      FUZZ_CHECK(std::vector<fuzz::TokenId>(flat.begin() + offsets[i], flat.begin() + offsets[i + 1]) == expected);
    }
  }
  return 0;
}
