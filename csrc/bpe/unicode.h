// UTF-8 decoding/encoding and the code point classes the pre-splitters need (generated from the `regex` package).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace fastlm::bpe {

// Class bits of a code point; the same values as generate_unicode_tables.py.
enum CodePointClass : uint8_t {
  kLetter = 1,      // \p{L}
  kNumber = 2,      // \p{N}
  kWhitespace = 4,  // \s as `regex` sees it
  kHangul = 8,      // \p{Script=Hangul}
  kHan = 16,        // \p{Script=Han}
  kMark = 32,       // \p{M}: combining marks
};

// Returns the class bits of a code point (0 for anything else, including values above U+10FFFF).
uint8_t code_point_class(uint32_t code_point);

// One decoded code point and the number of bytes it took.
struct Decoded {
  uint32_t code_point;
  uint32_t length;  // 1..4; 1 for an invalid byte
  bool valid;
};

// The code point reported for a byte that does not start a valid UTF-8 sequence (overlong forms, surrogates and
// truncated sequences included). The byte itself stays in the text: the byte level treats it as one "other" char.
inline constexpr uint32_t kReplacementCharacter = 0xFFFD;

// Decodes the code point starting at text[pos] (pos < text.size()); never reads past the end.
inline Decoded decode_utf8(std::string_view text, size_t pos) {
  const auto* s = reinterpret_cast<const unsigned char*>(text.data()) + pos;
  const size_t left = text.size() - pos;
  const uint32_t b0 = s[0];
  if (b0 < 0x80) return {b0, 1, true};
  const Decoded invalid{kReplacementCharacter, 1, false};
  auto continuation = [&](size_t i) { return i < left && (s[i] & 0xC0) == 0x80; };
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    if (!continuation(1)) return invalid;
    return {((b0 & 0x1F) << 6) | (s[1] & 0x3F), 2, true};
  }
  if (b0 >= 0xE0 && b0 <= 0xEF) {
    if (!continuation(1) || !continuation(2)) return invalid;
    const uint32_t cp = ((b0 & 0x0F) << 12) | ((s[1] & 0x3Fu) << 6) | (s[2] & 0x3F);
    if (cp < 0x800 || (cp >= 0xD800 && cp < 0xE000)) return invalid;
    return {cp, 3, true};
  }
  if (b0 >= 0xF0 && b0 <= 0xF4) {
    if (!continuation(1) || !continuation(2) || !continuation(3)) return invalid;
    const uint32_t cp = ((b0 & 0x07) << 18) | ((s[1] & 0x3Fu) << 12) | ((s[2] & 0x3Fu) << 6) | (s[3] & 0x3F);
    if (cp < 0x10000 || cp > 0x10FFFF) return invalid;
    return {cp, 4, true};
  }
  return invalid;
}

// Appends the UTF-8 form of a valid code point (not a surrogate, <= U+10FFFF).
void append_utf8(uint32_t code_point, std::string& out);

// Returns the offset of the first invalid UTF-8 byte, or text.size() when the whole text is valid.
size_t first_invalid_utf8(std::string_view text);

}  // namespace fastlm::bpe
