// The pre-splits of arbitrary bytes: no empty piece, the pieces concatenate back to the input (byte level) or to
// the marked text (char level: '▁' for each space, one '▁' prepended), and taking them a few at a time
// (next_pretokens, as the encoder does on long texts) gives the same pieces.
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
    const std::string_view view = level == fuzz::Level::kByte ? text : std::string_view(scratch);
    for (size_t batch : {1, 2, 3}) {
      std::vector<std::string_view> batched;
      for (size_t pos = 0; pos < view.size();) pos = fastlm::bpe::next_pretokens(level, view, pos, batch, batched);
      FUZZ_CHECK(batched == pieces);
    }
  }
  return 0;
}
