// Unit tests of the native BPE core (run by ctest). No framework: CHECK records failures, main() reports them.
#include <cstdio>
#include <fstream>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "bpe/model.h"
#include "bpe/pretokenize.h"
#include "bpe/trainer.h"
#include "bpe/unicode.h"

using namespace fastlm::bpe;

namespace {

int failures = 0;

#define CHECK(condition)                                                           \
  do {                                                                             \
    if (!(condition)) {                                                            \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #condition); \
      ++failures;                                                                  \
    }                                                                              \
  } while (0)

// True when fn throws E whose message contains `needle`.
template <typename E>
bool throws(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
  } catch (const E& error) {
    return std::string(error.what()).find(needle) != std::string::npos;
  }
  return false;
}

std::vector<std::string> split(Level level, const std::string& text) {
  std::string scratch;
  std::vector<std::string_view> pieces;
  pretokenize(level, text, scratch, pieces);
  return {pieces.begin(), pieces.end()};
}

Model model_of(Level level, const TrainResult& trained, uint32_t num_special) {
  return Model(level, trained.tokens, trained.merges, num_special, 1024);
}

std::vector<TokenId> encode(const Model& model, const std::string& text) {
  std::vector<TokenId> ids;
  model.encode(text, ids);
  return ids;
}

std::string decode(const Model& model, const std::vector<TokenId>& ids) { return model.decode(ids.data(), ids.size()); }

const std::vector<std::string> kCorpus = {
    "The quick brown fox jumps over the lazy dog.", "나는 학교에 갑니다.", "오늘 날씨가 정말 좋네요!",
    "We'll meet at 10:30 in Seoul.", "서울에서 2024년에 만나요 😀", "It's the dog's toy, isn't it?",
    "한국어와 English를 섞어 쓴 문장입니다.", "e\u0301te\u0301 ca fe\u0301 \t tabs\nand lines",
};

TrainResult train(Level level, const std::vector<std::string>& texts, size_t vocab_size, int num_threads,
                  uint64_t min_frequency = 1, double coverage = 1.0) {
  Trainer trainer(level, num_threads);
  std::vector<std::string_view> views(texts.begin(), texts.end());
  trainer.add_texts(views);
  return trainer.train(vocab_size, {"<pad>", "<s>"}, min_frequency, coverage);
}

void test_utf8() {
  const std::string text = "a\xC3\xA9\xED\x95\x9C\xF0\x9F\x98\x80";  // a é 한 😀
  Decoded d = decode_utf8(text, 0);
  CHECK(d.valid && d.code_point == 'a' && d.length == 1);
  d = decode_utf8(text, 1);
  CHECK(d.valid && d.code_point == 0xE9 && d.length == 2);
  d = decode_utf8(text, 3);
  CHECK(d.valid && d.code_point == 0xD55C && d.length == 3);
  d = decode_utf8(text, 6);
  CHECK(d.valid && d.code_point == 0x1F600 && d.length == 4);
  for (const std::string bad : {"\xC0\x80", "\xED\xA0\x80", "\xE2\x96", "\xF5\x80\x80\x80", "\x80", "\xF0\x8F\xBF\xBF"}) {
    d = decode_utf8(bad, 0);
    CHECK(!d.valid && d.length == 1);
    CHECK(first_invalid_utf8(bad) == 0);
  }
  std::string encoded;
  for (uint32_t cp : {0x41u, 0xE9u, 0xD55Cu, 0x1F600u}) append_utf8(cp, encoded);
  CHECK(encoded == "A\xC3\xA9\xED\x95\x9C\xF0\x9F\x98\x80");
  CHECK(first_invalid_utf8(text) == text.size());
  CHECK(code_point_class('a') == kLetter && code_point_class('7') == kNumber);
  CHECK(code_point_class(' ') == kWhitespace && code_point_class(0x1C) == 0);  // \s in `regex` excludes U+001C
  CHECK(code_point_class(0xD55C) == (kLetter | kHangul) && code_point_class('!') == 0);
  CHECK(code_point_class(0x301) == kMark && code_point_class(0x93F) == kMark);  // combining acute, Devanagari i
}

