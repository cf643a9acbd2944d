#include "bpe/trainer.h"

#include <algorithm>
#include <cmath>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <memory>
#include <numeric>
#include <stdexcept>

#include "bpe/pretokenize.h"
#include "bpe/thread_pool.h"
#include "bpe/unicode.h"

namespace fastlm::bpe {
namespace {

constexpr size_t kFileBlockBytes = size_t{8} << 20;

inline uint64_t pair_key(TokenId left, TokenId right) { return (uint64_t{left} << 32) | right; }
inline TokenId left_of(uint64_t key) { return static_cast<TokenId>(key >> 32); }
inline TokenId right_of(uint64_t key) { return static_cast<TokenId>(key); }

// The words to merge: every word's symbols back to back; words shrink in place as merges apply. A word's
// bookkeeping sits in one struct, since merging visits words in no particular order (one cache miss, not four).
struct Word {
  uint64_t offset;  // of its first symbol
  uint64_t count;   // occurrences in the corpus
  uint32_t length;  // symbols left
  uint32_t stamp;   // the last merge that visited it
};

// Words longer than this many symbols are merged where their pairs occur instead of being rescanned whole by every
// merge that touches them: one giant pre-token (a megabyte of text without a space) would otherwise cost its length
// times the vocabulary. Shorter words are cheaper to rescan than to track position by position.
constexpr size_t kLongWord = 256;

// Where a pair occurs: a short word's index, or (kPosition set) a position in the long words.
constexpr uint32_t kPosition = 1U << 31;

// The long words, symbols linked both ways so that a merge unlinks its right symbol in place. A position is an
// index into `symbols`; a symbol merged away is kRemoved, so stale positions never match a pair again.
struct LongWords {
  static constexpr uint32_t kNone = ~0U;
  static constexpr TokenId kRemoved = ~0U;
  std::vector<TokenId> symbols;
  std::vector<uint32_t> next, previous;
  std::vector<uint32_t> starts;  // of each word, ascending
  std::vector<uint64_t> counts;  // of each word

  void add(const std::vector<TokenId>& word, uint64_t count) {
    if (symbols.size() + word.size() >= kPosition) {
      throw std::length_error("BPE training: the words longer than " + std::to_string(kLongWord) +
                              " symbols hold more than 2^31 symbols in all; split the text into shorter lines");
    }
    const uint32_t start = static_cast<uint32_t>(symbols.size()), end = start + static_cast<uint32_t>(word.size());
    starts.push_back(start);
    counts.push_back(count);
    // Grown by whole words, not symbol by symbol: one giant word then takes its size, not up to twice that.
    symbols.insert(symbols.end(), word.begin(), word.end());
    previous.resize(end);
    next.resize(end);
    for (uint32_t p = start; p < end; ++p) {
      previous[p] = p == start ? kNone : p - 1;
      next[p] = p + 1 == end ? kNone : p + 1;
    }
  }

  uint64_t count_at(uint32_t position) const {
    return counts[std::upper_bound(starts.begin(), starts.end(), position) - starts.begin() - 1];
  }
};

struct Words {
  std::vector<TokenId> symbols;
  std::vector<Word> words;
  LongWords long_words;

  void add(const std::vector<TokenId>& word, uint64_t count) {
    if (word.size() < 2) return;  // nothing to merge
    if (word.size() > kLongWord) return long_words.add(word, count);
    if (words.size() == kPosition) throw std::length_error("BPE training: more than 2^31 distinct words");
    words.push_back({symbols.size(), count, static_cast<uint32_t>(word.size()), 0});
    symbols.insert(symbols.end(), word.begin(), word.end());
  }
  size_t size() const { return words.size(); }
};

// Pair statistics: pair -> index; per index its key, total count and where it occurs (short words and long-word
// positions; the list may hold stale entries and repeats: each is checked when the pair is merged).
struct PairStats {
  U64Map index;
  std::vector<uint64_t> keys;
  std::vector<int64_t> counts;
  std::vector<std::vector<uint32_t>> occurrences;

  uint32_t slot(uint64_t key) {
    const uint32_t slot = index.find_or_insert(key, static_cast<uint32_t>(keys.size()));
    if (slot == keys.size()) {
      keys.push_back(key);
      counts.push_back(0);
      occurrences.emplace_back();
    }
    return slot;
  }

