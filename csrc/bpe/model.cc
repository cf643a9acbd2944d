#include "bpe/model.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <queue>
#include <stdexcept>

#include "bpe/pretokenize.h"
#include "bpe/thread_pool.h"
#include "bpe/unicode.h"

namespace fastlm::bpe {
namespace {

constexpr TokenId kNoToken = PairTable::kMissing;
static_assert(PairTable::kMissing == U64Map::kMissing && PairTable::kMissing == StringTable::kMissing);
// Words up to this many symbols use the quadratic merge loop (fewer pointer hops); longer ones the O(n log n) one.
constexpr size_t kShortWordSymbols = 64;
// Pre-tokens are split off this many at a time, so that a 100 MB line never holds all its pieces (16 bytes each).
constexpr size_t kPiecesPerBatch = 4096;
// Longer pre-tokens are rare and would let the word cache grow without bound in bytes: they are not cached.
constexpr size_t kMaxCachedPieceBytes = 256;

// A token's bytes for an error message: Python's bytes literal, cut after kDescribedBytes (a hostile file's token
// may hold megabytes) with the full length said.
constexpr size_t kDescribedBytes = 64;

std::string describe(std::string_view bytes) {
  std::string out = "b'";
  for (unsigned char c : bytes.substr(0, kDescribedBytes)) {
    if (c >= 0x20 && c < 0x7F && c != '\'' && c != '\\') {
      out.push_back(static_cast<char>(c));
    } else {
      static const char hex[] = "0123456789abcdef";
      out += "\\x";
      out.push_back(hex[c >> 4]);
      out.push_back(hex[c & 15]);
    }
  }
  out += "'";
  if (bytes.size() > kDescribedBytes) out += "... (" + std::to_string(bytes.size()) + " bytes)";
  return out;
}

std::atomic<uint64_t> next_model_serial{1};

}  // namespace

// Per-thread scratch buffers and the word cache (pre-token bytes -> ids) of the model used last on this thread.
struct EncoderScratch {
  std::vector<std::string_view> pieces;
  std::string marked;
  std::vector<TokenId> symbols;
  uint64_t cached_model = 0;
  StringTable cache_keys;
  std::vector<size_t> cache_value_starts{0};
  std::vector<TokenId> cache_values;