void test_cl100k_split() {
  using V = std::vector<std::string>;
  CHECK(split(Level::kByte, "Hello world") == (V{"Hello", " world"}));
  CHECK(split(Level::kByte, "it's THEY'RE we'LL") == (V{"it", "'s", " THEY", "'RE", " we", "'LL"}));
  CHECK(split(Level::kByte, "'\xC5\xBF") == (V{"'\xC5\xBF"}));  // (?i:'s) also matches U+017F LONG S
  CHECK(split(Level::kByte, "12345") == (V{"123", "45"}));
  CHECK(split(Level::kByte, "a  b") == (V{"a", " ", " b"}));
  CHECK(split(Level::kByte, "x\n\n  y") == (V{"x", "\n\n", " ", " y"}));
  CHECK(split(Level::kByte, "end   ") == (V{"end", "   "}));
  CHECK(split(Level::kByte, " ?!\n\nok") == (V{" ?!\n\n", "ok"}));
  CHECK(split(Level::kByte, "\xEC\x84\x9C\xEC\x9A\xB8 2024") == (V{"\xEC\x84\x9C\xEC\x9A\xB8", " ", "202", "4"}));
  CHECK(split(Level::kByte, "") == V{});
  CHECK(split(Level::kByte, "a\xFF" "b") == (V{"a", "\xFF" "b"}));  // an invalid byte is an "other" character
}

void test_char_split() {
  using V = std::vector<std::string>;
  CHECK(split(Level::kChar, "I go") == (V{"\xE2\x96\x81I", "\xE2\x96\x81go"}));
  // 서울에서2024년 Seoul에서
  CHECK(split(Level::kChar, "\xEC\x84\x9C\xEC\x9A\xB8\x32\x30\x32\x34\xEB\x85\x84 Seoul\xEC\x97\x90") ==
        (V{"\xE2\x96\x81\xEC\x84\x9C\xEC\x9A\xB8", "2024", "\xEB\x85\x84", "\xE2\x96\x81Seoul", "\xEC\x97\x90"}));
  CHECK(split(Level::kChar, "a  b") == (V{"\xE2\x96\x81" "a", "\xE2\x96\x81", "\xE2\x96\x81" "b"}));
  CHECK(split(Level::kChar, "") == V{});
  // A combining mark continues a letter run (e + U+0301 here) and is "other" after anything else (1 + U+0301).
  CHECK(split(Level::kChar, "e\xCC\x81!") == (V{"\xE2\x96\x81" "e\xCC\x81", "!"}));
  CHECK(split(Level::kChar, "1\xCC\x81") == (V{"\xE2\x96\x81" "1", "\xCC\x81"}));
}

void test_textbook_training() {
  Trainer trainer(Level::kByte, 1);
  trainer.add_texts({"aaabdaaabac"});
  const TrainResult result = trainer.train(1000, {}, 2, 1.0);
  // aa -> 256; then ab (2) ties 256+a (2) and wins on the smaller ids; then 256+257 (2); all others occur once.
  const std::vector<Merge> expected = {{'a', 'a'}, {'a', 'b'}, {256, 257}};
  CHECK(result.merges == expected);
  CHECK(result.tokens.size() == 259 && result.tokens[258] == "aaab");
  const Model model = model_of(Level::kByte, result, 0);
  CHECK(encode(model, "aaabdaaabac") == (std::vector<TokenId>{258, 'd', 258, 'a', 'c'}));
}

void test_round_trip_and_determinism() {
  for (Level level : {Level::kByte, Level::kChar}) {
    const TrainResult one = train(level, kCorpus, 600, 1);
    const TrainResult two = train(level, kCorpus, 600, 2);
    CHECK(one.tokens == two.tokens && one.merges == two.merges);
    CHECK(one.merges.size() > 10);
    const Model model = model_of(level, one, 2);
    std::vector<std::string> texts = kCorpus;
    texts.push_back("");
    texts.push_back(" leading and trailing ");
    texts.push_back("\x01\x02 control \x7F and \xE2\x80\x8B zero width");
    texts.push_back("\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x92\xBB unseen \xE6\xBC\xA2\xE5\xAD\x97");
    texts.push_back(std::string(100000, 'a'));  // a very long word: the O(n log n) merge path
    for (const std::string& text : texts) {
      const std::vector<TokenId> ids = encode(model, text);
      CHECK(decode(model, ids) == text);
      for (TokenId id : ids) CHECK(id >= 2);  // never a special token
    }
    std::vector<TokenId> flat;
    std::vector<int64_t> offsets;
    std::vector<std::string_view> views(texts.begin(), texts.end());
    model.encode_batch(views, 2, flat, offsets);
    CHECK(offsets.size() == texts.size() + 1);
    for (size_t i = 0; i < texts.size(); ++i) {
      CHECK(std::vector<TokenId>(flat.begin() + offsets[i], flat.begin() + offsets[i + 1]) == encode(model, texts[i]));
    }
  }
  // Byte level: any bytes round-trip.
  const Model bytes_model = model_of(Level::kByte, train(Level::kByte, kCorpus, 400, 2), 2);
  const std::string raw("\xFF\xFE\x00 abc \xC3", 9);
  CHECK(decode(bytes_model, encode(bytes_model, raw)) == raw);
}