  void add(uint64_t key, int64_t count, uint32_t occurrence) {
    const uint32_t i = slot(key);
    counts[i] += count;
    std::vector<uint32_t>& list = occurrences[i];
    if (list.empty() || list.back() != occurrence) list.push_back(occurrence);
  }

  void subtract(uint64_t key, int64_t count) {
    const uint32_t i = index.find(key);
    counts[i] -= count;
    // Counts are exact: at 0 no occurrence is left, and the list holds only stale entries. Long lists are freed
    // then (a giant word's pairs), short ones at the end (freeing them as they empty slows training by ~7%).
    if (counts[i] == 0 && occurrences[i].capacity() > 1024) std::vector<uint32_t>().swap(occurrences[i]);
  }
};

PairStats count_pairs(const Words& words, size_t begin, size_t end) {
  PairStats stats;
  for (size_t w = begin; w < end; ++w) {
    const Word& word = words.words[w];
    const TokenId* s = words.symbols.data() + word.offset;
    for (uint32_t i = 0; i + 1 < word.length; ++i) {
      stats.add(pair_key(s[i], s[i + 1]), static_cast<int64_t>(word.count), static_cast<uint32_t>(w));
    }
  }
  return stats;
}

// Counts pairs on all threads, each over a contiguous range of words, then sums the ranges in word order.
PairStats count_pairs_parallel(const Words& words, int num_threads) {
  const int parts = static_cast<int>(std::min<size_t>(num_threads, std::max<size_t>(1, words.size() / 1024)));
  std::vector<PairStats> partial(parts);
  parallel_for(parts, [&](int part) {
    partial[part] = count_pairs(words, words.size() * part / parts, words.size() * (part + 1) / parts);
  });
  PairStats total = std::move(partial[0]);
  for (int part = 1; part < parts; ++part) {
    const PairStats& more = partial[part];
    for (size_t i = 0; i < more.keys.size(); ++i) {
      const uint32_t slot = total.slot(more.keys[i]);
      total.counts[slot] += more.counts[i];
      std::vector<uint32_t>& list = total.occurrences[slot];
      list.insert(list.end(), more.occurrences[i].begin(), more.occurrences[i].end());
    }
  }
  const LongWords& long_words = words.long_words;
  for (uint32_t p = 0; p + 1 < long_words.symbols.size(); ++p) {
    if (long_words.next[p] == p + 1) {
      total.add(pair_key(long_words.symbols[p], long_words.symbols[p + 1]),
                static_cast<int64_t>(long_words.count_at(p)), kPosition | p);
    }
  }
  return total;
}

// The characters kept in the char-level alphabet: by count (desc), ties by code point (asc), until their share
// of all character occurrences reaches character_coverage.
std::vector<uint32_t> choose_alphabet(const StringTable& words, const std::vector<uint64_t>& word_counts,
                                      double character_coverage) {
  U64Map index;
  std::vector<uint32_t> code_points;
  std::vector<uint64_t> counts;
  for (uint32_t w = 0; w < words.size(); ++w) {
    const std::string_view word = words.key(w);
    for (size_t pos = 0; pos < word.size();) {
      const Decoded d = decode_utf8(word, pos);
      pos += d.length;
      if (!d.valid) continue;  // invalid bytes always go through byte fallback
      uint32_t& slot = index.find_or_insert(d.code_point, static_cast<uint32_t>(code_points.size()));
      if (slot == code_points.size()) {
        code_points.push_back(d.code_point);
        counts.push_back(0);
      }
      counts[slot] += word_counts[w];
    }
  }
  std::vector<uint32_t> order(code_points.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) {
    return counts[a] != counts[b] ? counts[a] > counts[b] : code_points[a] < code_points[b];
  });
  const double total = static_cast<double>(std::accumulate(counts.begin(), counts.end(), uint64_t{0}));
  std::vector<uint32_t> kept;
  double covered = 0;
  for (uint32_t i : order) {
    if (character_coverage < 1.0 && covered >= character_coverage * total) break;
    kept.push_back(code_points[i]);
    covered += static_cast<double>(counts[i]);
  }
  return kept;
}

// Byte level: a word's bytes as byte tokens. Char level: its runs of alphabet characters (a character outside
// the alphabet goes through byte fallback and never merges, so it splits the word).
void add_symbols(Level level, std::string_view word, uint64_t count, TokenId first_byte, const U64Map& alphabet,
                 std::vector<TokenId>& scratch, Words& words) {
  scratch.clear();
  if (level == Level::kByte) {
    for (unsigned char byte : word) scratch.push_back(first_byte + byte);
    words.add(scratch, count);
    return;
  }
  for (size_t pos = 0; pos < word.size();) {
    const Decoded d = decode_utf8(word, pos);
    pos += d.length;
    const TokenId id = d.valid ? alphabet.find(d.code_point) : U64Map::kMissing;
    if (id != U64Map::kMissing) {
      scratch.push_back(id);
    } else {
      words.add(scratch, count);
      scratch.clear();
    }
  }
  words.add(scratch, count);
}

// The merge loop's state: words, pair statistics, a max-heap of (count, pair) with lazy invalidation.
class Merger {
  struct Entry {
    int64_t count;
    uint32_t pair;
  };

