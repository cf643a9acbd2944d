// Model construction from hostile tokens and merges (what a tokenizer file can hold once parsed): the input
// describes a vocabulary that is mostly well formed (the specials, the 256 bytes, an alphabet, merges whose token
// is the concatenation of their parts) with faults sprinkled in (wrong bytes, out-of-range or later ids, repeated
// tokens, a wrong merge result). The constructor either raises std::invalid_argument or builds a model that
// encodes and decodes the rest of the input without fault.
#include <fuzzer/FuzzedDataProvider.h>

#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "bpe/unicode.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzedDataProvider input(data, size);
  const fuzz::Level level = input.ConsumeBool() ? fuzz::Level::kChar : fuzz::Level::kByte;
  const uint32_t num_special = input.ConsumeIntegralInRange<uint32_t>(0, 3);
  std::vector<std::string> tokens;
  for (uint32_t i = 0; i < num_special; ++i) tokens.push_back("<" + std::to_string(i) + ">");
  for (uint32_t byte = 0; byte < fastlm::bpe::kNumByteTokens; ++byte) tokens.emplace_back(1, static_cast<char>(byte));
  if (input.ConsumeProbability<float>() < 0.05f) {  // a wrong byte token
    tokens[num_special + input.ConsumeIntegral<uint8_t>()] = input.ConsumeRandomLengthString(4);
  }
  const size_t alphabet_size = level == fuzz::Level::kChar ? input.ConsumeIntegralInRange<size_t>(0, 8) : 0;
  for (size_t i = 0; i < alphabet_size; ++i) {
    std::string letter;
    fastlm::bpe::append_utf8(input.ConsumeBool() ? input.ConsumeIntegralInRange<uint32_t>('a', 'f')
                                                 : input.ConsumeIntegralInRange<uint32_t>(0, 0x10FFFF),
                             letter);
    tokens.push_back(input.ConsumeProbability<float>() < 0.05f ? input.ConsumeRandomLengthString(5) : letter);
  }
  const uint32_t base = static_cast<uint32_t>(tokens.size());
  const size_t num_merges = input.ConsumeIntegralInRange<size_t>(0, 48);
  std::vector<fuzz::Merge> merges;
  for (size_t k = 0; k < num_merges && input.remaining_bytes() > 0; ++k) {
    const uint32_t created = base + static_cast<uint32_t>(k);
    // Mostly ids of earlier mergeable tokens (biased to 'a'..'f' and the merges), sometimes anything.
    auto pick = [&]() -> uint32_t {
      const uint8_t choice = input.ConsumeIntegral<uint8_t>();
      if (choice < 8) return input.ConsumeIntegral<uint32_t>();
      if (choice < 128 && created > base) return input.ConsumeIntegralInRange<uint32_t>(base, created - 1);
      if (choice < 192 && base > num_special + 256) return input.ConsumeIntegralInRange<uint32_t>(num_special + 256, base - 1);
      return num_special + 'a' + input.ConsumeIntegralInRange<uint32_t>(0, 5);
    };
    const uint32_t left = pick(), right = pick();
    merges.emplace_back(left, right);
    const bool known = left < tokens.size() && right < tokens.size();
    tokens.push_back(known && input.ConsumeProbability<float>() >= 0.05f ? tokens[left] + tokens[right]
                                                                         : input.ConsumeRandomLengthString(6));
  }
  const std::string text = input.ConsumeRemainingBytesAsString();
  try {
    const fuzz::Model model(level, tokens, merges, num_special, 8);
    std::vector<fuzz::TokenId> ids;
    model.encode(text, ids);
    for (fuzz::TokenId id : ids) FUZZ_CHECK(id >= num_special && id < model.vocab_size());
    FUZZ_CHECK(model.decode(ids.data(), ids.size()) == fuzz::round_tripped(level, text));
  } catch (const std::invalid_argument&) {
  }
  return 0;
}