void test_long_word_matches_short_path() {
  // "abcd" * 40 is one 160-byte word (the heap-based long path); no merge joins "d" and "a" (that pair never
  // occurs in training), so it must encode as 40 copies of what the short path gives for "abcd".
  const Model model = model_of(Level::kByte, train(Level::kByte, {"abababab cdcdcd abcd"}, 270, 1), 2);
  const std::string unit = "abcd";
  std::string longer;
  std::vector<TokenId> expected;
  const std::vector<TokenId> unit_ids = encode(model, unit);
  for (int i = 0; i < 40; ++i) {
    longer += unit;
    expected.insert(expected.end(), unit_ids.begin(), unit_ids.end());
  }
  CHECK(unit_ids.size() < unit.size());  // some merge applied
  CHECK(encode(model, longer) == expected);
}

// Training on one long run of a character gives tokens of 2^k bytes up to half the run: the model's pair table
// must be built without testing every split of each (O(length^2) bytes hashed: hours for this 1 MiB run).
void test_megabyte_tokens() {
  const Model model = model_of(Level::kByte, train(Level::kByte, {std::string(size_t{1} << 20, 'a')}, 1000, 1), 2);
  CHECK(encode(model, std::string((size_t{1} << 20) + 1, 'a')).size() == 2);
}

void test_char_level_coverage() {
  std::vector<std::string> texts(50, "aaaa bbb cc");
  texts.push_back("z");
  const TrainResult result = train(Level::kChar, texts, 1000, 2, 1, 0.99);
  const Model model = model_of(Level::kChar, result, 2);
  // 'z' is rare: it is left out of the alphabet and encodes as its byte-fallback token.
  const std::vector<TokenId> ids = encode(model, "z");
  CHECK(ids.size() == 2 && ids[1] == 2 + 'z');
  CHECK(decode(model, ids) == "z");
  CHECK(throws<std::invalid_argument>([&] { train(Level::kChar, texts, 260, 1); }, "smaller than the base alphabet"));
  CHECK(throws<std::invalid_argument>([&] { train(Level::kChar, {"", ""}, 1000, 1); }, "nothing to train on"));
}

void test_bad_models_rejected() {
  const TrainResult good = train(Level::kByte, kCorpus, 300, 1);
  auto build = [](Level level, std::vector<std::string> tokens, std::vector<Merge> merges) {
    return [=] { Model(level, tokens, merges, 2, 16); };
  };
  std::vector<Merge> merges = good.merges;
  merges[0] = {2, 9999};
  CHECK(throws<std::invalid_argument>(build(Level::kByte, good.tokens, merges), "9999"));
  merges = good.merges;
  merges[1] = {258, 258 + 40};  // a token not defined yet
  CHECK(throws<std::invalid_argument>(build(Level::kByte, good.tokens, merges), "uses id"));
  merges = good.merges;
  merges[0] = {0, 3};  // a special token
  CHECK(throws<std::invalid_argument>(build(Level::kByte, good.tokens, merges), "uses id 0"));
  std::vector<std::string> tokens = good.tokens;
  tokens[2 + 65] = "B";
  CHECK(throws<std::invalid_argument>(build(Level::kByte, tokens, good.merges), "single byte 65"));
  tokens = good.tokens;
  tokens.back() += "x";
  CHECK(throws<std::invalid_argument>(build(Level::kByte, tokens, good.merges), "should create"));
  tokens = good.tokens;
  tokens.pop_back();
  CHECK(throws<std::invalid_argument>(build(Level::kByte, tokens, good.merges), "entries"));
  merges = good.merges;
  tokens = good.tokens;
  merges[1] = merges[0];  // training never learns a pair twice
  tokens[258 + 1] = tokens[258];
  CHECK(throws<std::invalid_argument>(build(Level::kByte, tokens, merges), "repeats merges[0]"));
  tokens = good.tokens;
  tokens.back() = std::string(1 << 20, 'x');  // a giant wrong token is named by its start and its length
  CHECK(throws<std::invalid_argument>(build(Level::kByte, tokens, good.merges), "... (1048576 bytes)"));
  const Model model = model_of(Level::kByte, good, 2);
  const std::vector<TokenId> out_of_range = {5, 300};
  CHECK(throws<std::invalid_argument>([&] { decode(model, out_of_range); }, "id 300"));
}

