// BPE training: count pre-tokens (streaming, in parallel), then the classic incremental merge loop.
//
// Tie-break: among pairs of equal count, the one with the smallest (left id, right id). This reproduces rustbpe's
// merges exactly (checked to vocab 32000 on the ko-en corpus); ordering ties by the pair's bytes instead does not
// (it parts from rustbpe at merge 151 of that corpus, where ' \xec\x88'+'\x98' and 'e'+'t' tie). Training stops
// at vocab_size tokens, when no pair is left, or when the best pair occurs fewer than min_frequency times.
// Results never depend on the thread count: counts are sums, and the order of words never matters.
#pragma once

#include <cstdint>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "bpe/hash_tables.h"
#include "bpe/level.h"
#include "bpe/model.h"

namespace fastlm::bpe {

// A file that cannot be opened or read (the binding raises OSError).
class FileError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct TrainResult {
  std::vector<std::string> tokens;  // id -> bytes, the id layout of fastlm/tokenizer.py
  std::vector<Merge> merges;        // merges[k] creates id tokens.size() - merges.size() + k
};

// Reports how far a long call has got: the bytes read so far (add_files, after each block) or the merges made so
// far (train, after each merge). Called on the calling thread; an exception it throws (a Python KeyboardInterrupt,
// say) stops the work and propagates to the caller.
using Progress = std::function<void(uint64_t done)>;

class Trainer {
 public:
  Trainer(Level level, int num_threads);

  // Counts the pre-tokens of each text. Char level: texts must be valid UTF-8 (checked by the caller).
  void add_texts(const std::vector<std::string_view>& texts);

  // Counts the pre-tokens of every line (without its "\n" or "\r\n") of each file, read in blocks. Char level:
  // throws std::invalid_argument naming file:line for invalid UTF-8. Byte level accepts any bytes.
  void add_files(const std::vector<std::string>& paths, const Progress& progress = {});

  // Throws std::invalid_argument when nothing was counted (no text, only empty lines), when vocab_size is below
  // the base alphabet (specials + 256 bytes + kept characters) or character_coverage is outside (0, 1].
  TrainResult train(size_t vocab_size, const std::vector<std::string>& special_tokens, uint64_t min_frequency,
                    double character_coverage, const Progress& progress = {});

 private:
  // Pre-token -> count; one per thread, summed into the first one by train().
  struct WordCounts {
    StringTable words;
    std::vector<uint64_t> counts;
    void add(std::string_view word, uint64_t count);
  };

  void count_lines(std::string_view block, WordCounts& counts, const std::string& path, size_t first_line) const;
  const WordCounts& merged_counts();

  Level level_;
  int num_threads_;
  std::mutex mutex_;  // one call at a time: callers may release their own locks (the GIL) around these calls
  std::vector<WordCounts> counts_;
};

}  // namespace fastlm::bpe