  // The heap's order: higher count first, then the smaller (left id, right id).
  auto lower_priority() const {
    return [this](const Entry& a, const Entry& b) {
      if (a.count != b.count) return a.count < b.count;
      return stats_.keys[a.pair] > stats_.keys[b.pair];
    };
  }

 public:
  Merger(Words words, std::vector<std::string> tokens, int num_threads)
      : words_(std::move(words)),
        tokens_(std::move(tokens)),
        stats_(count_pairs_parallel(words_, num_threads)) {
    for (uint32_t i = 0; i < stats_.keys.size(); ++i) {
      if (stats_.counts[i] > 0) heap_.push_back({stats_.counts[i], i});
    }
    std::make_heap(heap_.begin(), heap_.end(), lower_priority());
  }

  TrainResult run(size_t vocab_size, uint64_t min_frequency, const Progress& progress) {
    std::vector<Merge> merges;
    while (tokens_.size() < vocab_size && !heap_.empty()) {
      std::pop_heap(heap_.begin(), heap_.end(), lower_priority());
      const Entry top = heap_.back();
      heap_.pop_back();
      const int64_t current = stats_.counts[top.pair];
      if (current != top.count) {  // counts only fall: re-queue with the true count
        if (current > 0) push({current, top.pair});
        continue;
      }
      if (static_cast<uint64_t>(current) < min_frequency) break;
      const uint64_t key = stats_.keys[top.pair];
      merges.emplace_back(left_of(key), right_of(key));
      apply_merge(top.pair, static_cast<TokenId>(tokens_.size()));
      if (progress) progress(merges.size());
    }
    return {std::move(tokens_), std::move(merges)};
  }

 private:
  void push(Entry entry) {
    heap_.push_back(entry);
    std::push_heap(heap_.begin(), heap_.end(), lower_priority());
  }

  void apply_merge(uint32_t pair, TokenId created) {
    const uint64_t key = stats_.keys[pair];
    const TokenId left = left_of(key), right = right_of(key);
    tokens_.push_back(tokens_[left] + tokens_[right]);
    std::vector<uint32_t> occurrences = std::move(stats_.occurrences[pair]);
    stats_.occurrences[pair] = {};
    const size_t first_new_pair = stats_.keys.size();
    ++stamp_;
    // Positions sort after words, and in order: left to right in each long word, as merge_in_word goes.
    const auto positions = std::partition(occurrences.begin(), occurrences.end(),
                                          [](uint32_t occurrence) { return !(occurrence & kPosition); });
    std::sort(positions, occurrences.end());
    for (auto it = occurrences.begin(); it != positions; ++it) {
      Word& word = words_.words[*it];
      if (word.stamp == stamp_) continue;
      word.stamp = stamp_;
      merge_in_word(*it, word, left, right, created);
    }
    for (auto it = positions; it != occurrences.end(); ++it) merge_at(*it & ~kPosition, left, right, created);
    stats_.counts[pair] = 0;
    // Only pairs with the new token are new, and they are exactly the ones added while merging.
    for (size_t i = first_new_pair; i < stats_.keys.size(); ++i) {
      if (stats_.counts[i] > 0) push({stats_.counts[i], static_cast<uint32_t>(i)});
    }
  }