void test_add_files() {
  const std::string path = "fastlm_bpe_tests_input.txt";
  {
    std::ofstream file(path, std::ios::binary);
    file << "good line\r\nbad \xFF line\nlast line without newline";
  }
  Trainer char_trainer(Level::kChar, 2);
  CHECK(throws<std::invalid_argument>([&] { char_trainer.add_files({path}); }, path + ":2:"));
  Trainer byte_trainer(Level::kByte, 2);
  byte_trainer.add_files({path});
  const TrainResult result = byte_trainer.train(300, {}, 1, 1.0);
  CHECK(!result.merges.empty());
  Trainer missing(Level::kByte, 1);
  CHECK(throws<FileError>([&] { missing.add_files({"no/such/file.txt"}); }, "no/such/file.txt"));
  std::remove(path.c_str());
}

// Progress sees every merge and every block read; an exception it throws stops the work and reaches the caller (how
// a Python KeyboardInterrupt ends a long training), unwinding the long-word bookkeeping cleanly (checked under ASan).
void test_progress_and_stopping() {
  std::vector<std::string> texts = kCorpus;
  texts.push_back(std::string(3000, 'a') + std::string(3000, 'b'));  // a long word: merged position by position
  Trainer trainer(Level::kByte, 2);
  const std::vector<std::string_view> views(texts.begin(), texts.end());
  trainer.add_texts(views);
  std::vector<uint64_t> seen;
  const TrainResult result = trainer.train(400, {}, 1, 1.0, [&](uint64_t merges) { seen.push_back(merges); });
  CHECK(!seen.empty() && seen.size() == result.merges.size() && seen.back() == result.merges.size());
  const auto stop_at_3 = [](uint64_t merges) {
    if (merges == 3) throw std::runtime_error("stopped at merge 3");
  };
  CHECK(throws<std::runtime_error>([&] { trainer.train(400, {}, 1, 1.0, stop_at_3); }, "stopped at merge 3"));
  CHECK(trainer.train(400, {}, 1, 1.0).merges == result.merges);  // the counts survive a stopped training

  const std::string path = "fastlm_bpe_tests_progress.txt";
  {
    std::ofstream file(path, std::ios::binary);
    file << "one line\ntwo lines\n";
  }
  uint64_t bytes = 0;
  Trainer from_file(Level::kByte, 1);
  from_file.add_files({path}, [&](uint64_t read) { bytes = read; });
  CHECK(bytes == 19);
  std::remove(path.c_str());
}

// Several threads encoding and decoding with one model at once (each batch call also uses the shared pool,
// which serialises concurrent runs): the results equal serial calls. Run under ThreadSanitizer in CI.
void test_concurrent_callers() {
  for (Level level : {Level::kByte, Level::kChar}) {
    const Model model = model_of(level, train(level, kCorpus, 500, 2), 2);
    std::vector<std::string_view> views(kCorpus.begin(), kCorpus.end());
    std::vector<std::vector<TokenId>> serial;
    for (const std::string& text : kCorpus) serial.push_back(encode(model, text));
    std::vector<TokenId> serial_flat;
    std::vector<int64_t> serial_offsets{0};
    for (const std::vector<TokenId>& ids : serial) {
      serial_flat.insert(serial_flat.end(), ids.begin(), ids.end());
      serial_offsets.push_back(static_cast<int64_t>(serial_flat.size()));
    }
    constexpr int kThreads = 4;
    std::vector<int> mismatches(kThreads, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, t] {
        for (int round = 0; round < 20; ++round) {
          std::vector<TokenId> flat;
          std::vector<int64_t> offsets;
          model.encode_batch(views, 2, flat, offsets);
          const std::vector<std::string> decoded = model.decode_batch(serial_flat.data(), serial_offsets, 2);
          for (size_t i = 0; i < kCorpus.size(); ++i) {
            mismatches[t] += std::vector<TokenId>(flat.begin() + offsets[i], flat.begin() + offsets[i + 1]) != serial[i];
            mismatches[t] += encode(model, kCorpus[i]) != serial[i];
            mismatches[t] += decoded[i] != kCorpus[i];
          }
        }
      });
    }
    for (std::thread& thread : threads) thread.join();
    for (int count : mismatches) CHECK(count == 0);
  }
}

}  // namespace

int main() {
  test_utf8();
  test_cl100k_split();
  test_char_split();
  test_textbook_training();
  test_round_trip_and_determinism();
  test_long_word_matches_short_path();
  test_megabyte_tokens();
  test_char_level_coverage();
  test_bad_models_rejected();
  test_add_files();
  test_progress_and_stopping();
  test_concurrent_callers();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("all native BPE tests passed\n");
  return 0;
}