  void clear_cache(uint64_t model) {
    cached_model = model;
    cache_keys.clear();
    cache_value_starts.assign(1, 0);
    cache_values.clear();
  }
};

namespace {

EncoderScratch& thread_scratch() {
  thread_local EncoderScratch scratch;
  return scratch;
}

}  // namespace

Model::Model(Level level, const std::vector<std::string>& tokens, const std::vector<Merge>& merges,
             uint32_t num_special, size_t cache_size)
    : level_(level), num_special_(num_special), cache_size_(cache_size), serial_(next_model_serial.fetch_add(1)) {
  validate_and_store(tokens, merges);
  build_lookups();
  if (level_ == Level::kChar) build_text_tokens();
}

void Model::validate_and_store(const std::vector<std::string>& tokens, const std::vector<Merge>& merges) {
  const size_t minimum = size_t{num_special_} + kNumByteTokens + merges.size();
  if (tokens.size() < minimum || tokens.size() >= PairTable::kMaxIds - 1) {
    throw std::invalid_argument("tokens has " + std::to_string(tokens.size()) +
                                " entries; expected at least num_special + 256 + len(merges) = " +
                                std::to_string(minimum) + " and fewer than " +
                                std::to_string(PairTable::kMaxIds - 1));
  }
  base_size_ = static_cast<TokenId>(tokens.size() - merges.size());
  const TokenId first_alphabet = num_special_ + kNumByteTokens;
  if (level_ == Level::kByte && base_size_ != first_alphabet) {
    throw std::invalid_argument("a byte-level model has num_special + 256 base tokens, but tokens (" +
                                std::to_string(tokens.size()) + ") - merges (" + std::to_string(merges.size()) +
                                ") = " + std::to_string(base_size_));
  }
  first_mergeable_ = level_ == Level::kByte ? num_special_ : first_alphabet;
  for (uint32_t byte = 0; byte < kNumByteTokens; ++byte) {
    const std::string& token = tokens[num_special_ + byte];
    if (token.size() != 1 || static_cast<unsigned char>(token[0]) != byte) {
      throw std::invalid_argument("tokens[" + std::to_string(num_special_ + byte) + "] must be the single byte " +
                                  std::to_string(byte) + ", got " + describe(token));
    }
  }
  for (TokenId id = first_alphabet; id < base_size_; ++id) {
    const std::string& token = tokens[id];
    const Decoded d = token.empty() ? Decoded{0, 0, false} : decode_utf8(token, 0);
    if (!d.valid || d.length != token.size()) {
      throw std::invalid_argument("alphabet token tokens[" + std::to_string(id) +
                                  "] must be one UTF-8 code point, got " + describe(token));
    }
    TokenId& slot = alphabet_.find_or_insert(d.code_point, id);
    if (slot != id) {
      throw std::invalid_argument("alphabet token tokens[" + std::to_string(id) + "] repeats tokens[" +
                                  std::to_string(slot) + "] " + describe(token));
    }
  }
  U64Map merge_index(merges.size());  // (left, right) -> k: training never learns a pair twice
  for (size_t k = 0; k < merges.size(); ++k) {
    const TokenId created = base_size_ + static_cast<TokenId>(k);
    const auto [left, right] = merges[k];
    for (TokenId part : {left, right}) {
      if (part >= created || part < first_mergeable_) {
        throw std::invalid_argument("merges[" + std::to_string(k) + "] = (" + std::to_string(left) + ", " +
                                    std::to_string(right) + ") uses id " + std::to_string(part) +
                                    "; expected ids in [" + std::to_string(first_mergeable_) + ", " +
                                    std::to_string(created) + ") (defined before it, no special" +
                                    (level_ == Level::kChar ? " or byte-fallback" : "") + " token)");
      }
    }
    // Both ids are below created (checked above), so the key is never U64Map's empty key.
    const uint32_t first = merge_index.find_or_insert((uint64_t{left} << 32) | right, static_cast<uint32_t>(k));
    if (first != k) {
      throw std::invalid_argument("merges[" + std::to_string(k) + "] = (" + std::to_string(left) + ", " +
                                  std::to_string(right) + ") repeats merges[" + std::to_string(first) + "]");
    }
    if (tokens[created] != tokens[left] + tokens[right]) {
      throw std::invalid_argument("merges[" + std::to_string(k) + "] = (" + std::to_string(left) + ", " +
                                  std::to_string(right) + ") should create " +
                                  describe(tokens[left] + tokens[right]) + " but tokens[" +
                                  std::to_string(created) + "] is " + describe(tokens[created]));
    }
  }
  token_offsets_.reserve(tokens.size() + 1);
  token_offsets_.push_back(0);
  for (const std::string& token : tokens) {
    token_bytes_ += token;
    token_offsets_.push_back(token_bytes_.size());
  }
}

void Model::build_lookups() {
  const TokenId vocab = static_cast<TokenId>(vocab_size());
  // Mergeable tokens by bytes; a repeated byte string keeps its lowest id (its rank).
  for (TokenId id = first_mergeable_; id < vocab; ++id) {
    bool inserted = false;
    mergeable_tokens_.insert(token(id), inserted);
    if (inserted) mergeable_ids_.push_back(id);
  }
  // Every split of a token into two tokens is a pair that merges into it (tiktoken's rule goes by bytes, so this
  // includes splits that are not the recorded merge). Only splits into two lengths that some token has are
  // tried: testing every split of every token hashes O(length^2) bytes per token, minutes for the megabyte tokens
  // that training on one long run of a character gives (few distinct lengths, so this way is fast).
  std::vector<bool> is_token_length;
  std::vector<size_t> token_lengths;  // ascending
  for (TokenId id : mergeable_ids_) {
    const size_t length = token(id).size();
    if (length >= is_token_length.size()) is_token_length.resize(length + 1, false);
    is_token_length[length] = true;
  }
  for (size_t length = 1; length < is_token_length.size(); ++length) {
    if (is_token_length[length]) token_lengths.push_back(length);
  }
  for (TokenId id = base_size_; id < vocab; ++id) {
    const std::string_view bytes = token(id);
    if (mergeable_ids_[mergeable_tokens_.find(bytes)] != id) continue;
    for (size_t split : token_lengths) {
      if (split >= bytes.size()) break;
      if (!is_token_length[bytes.size() - split]) continue;
      const uint32_t left = mergeable_tokens_.find(bytes.substr(0, split));
      if (left == StringTable::kMissing) continue;
      const uint32_t right = mergeable_tokens_.find(bytes.substr(split));
      if (right == StringTable::kMissing) continue;
      pair_to_token_.insert(mergeable_ids_[left], mergeable_ids_[right], id);
    }
  }
}

void Model::build_text_tokens() {
  // Special and byte-fallback ids keep an empty entry: decoding copies those as they are.
  const TokenId first_alphabet = num_special_ + kNumByteTokens;
  text_offsets_.assign(first_alphabet + 1, 0);
  for (TokenId id = first_alphabet; id < static_cast<TokenId>(vocab_size()); ++id) {
    const std::string_view bytes = token(id);
    for (size_t pos = 0; pos < bytes.size();) {
      if (bytes.compare(pos, 3, kSpaceMark) == 0) {
        text_bytes_.push_back(' ');
        pos += 3;
      } else {
        text_bytes_.push_back(bytes[pos++]);
      }
    }
    text_offsets_.push_back(text_bytes_.size());
  }
}

void Model::merge_short(std::vector<TokenId>& symbols) const {
  // ranks[i]: the token symbols[i] and symbols[i + 1] merge into (kNoToken when none); lower id = lower rank.
  TokenId ranks[kShortWordSymbols];
  size_t count = symbols.size();
  for (size_t i = 0; i + 1 < count; ++i) ranks[i] = merged(symbols[i], symbols[i + 1]);
  while (count > 1) {
    size_t best = 0;
    for (size_t i = 1; i + 1 < count; ++i) {
      if (ranks[i] < ranks[best]) best = i;
    }
    if (ranks[best] == kNoToken) break;
    symbols[best] = ranks[best];
    std::copy(symbols.begin() + best + 2, symbols.begin() + count, symbols.begin() + best + 1);
    if (best + 2 < count) std::copy(ranks + best + 2, ranks + count - 1, ranks + best + 1);
    --count;
    if (best + 1 < count) ranks[best] = merged(symbols[best], symbols[best + 1]);
    if (best > 0) ranks[best - 1] = merged(symbols[best - 1], symbols[best]);
  }
  symbols.resize(count);
}

void Model::merge_long(std::vector<TokenId>& symbols) const {
  // A linked list over the symbols and a min-heap of (rank, position) with lazy invalidation: O(n log n).
  const size_t count = symbols.size();
  constexpr size_t kNone = ~size_t{0};
  std::vector<size_t> next(count), previous(count);
  for (size_t i = 0; i < count; ++i) {
    next[i] = i + 1 < count ? i + 1 : kNone;
    previous[i] = i > 0 ? i - 1 : kNone;
  }
  using Candidate = std::pair<TokenId, size_t>;  // (rank, position of the left symbol): leftmost wins ties
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> heap;
  auto push_pair = [&](size_t left) {
    if (left == kNone || next[left] == kNone) return;
    const TokenId rank = merged(symbols[left], symbols[next[left]]);
    if (rank != kNoToken) heap.emplace(rank, left);
  };
  for (size_t i = 0; i + 1 < count; ++i) push_pair(i);
  std::vector<bool> removed(count, false);
  while (!heap.empty()) {
    const auto [rank, left] = heap.top();
    heap.pop();
    if (removed[left] || next[left] == kNone || merged(symbols[left], symbols[next[left]]) != rank) continue;
    const size_t right = next[left];
    symbols[left] = rank;
    removed[right] = true;
    next[left] = next[right];
    if (next[right] != kNone) previous[next[right]] = left;
    push_pair(previous[left]);
    push_pair(left);
  }
  size_t kept = 0;
  for (size_t i = 0; i < count; ++i) {
    if (!removed[i]) symbols[kept++] = symbols[i];
  }
  symbols.resize(kept);
}

void Model::merge_and_append(std::vector<TokenId>& symbols, std::vector<TokenId>& ids) const {
  if (symbols.size() <= kShortWordSymbols) {
    merge_short(symbols);
  } else {
    merge_long(symbols);
  }
  ids.insert(ids.end(), symbols.begin(), symbols.end());
  symbols.clear();
}

void Model::encode_piece(std::string_view piece, EncoderScratch& state, std::vector<TokenId>& ids) const {
  const uint64_t hash = hash_bytes(piece);
  const uint32_t whole = mergeable_tokens_.find(piece, hash);
  if (whole != StringTable::kMissing) {
    ids.push_back(mergeable_ids_[whole]);
    return;
  }
  const bool cacheable = cache_size_ > 0 && piece.size() <= kMaxCachedPieceBytes;
  if (cacheable) {
    if (state.cached_model != serial_) state.clear_cache(serial_);
    const uint32_t hit = state.cache_keys.find(piece, hash);
    if (hit != StringTable::kMissing) {
      ids.insert(ids.end(), state.cache_values.begin() + state.cache_value_starts[hit],
                 state.cache_values.begin() + state.cache_value_starts[hit + 1]);
      return;
    }
  }
  const size_t first_new = ids.size();
  std::vector<TokenId>& symbols = state.symbols;
  symbols.clear();
  if (level_ == Level::kByte) {
    for (unsigned char byte : piece) symbols.push_back(num_special_ + byte);
    merge_and_append(symbols, ids);
  } else {
    for (size_t pos = 0; pos < piece.size();) {
      const Decoded d = decode_utf8(piece, pos);
      const TokenId letter = d.valid ? alphabet_.find(d.code_point) : kNoToken;
      if (letter != kNoToken) {
        symbols.push_back(letter);
      } else {
        merge_and_append(symbols, ids);
        for (uint32_t i = 0; i < d.length; ++i) {
          ids.push_back(num_special_ + static_cast<unsigned char>(piece[pos + i]));
        }
      }
      pos += d.length;
    }
    merge_and_append(symbols, ids);
  }
  if (cacheable) {
    if (state.cache_keys.size() >= cache_size_) state.clear_cache(serial_);
    bool inserted = false;
    state.cache_keys.insert(piece, hash, inserted);
    state.cache_values.insert(state.cache_values.end(), ids.begin() + first_new, ids.end());
    state.cache_value_starts.push_back(state.cache_values.size());
  }
}

void Model::encode(std::string_view text, std::vector<TokenId>& ids) const {
  EncoderScratch& state = thread_scratch();
  const std::string_view view = level_ == Level::kByte ? text : mark_spaces(text, state.marked);
  for (size_t pos = 0; pos < view.size();) {
    state.pieces.clear();
    pos = next_pretokens(level_, view, pos, kPiecesPerBatch, state.pieces);
    for (std::string_view piece : state.pieces) encode_piece(piece, state, ids);
  }
}

void Model::encode_batch(const std::vector<std::string_view>& texts, int num_threads, std::vector<TokenId>& ids,
                         std::vector<int64_t>& offsets) const {
  const size_t count = texts.size();
  const int threads = static_cast<int>(std::min<size_t>(resolve_num_threads(num_threads), std::max<size_t>(count, 1)));
  // Small blocks handed out on demand balance uneven texts; each block's ids are gathered in order at the end.
  const size_t block_size = std::max<size_t>(1, count / (size_t{8} * threads));
  const size_t num_blocks = (count + block_size - 1) / block_size;
  std::vector<std::vector<TokenId>> block_ids(num_blocks);
  std::vector<int64_t> lengths(count);
  std::atomic<size_t> next_block{0};
  parallel_for(threads, [&](int) {
    for (size_t block; (block = next_block.fetch_add(1)) < num_blocks;) {
      std::vector<TokenId>& out = block_ids[block];
      const size_t end = std::min(count, (block + 1) * block_size);
      for (size_t i = block * block_size; i < end; ++i) {
        const size_t before = out.size();
        encode(texts[i], out);
        lengths[i] = static_cast<int64_t>(out.size() - before);
      }
    }
  });
  offsets.assign(count + 1, 0);
  for (size_t i = 0; i < count; ++i) offsets[i + 1] = offsets[i] + lengths[i];
  ids.clear();
  ids.reserve(static_cast<size_t>(offsets[count]));
  for (const std::vector<TokenId>& block : block_ids) ids.insert(ids.end(), block.begin(), block.end());
}

std::string Model::decode(const TokenId* ids, size_t count) const {
  std::string out;
  decode_into(ids, count, out);
  return out;
}

void Model::decode_into(const TokenId* ids, size_t count, std::string& out) const {
  // One pass checks the ids and sizes the output (the bytes of every token: char level only ever shrinks them),
  // one pass copies whole tokens into it.
  const TokenId vocab = static_cast<TokenId>(vocab_size());
  size_t bytes = 0;
  for (size_t i = 0; i < count; ++i) {
    if (ids[i] >= vocab) {
      throw std::invalid_argument("id " + std::to_string(ids[i]) + " (at position " + std::to_string(i) +
                                  ") is out of range for vocab size " + std::to_string(vocab));
    }
    bytes += token_offsets_[ids[i] + 1] - token_offsets_[ids[i]];
  }
  const size_t start = out.size();
  out.resize(start + bytes);
  char* write = out.data() + start;
  auto copy_token = [&](TokenId id) {
    const std::string_view bytes_of_id = token(id);
    std::memcpy(write, bytes_of_id.data(), bytes_of_id.size());
    write += bytes_of_id.size();
  };
  if (level_ == Level::kByte) {
    for (size_t i = 0; i < count; ++i) copy_token(ids[i]);
  } else {
    size_t run = 0;
    for (size_t i = 0; i < count; ++i) {
      if (ids[i] >= num_special_) continue;
      write = write_char_run(ids + run, i - run, write);
      copy_token(ids[i]);
      run = i + 1;
    }
    write = write_char_run(ids + run, count - run, write);
  }
  out.resize(static_cast<size_t>(write - out.data()));
}

char* Model::write_char_run(const TokenId* ids, size_t count, char* write) const {
  char* const start = write;
  const TokenId first_alphabet = num_special_ + kNumByteTokens;
  auto text_of = [&](TokenId id) {
    return std::string_view(text_bytes_).substr(text_offsets_[id], text_offsets_[id + 1] - text_offsets_[id]);
  };
  size_t i = 0;
  const bool starts_with_text_token = count > 0 && ids[0] >= first_alphabet;
  if (starts_with_text_token) {  // the usual case: the dummy prefix's space is dropped while copying
    std::string_view text = text_of(ids[0]);
    if (text[0] == ' ') text.remove_prefix(1);
    std::memcpy(write, text.data(), text.size());
    write += text.size();
    i = 1;
  }
  for (; i < count; ++i) {
    if (ids[i] >= first_alphabet) {
      const std::string_view text = text_of(ids[i]);
      std::memcpy(write, text.data(), text.size());
      write += text.size();
      continue;
    }
    // A byte-fallback token. Its byte may complete a '▁' whose first two bytes came from the fallback tokens
    // before it (text tokens are whole code points, so they neither end nor begin inside one).
    const char byte = static_cast<char>(ids[i] - num_special_);
    if (byte == kSpaceMark[2] && write - start >= 2 && write[-2] == kSpaceMark[0] && write[-1] == kSpaceMark[1]) {
      write -= 2;
      *write++ = ' ';
    } else {
      *write++ = byte;
    }
  }
  if (!starts_with_text_token && write > start && *start == ' ') {
    std::memmove(start, start + 1, static_cast<size_t>(write - start - 1));
    --write;
  }
  return write;
}

std::vector<std::string> Model::decode_batch(const TokenId* ids, const std::vector<int64_t>& offsets,
                                             int num_threads) const {
  const size_t count = offsets.empty() ? 0 : offsets.size() - 1;
  std::vector<std::string> out(count);
  const size_t parts = std::min<size_t>(resolve_num_threads(num_threads), std::max<size_t>(count, 1));
  parallel_for(static_cast<int>(parts), [&](int part) {
    for (size_t i = count * part / parts; i < count * (part + 1) / parts; ++i) {
      decode_into(ids + offsets[i], static_cast<size_t>(offsets[i + 1] - offsets[i]), out[i]);
    }
  });
  return out;
}

}  // namespace fastlm::bpe