  // Replaces (left, right) by `created` left to right in word w, updating the counts of the neighbouring pairs.
  void merge_in_word(uint32_t w, Word& word, TokenId left, TokenId right, TokenId created) {
    TokenId* s = words_.symbols.data() + word.offset;
    const uint32_t length = word.length;
    const int64_t count = static_cast<int64_t>(word.count);
    uint32_t out = 0;
    for (uint32_t i = 0; i < length;) {
      if (i + 1 < length && s[i] == left && s[i + 1] == right) {
        if (out > 0) {
          stats_.subtract(pair_key(s[out - 1], left), count);
          stats_.add(pair_key(s[out - 1], created), count, w);
        }
        if (i + 2 < length) {
          stats_.subtract(pair_key(right, s[i + 2]), count);
          stats_.add(pair_key(created, s[i + 2]), count, w);
        }
        s[out++] = created;
        i += 2;
      } else {
        s[out++] = s[i++];
      }
    }
    word.length = out;
  }

  // Merges (left, right) at a position of a long word, if it still holds them.
  void merge_at(uint32_t p, TokenId left, TokenId right, TokenId created) {
    LongWords& w = words_.long_words;
    const uint32_t q = w.next[p];
    if (w.symbols[p] != left || q == LongWords::kNone || w.symbols[q] != right) return;
    const int64_t count = static_cast<int64_t>(w.count_at(p));
    const uint32_t before = w.previous[p], after = w.next[q];
    if (before != LongWords::kNone) {
      stats_.subtract(pair_key(w.symbols[before], left), count);
      stats_.add(pair_key(w.symbols[before], created), count, kPosition | before);
    }
    if (after != LongWords::kNone) {
      stats_.subtract(pair_key(right, w.symbols[after]), count);
      stats_.add(pair_key(created, w.symbols[after]), count, kPosition | p);
      w.previous[after] = p;
    }
    w.symbols[p] = created;
    w.symbols[q] = LongWords::kRemoved;
    w.next[p] = after;
  }

  Words words_;
  std::vector<std::string> tokens_;
  PairStats stats_;
  uint32_t stamp_ = 0;
  std::vector<Entry> heap_;
};

}  // namespace

void Trainer::WordCounts::add(std::string_view word, uint64_t count) {
  bool inserted = false;
  const uint32_t index = words.insert(word, inserted);
  if (inserted) counts.push_back(0);
  counts[index] += count;
}

Trainer::Trainer(Level level, int num_threads)
    : level_(level), num_threads_(resolve_num_threads(num_threads)), counts_(num_threads_) {}

void Trainer::add_texts(const std::vector<std::string_view>& texts) {
  std::lock_guard<std::mutex> lock(mutex_);
  const int parts = static_cast<int>(std::min<size_t>(num_threads_, std::max<size_t>(1, texts.size())));
  parallel_for(parts, [&](int part) {
    std::string scratch;
    std::vector<std::string_view> pieces;
    WordCounts& counts = counts_[part];
    for (size_t i = texts.size() * part / parts; i < texts.size() * (part + 1) / parts; ++i) {
      pretokenize(level_, texts[i], scratch, pieces);
      for (std::string_view piece : pieces) counts.add(piece, 1);
    }
  });
}

void Trainer::count_lines(std::string_view block, WordCounts& counts, const std::string& path,
                          size_t first_line) const {
  std::string scratch;
  std::vector<std::string_view> pieces;
  size_t line_number = first_line;
  for (size_t start = 0; start < block.size(); ++line_number) {
    size_t end = block.find('\n', start);
    if (end == std::string_view::npos) end = block.size();
    std::string_view line = block.substr(start, end - start);
    start = end + 1;
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (level_ == Level::kChar) {
      const size_t bad = first_invalid_utf8(line);
      if (bad != line.size()) {
        throw std::invalid_argument(path + ":" + std::to_string(line_number) + ": invalid UTF-8 at byte " +
                                    std::to_string(bad + 1) + " of the line (char-level training needs UTF-8)");
      }
    }
    pretokenize(level_, line, scratch, pieces);
    for (std::string_view piece : pieces) counts.add(piece, 1);
  }
}

