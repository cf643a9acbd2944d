// A trained BPE model: validation, encoding (tiktoken's rule) and decoding. Id layout: the docstring of
// fastlm/tokenizer.py.
//
// Encoding one pre-token: when its bytes are a token, that token; otherwise start from the base tokens (bytes, or
// alphabet code points with byte fallback at the char level) and repeatedly merge the adjacent pair whose
// concatenated bytes form the token of lowest id, the leftmost on ties; at the char level merges never involve
// byte-fallback tokens. This is tiktoken's rule, so a byte-level model gives tiktoken's ids for the same ranks.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "bpe/hash_tables.h"
#include "bpe/level.h"

namespace fastlm::bpe {

using TokenId = uint32_t;
using Merge = std::pair<TokenId, TokenId>;

struct EncoderScratch;  // per-thread buffers and word cache (model.cc)

class Model {
 public:
  // Throws std::invalid_argument naming the first inconsistency: tokens[i] must be the layout's byte/alphabet
  // token, merges[k] must join two earlier non-special (and, at the char level, non-fallback) tokens into
  // tokens[base_size + k]. cache_size bounds each thread's word cache (entries; 0 disables it).
  Model(Level level, const std::vector<std::string>& tokens, const std::vector<Merge>& merges, uint32_t num_special,
        size_t cache_size);

  // Appends the ids of `text` to `ids`. Never emits a special id. Byte level: any bytes; char level: UTF-8
  // (invalid bytes go through byte fallback one by one).
  void encode(std::string_view text, std::vector<TokenId>& ids) const;

  // Encodes every text on num_threads threads (0 = all cores): text i is ids[offsets[i]:offsets[i+1]].
  void encode_batch(const std::vector<std::string_view>& texts, int num_threads, std::vector<TokenId>& ids,
                    std::vector<int64_t>& offsets) const;

  // The bytes of ids. A special id gives its string as it is. At the char level the ids between special ids are
  // decoded run by run, as each run was encoded with its own dummy prefix: every '▁' becomes a space (also one
  // spelt by byte-fallback tokens) and the run's leading space is removed. Throws std::invalid_argument naming an
  // id >= vocab_size() and its position.
  std::string decode(const TokenId* ids, size_t count) const;
  // decode(), appended to `out`.
  void decode_into(const TokenId* ids, size_t count, std::string& out) const;

  // decode() of each text of a batch on num_threads threads (0 = all cores): text i is ids[offsets[i]:offsets[i+1]].
  std::vector<std::string> decode_batch(const TokenId* ids, const std::vector<int64_t>& offsets, int num_threads) const;

  size_t vocab_size() const { return token_offsets_.size() - 1; }
  Level level() const { return level_; }

 private:
  std::string_view token(TokenId id) const {
    return std::string_view(token_bytes_).substr(token_offsets_[id], token_offsets_[id + 1] - token_offsets_[id]);
  }
  void validate_and_store(const std::vector<std::string>& tokens, const std::vector<Merge>& merges);
  void build_lookups();
  void encode_piece(std::string_view piece, EncoderScratch& scratch, std::vector<TokenId>& ids) const;
  // Merges `symbols` in place by the rule above, then appends them to ids (and clears symbols).
  void merge_and_append(std::vector<TokenId>& symbols, std::vector<TokenId>& ids) const;
  void merge_short(std::vector<TokenId>& symbols) const;
  void merge_long(std::vector<TokenId>& symbols) const;
  TokenId merged(TokenId left, TokenId right) const { return pair_to_token_.find(left, right); }
  // Char level: the text of a run of ids holding no special id (see decode()), appended to out at `write`, which
  // has room for the run's token bytes; returns the new end.
  char* write_char_run(const TokenId* ids, size_t count, char* write) const;
  void build_text_tokens();

  Level level_;
  uint32_t num_special_;
  TokenId first_mergeable_;  // byte level: the first byte token; char level: the first alphabet token
  TokenId base_size_;        // id of the first merged token
  std::string token_bytes_;  // all tokens' bytes back to back
  std::vector<size_t> token_offsets_;
  // Char level: each alphabet or merged token's bytes with every '▁' already a space, so that decoding copies
  // whole tokens; '▁' spelt by byte-fallback tokens is joined while decoding.
  std::string text_bytes_;
  std::vector<size_t> text_offsets_;
  StringTable mergeable_tokens_;          // bytes -> index into mergeable_ids_ (special/fallback tokens excluded)
  std::vector<TokenId> mergeable_ids_;
  PairTable pair_to_token_;               // (left, right) -> the token their bytes concatenate to
  U64Map alphabet_;                       // char level: code point -> alphabet token
  size_t cache_size_;
  uint64_t serial_;                       // identifies this model to the per-thread word caches
};

}  // namespace fastlm::bpe
