#include "bpe/pretokenize.h"

#include <array>

#include "bpe/unicode.h"
#include "bpe/unicode_tables.h"

namespace fastlm::bpe {
namespace {

struct CodePoint {
  uint32_t value;
  uint32_t length;
  uint8_t klass;
};

// ASCII classes in a small array: most text is ASCII or pays the two-stage lookup only for the rest.
const std::array<uint8_t, 128>& ascii_classes() {
  static const std::array<uint8_t, 128> classes = [] {
    std::array<uint8_t, 128> table{};
    for (uint32_t c = 0; c < 128; ++c) table[c] = code_point_class(c);
    return table;
  }();
  return classes;
}

inline CodePoint code_point_at(std::string_view text, size_t pos) {
  const auto byte = static_cast<unsigned char>(text[pos]);
  if (byte < 0x80) return {byte, 1, ascii_classes()[byte]};
  const Decoded d = decode_utf8(text, pos);
  // An invalid byte is an "other" code point: class 0, whatever U+FFFD's class.
  return {d.code_point, d.length, d.valid ? code_point_class(d.code_point) : uint8_t{0}};
}

inline bool is_line_break(uint32_t c) { return c == '\r' || c == '\n'; }
inline bool is_other(uint8_t klass) { return (klass & (kLetter | kNumber | kWhitespace)) == 0; }

// True when `c` is one the code points (?i:letter) matches.
bool matches_letter(uint32_t c, char letter) {
  for (size_t row = 0; tables::kContractionLetters[row] != '\0'; ++row) {
    if (tables::kContractionLetters[row] != letter) continue;
    for (uint32_t variant : tables::kContractionVariants[row]) {
      if (variant != 0 && variant == c) return true;
    }
  }
  return false;
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d) at pos (text[pos] == '\''): the end of the match, or pos when none matches.
size_t contraction_end(std::string_view text, size_t pos) {
  size_t next = pos + 1;
  if (next >= text.size()) return pos;
  const CodePoint first = code_point_at(text, next);
  for (char letter : {'s', 't', 'm', 'd'}) {
    if (matches_letter(first.value, letter)) return next + first.length;
  }
  next += first.length;
  const CodePoint second = next < text.size() ? code_point_at(text, next) : CodePoint{0, 0, 0};
  const char two_letter[][2] = {{'r', 'e'}, {'v', 'e'}, {'l', 'l'}};
  for (const auto& pair : two_letter) {
    if (matches_letter(first.value, pair[0]) && second.length && matches_letter(second.value, pair[1])) {
      return next + second.length;
    }
  }
  return pos;
}

// The end of the run of code points starting at pos whose class has any bit of `mask` (at most max_count of them).
size_t run_end(std::string_view text, size_t pos, uint8_t mask, size_t max_count = ~size_t{0}) {
  for (size_t count = 0; pos < text.size() && count < max_count; ++count) {
    const CodePoint c = code_point_at(text, pos);
    if (!(c.klass & mask)) break;
    pos += c.length;
  }
  return pos;
}

size_t other_run_end(std::string_view text, size_t pos) {
  while (pos < text.size()) {
    const CodePoint c = code_point_at(text, pos);
    if (!is_other(c.klass)) break;
    pos += c.length;
  }
  while (pos < text.size() && is_line_break(static_cast<unsigned char>(text[pos]))) ++pos;
  return pos;
}

// The end of the cl100k match starting at pos: the alternatives tried in the pattern's order.
size_t cl100k_piece_end(std::string_view text, size_t pos) {
  const CodePoint first = code_point_at(text, pos);
  if (first.value == '\'') {
    const size_t end = contraction_end(text, pos);
    if (end != pos) return end;
  }
  const size_t second_pos = pos + first.length;
  const CodePoint second = second_pos < text.size() ? code_point_at(text, second_pos) : CodePoint{0, 0, 0};
  const bool has_second = second.length != 0;
  // [^\r\n\p{L}\p{N}]?\p{L}+
  if (first.klass & kLetter) return run_end(text, pos, kLetter);
  if (!is_line_break(first.value) && !(first.klass & kNumber) && has_second && (second.klass & kLetter)) {
    return run_end(text, second_pos, kLetter);
  }
  // \p{N}{1,3}
  if (first.klass & kNumber) return run_end(text, pos, kNumber, 3);
  // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
  if (first.value == ' ' && has_second && is_other(second.klass)) return other_run_end(text, second_pos);
  if (is_other(first.klass)) return other_run_end(text, pos);
  // Whitespace from here on: \s*[\r\n]+ | \s+(?!\S) | \s+
  size_t end = pos;
  size_t last_char_start = pos;
  size_t after_last_line_break = 0;
  while (end < text.size()) {
    const CodePoint c = code_point_at(text, end);
    if (!(c.klass & kWhitespace)) break;
    last_char_start = end;
    end += c.length;
    if (is_line_break(c.value)) after_last_line_break = end;
  }
  if (after_last_line_break) return after_last_line_break;
  if (end == text.size() || last_char_start == pos) return end;
  return last_char_start;  // \s+(?!\S): leave the last space to prefix the next word
}

enum class CharGroup { kSpaceMark, kHangul, kHan, kLetter, kNumber, kOther };

bool is_letter_group(CharGroup group) {
  return group == CharGroup::kHangul || group == CharGroup::kHan || group == CharGroup::kLetter;
}

// The group of `c` when it follows a code point of group `previous` (only marks depend on it).
CharGroup char_group(const CodePoint& c, CharGroup previous) {
  if (c.value == kSpaceMarkCodePoint) return CharGroup::kSpaceMark;
  if (c.klass & kMark) return is_letter_group(previous) ? previous : CharGroup::kOther;
  if (c.klass & kHangul && c.klass & kLetter) return CharGroup::kHangul;
  if (c.klass & kHan && c.klass & kLetter) return CharGroup::kHan;
  if (c.klass & kLetter) return CharGroup::kLetter;
  if (c.klass & kNumber) return CharGroup::kNumber;
  return CharGroup::kOther;
}

}  // namespace

std::string_view mark_spaces(std::string_view text, std::string& marked) {
  marked.clear();
  if (text.empty()) return marked;
  marked.reserve(text.size() + 3);
  marked.append(kSpaceMark);
  for (char c : text) {
    if (c == ' ') {
      marked.append(kSpaceMark);
    } else {
      marked.push_back(c);
    }
  }
  return marked;
}

size_t next_pretokens(Level level, std::string_view view, size_t pos, size_t max_pieces,
                      std::vector<std::string_view>& pieces) {
  if (level == Level::kByte) {
    for (size_t count = 0; pos < view.size() && count < max_pieces; ++count) {
      const size_t end = cl100k_piece_end(view, pos);
      pieces.push_back(view.substr(pos, end - pos));
      pos = end;
    }
    return pos;
  }
  // Char level. Starting at a piece start with previous = '▁' is exact: a piece that starts with a combining mark
  // follows no letter, so the mark is "anything else" either way.
  size_t piece_start = pos;
  size_t count = 0;
  CharGroup previous = CharGroup::kSpaceMark;
  while (pos < view.size()) {
    const CodePoint c = code_point_at(view, pos);
    const CharGroup group = char_group(c, previous);
    const bool starts_piece = group == CharGroup::kSpaceMark || (previous != CharGroup::kSpaceMark && group != previous);
    if (starts_piece && pos > piece_start) {
      pieces.push_back(view.substr(piece_start, pos - piece_start));
      piece_start = pos;
      if (++count == max_pieces) return pos;
    }
    previous = group;
    pos += c.length;
  }
  if (pos > piece_start) pieces.push_back(view.substr(piece_start, pos - piece_start));
  return pos;
}

void pretokenize(Level level, std::string_view text, std::string& scratch, std::vector<std::string_view>& pieces) {
  pieces.clear();
  const std::string_view view = level == Level::kByte ? text : mark_spaces(text, scratch);
  next_pretokens(level, view, 0, view.size(), pieces);
}

}  // namespace fastlm::bpe
