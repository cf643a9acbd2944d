// The pre-splits of arbitrary bytes: no empty piece, and the pieces concatenate back to the input (byte level)
// or to the marked text (char level: '▁' for each space, one '▁' prepended).
#include <cstddef>
#include <cstdint>

#include "bpe/pretokenize.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  std::string scratch;
  std::vector<std::string_view> pieces;
  for (fuzz::Level level : {fuzz::Level::kByte, fuzz::Level::kChar}) {
    fuzz::pretokenize(level, text, scratch, pieces);
    std::string joined;
    for (std::string_view piece : pieces) {
      FUZZ_CHECK(!piece.empty());
      joined += piece;
    }
    std::string expected;
    if (level == fuzz::Level::kByte) {
      expected = text;
    } else if (!text.empty()) {
      expected = fastlm::bpe::kSpaceMark;
      for (char c : text) {
        if (c == ' ') {
          expected += fastlm::bpe::kSpaceMark;
        } else {
          expected += c;
        }
      }
    }
    FUZZ_CHECK(joined == expected);
  }
  return 0;
}
