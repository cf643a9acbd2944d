// Training on small random corpora: the input's first bytes pick the level, vocab size, min_frequency, character
// coverage and thread count; the rest, cut at '\n', is the corpus. Training either raises std::invalid_argument
// (nothing to train on, vocab below the alphabet) or gives a model that the Model constructor accepts, that
// results do not depend on the thread count, and that every line round-trips through the trained model.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "bpe/unicode.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider input(data, size);
  const fuzz::Level level = input.ConsumeBool() ? fuzz::Level::kChar : fuzz::Level::kByte;
  const size_t vocab_size = input.ConsumeIntegralInRange<size_t>(250, 700);
  const uint64_t min_frequency = input.ConsumeIntegralInRange<uint64_t>(1, 3);
  const double coverage = input.ConsumeBool() ? 1.0 : input.ConsumeIntegralInRange<int>(1, 100) / 100.0;
  const std::string corpus = input.ConsumeRemainingBytesAsString();
  std::vector<std::string_view> lines;
  for (size_t start = 0; start <= corpus.size();) {
    size_t end = corpus.find('\n', start);
    if (end == std::string::npos) end = corpus.size();
    const std::string_view line(corpus.data() + start, end - start);
    // Char-level training takes UTF-8 only (the Python layer checks it); invalid lines are left out there.
    if (level == fuzz::Level::kByte || fastlm::bpe::first_invalid_utf8(line) == line.size()) lines.push_back(line);
    start = end + 1;
  }
  fuzz::TrainResult results[2];
  for (int threads : {1, 2}) {
    fuzz::Trainer trainer(level, threads);
    trainer.add_texts(lines);
    try {
      results[threads - 1] = trainer.train(vocab_size, {"<pad>", "<s>"}, min_frequency, coverage);
    } catch (const std::invalid_argument&) {
      return 0;
    }
  }
  FUZZ_CHECK(results[0].tokens == results[1].tokens && results[0].merges == results[1].merges);
  FUZZ_CHECK(results[0].tokens.size() <= vocab_size);
  const fuzz::Model model(level, results[0].tokens, results[0].merges, fuzz::kNumSpecial, 16);
  for (std::string_view line : lines) {
    std::vector<fuzz::TokenId> ids;
    model.encode(line, ids);
    FUZZ_CHECK(model.decode(ids.data(), ids.size()) == fuzz::round_tripped(level, line));
  }
  return 0;
}
