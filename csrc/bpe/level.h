// The two tokenizer levels and the id layout they share (see the docstring of fastlm/tokenizer.py).
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>

namespace fastlm::bpe {

enum class Level {
  kByte,  // base alphabet: the 256 bytes; cl100k pre-split
  kChar,  // base alphabet: code points kept by character coverage, byte fallback for the rest; ▁ marks spaces
};

inline constexpr uint32_t kNumByteTokens = 256;

inline Level parse_level(std::string_view name) {
  if (name == "byte") return Level::kByte;
  if (name == "char") return Level::kChar;
  throw std::invalid_argument("level must be \"byte\" or \"char\", got \"" + std::string(name) + "\"");
}

}  // namespace fastlm::bpe
