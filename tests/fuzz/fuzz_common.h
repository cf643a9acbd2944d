// Shared by the libFuzzer targets: two small models (byte and char level) trained once on a Korean/English text,
// and a check that aborts with a message, so that libFuzzer records the input as a crash.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "bpe/model.h"
#include "bpe/trainer.h"

namespace fuzz {

using namespace fastlm::bpe;

inline constexpr uint32_t kNumSpecial = 2;

#define FUZZ_CHECK(condition)                                                          \
  do {                                                                                 \
    if (!(condition)) {                                                                \
      std::fprintf(stderr, "%s:%d: FUZZ_CHECK failed: %s\n", __FILE__, __LINE__, #condition); \
      std::abort();                                                                    \
    }                                                                                  \
  } while (0)

inline TrainResult train_small(Level level) {
  const std::vector<std::string_view> texts = {
      "The quick brown fox jumps over the lazy dog. We'll meet at 10:30 in Seoul, won't we?",
      "나는 학교에 갑니다. 오늘 날씨가 정말 좋네요! 서울에서 2024년에 만나요 😀",
      "한국어와 English를 섞어 쓴 문장입니다. 학교 학생 학년 학습 the them there these",
      "e\u0301te\u0301 café naïve 1234567890 \t tabs\nand lines\r\n  spaces   here",
  };
  Trainer trainer(level, 1);
  for (int repeat = 0; repeat < 3; ++repeat) trainer.add_texts(texts);
  return trainer.train(level == Level::kByte ? 420 : 520, {"<pad>", "<s>"}, 2, 1.0);
}

inline const Model& model(Level level) {
  static const Model byte_model = [] {
    const TrainResult r = train_small(Level::kByte);
    return Model(Level::kByte, r.tokens, r.merges, kNumSpecial, 64);
  }();
  static const Model char_model = [] {
    const TrainResult r = train_small(Level::kChar);
    return Model(Level::kChar, r.tokens, r.merges, kNumSpecial, 64);
  }();
  return level == Level::kByte ? byte_model : char_model;
}

// What decode(encode(text)) gives at a level: the text itself, except that at char level '▁' reads as a space.
inline std::string round_tripped(Level level, std::string_view text) {
  std::string out(text);
  if (level == Level::kByte) return out;
  static const std::string mark = "\xE2\x96\x81";
  for (size_t pos; (pos = out.find(mark)) != std::string::npos;) out.replace(pos, mark.size(), " ");
  return out;
}

}  // namespace fuzz