void Trainer::add_files(const std::vector<std::string>& paths, const Progress& progress) {
  std::lock_guard<std::mutex> lock(mutex_);
  uint64_t bytes_read = 0;
  for (const std::string& path : paths) {
    std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
    if (!file) throw FileError("cannot open \"" + path + "\": " + std::strerror(errno));
    std::string block;
    size_t lines_before = 1;  // the line number of block's first line
    bool at_end = false;
    while (!at_end) {
      const size_t kept = block.size();
      block.resize(kept + kFileBlockBytes);
      const size_t got = std::fread(&block[kept], 1, kFileBlockBytes, file.get());
      block.resize(kept + got);
      if (got < kFileBlockBytes) {
        if (std::ferror(file.get())) throw FileError("cannot read \"" + path + "\"");
        at_end = true;
      }
      // Whole lines only; the rest waits for the next block.
      const size_t usable = at_end ? block.size() : block.rfind('\n') + 1;
      if (usable == 0 && !at_end) continue;  // one line longer than a block: read more
      const std::string_view lines(block.data(), usable);
      // Split at line starts into one range per thread; each range's first line number for error messages.
      const int parts = num_threads_;
      std::vector<size_t> bounds(parts + 1, usable);
      bounds[0] = 0;
      for (int part = 1; part < parts; ++part) {
        const size_t target = std::max(bounds[part - 1], usable * part / parts);
        const size_t newline = lines.find('\n', target == 0 ? 0 : target - 1);
        bounds[part] = newline == std::string_view::npos ? usable : newline + 1;
      }
      std::vector<size_t> first_lines(parts);
      size_t line = lines_before;
      for (int part = 0; part < parts; ++part) {
        first_lines[part] = line;
        line += std::count(lines.begin() + bounds[part], lines.begin() + bounds[part + 1], '\n');
      }
      parallel_for(parts, [&](int part) {
        count_lines(lines.substr(bounds[part], bounds[part + 1] - bounds[part]), counts_[part], path,
                    first_lines[part]);
      });
      lines_before = line;
      block.erase(0, usable);
      bytes_read += usable;
      if (progress) progress(bytes_read);
    }
  }
}

const Trainer::WordCounts& Trainer::merged_counts() {
  WordCounts& total = counts_[0];
  for (size_t part = 1; part < counts_.size(); ++part) {
    WordCounts& more = counts_[part];
    for (uint32_t w = 0; w < more.words.size(); ++w) total.add(more.words.key(w), more.counts[w]);
    more = WordCounts();
  }
  return total;
}

TrainResult Trainer::train(size_t vocab_size, const std::vector<std::string>& special_tokens,
                           uint64_t min_frequency, double character_coverage, const Progress& progress) {
  if (!(character_coverage > 0.0 && character_coverage <= 1.0)) {
    throw std::invalid_argument("character_coverage must be in (0, 1], got " + std::to_string(character_coverage));
  }
  std::lock_guard<std::mutex> lock(mutex_);
  const WordCounts& counts = merged_counts();
  if (counts.words.size() == 0) {
    throw std::invalid_argument("nothing to train on: the texts and files given hold no text");
  }
  std::vector<std::string> tokens(special_tokens.begin(), special_tokens.end());
  const TokenId first_byte = static_cast<TokenId>(tokens.size());
  for (uint32_t byte = 0; byte < kNumByteTokens; ++byte) tokens.emplace_back(1, static_cast<char>(byte));
  U64Map alphabet;
  if (level_ == Level::kChar) {
    for (uint32_t code_point : choose_alphabet(counts.words, counts.counts, character_coverage)) {
      alphabet.find_or_insert(code_point, static_cast<TokenId>(tokens.size()));
      std::string bytes;
      append_utf8(code_point, bytes);
      tokens.push_back(std::move(bytes));
    }
  }
  if (vocab_size < tokens.size()) {
    throw std::invalid_argument(
        "vocab_size " + std::to_string(vocab_size) + " is smaller than the base alphabet: " +
        std::to_string(special_tokens.size()) + " special tokens + 256 bytes" +
        (level_ == Level::kChar ? " + " + std::to_string(alphabet.size()) + " characters" : std::string()) +
        " = " + std::to_string(tokens.size()));
  }
  Words words;
  {
    std::vector<TokenId> scratch;  // as long as the longest word: freed before merging
    for (uint32_t w = 0; w < counts.words.size(); ++w) {
      add_symbols(level_, counts.words.key(w), counts.counts[w], first_byte, alphabet, scratch, words);
    }
  }
  return Merger(std::move(words), std::move(tokens), num_threads_).run(vocab_size, min_frequency, progress);
}

}  // namespace fastlm::bpe
