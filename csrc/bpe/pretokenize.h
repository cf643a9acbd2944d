// The pre-splits: text -> pre-tokens ("words"); BPE merges never cross a pre-token boundary.
//
// Byte level: the GPT-4 (cl100k) pattern
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
// as a hand-written state machine over code points, giving exactly what `regex.findall` gives (the classes come
// from unicode_tables.h, generated from `regex` itself). Bytes that are not valid UTF-8 count as one "other" code
// point each (never \p{L}, \p{N} or \s), so any byte string splits and the pieces concatenate back to the input.
//
// Char level (sentencepiece style), on already-normalised UTF-8:
//   1. marking: every U+0020 space becomes U+2581 '▁' and one '▁' is prepended (the "dummy prefix"), so
//      "I go" -> "▁I▁go"; an empty text stays empty. Decoding turns every '▁' back into a space and removes the
//      one leading space the prefix added. Other whitespace (tab, newline...) is kept as an ordinary character.
//   2. splitting: a piece starts at every '▁'; and between two adjacent code points (neither of them '▁') whose
//      groups differ, the groups being: Hangul letter, Han letter, other letter, number, anything else. A '▁'
//      glues to what follows it: "▁서울에서2024년" -> "▁서울에서", "2024", "년"; "▁Seoul에서" -> "▁Seoul", "에서".
//      A combining mark (\p{M}) takes the group of the letter run it follows, so that "▁हिन्दी", "▁ภาษาไทย"
//      and NFD "▁cafe\u0301" stay whole (splitting off their vowel signs and accents would leave words that no
//      merge can rebuild); a mark that follows no letter (text start, '▁', a digit, a symbol) is "anything else".
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "bpe/level.h"

namespace fastlm::bpe {

inline constexpr char kSpaceMark[] = "\xE2\x96\x81";  // U+2581 '▁' in UTF-8
inline constexpr uint32_t kSpaceMarkCodePoint = 0x2581;

// Char level: `text` with every space marked and the dummy prefix prepended (step 1 above), into `marked`.
std::string_view mark_spaces(std::string_view text, std::string& marked);

// Appends the pre-tokens of `view` from `pos` on, at most `max_pieces` of them, and returns where the next one
// starts (view.size() once all are out). Byte level: `view` is the text; char level: the marked text. The pieces
// view into `view`. Going on from the returned position gives exactly the pieces of one split of the whole, so a
// caller holds the pieces of a long text a batch at a time, in bounded memory.
size_t next_pretokens(Level level, std::string_view view, size_t pos, size_t max_pieces,
                      std::vector<std::string_view>& pieces);

// All the pre-tokens of `text` at a level (pieces view into `text`, or into `scratch` at char level).
void pretokenize(Level level, std::string_view text, std::string& scratch, std::vector<std::string_view>& pieces);

}  // namespace fastlm::bpe
