// Hand-checked cases of the native tokenizer on a tiny BERT tokenizer.json written here; the Python test
// (tests/test_native_tokenizer.py) compares it with Hugging Face on whole datasets and every code point.
#include <doctest/doctest.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "errors.h"
#include "tokenizer.h"

using edgemole::ArtifactError;
using edgemole::ConfigError;
using edgemole::Tokenizer;
using Ids = std::vector<std::int64_t>;
using json = nlohmann::json;

namespace {

// clang-format off
const std::vector<std::string> kVocab = {
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "un", "##aff", "##able",  // 0-9
    ",", "!", "$", "中", "文", "ab", "a", "b", "i", "##\xCC\x87",                               // 10-19 (##U+0307)
    "h\xC3\xA9llo", "\xC2\xBF", "x", "##x", "ni", "##hao",                                    // 20-25 (héllo, ¿)
};
// clang-format on

// The shape of a real BERT tokenizer.json (as all-MiniLM-L6-v2's), small enough to check by hand.
json tiny() {
  json vocab = json::object();
  for (std::size_t i = 0; i < kVocab.size(); ++i) vocab[kVocab[i]] = i;
  json added = json::array();
  for (const auto& [id, content] : std::vector<std::pair<int, std::string>>{
           {0, "[PAD]"}, {1, "[UNK]"}, {2, "[CLS]"}, {3, "[SEP]"}, {4, "[MASK]"}}) {
    added.push_back({{"id", id},
                     {"content", content},
                     {"single_word", false},
                     {"lstrip", false},
                     {"rstrip", false},
                     {"normalized", false},
                     {"special", true}});
  }
  return {
      {"version", "1.0"},
      {"truncation", nullptr},
      {"padding", nullptr},
      {"added_tokens", added},
      {"normalizer",
       {{"type", "BertNormalizer"},
        {"clean_text", true},
        {"handle_chinese_chars", true},
        {"strip_accents", nullptr},
        {"lowercase", true}}},
      {"pre_tokenizer", {{"type", "BertPreTokenizer"}}},
      {"post_processor",
       {{"type", "TemplateProcessing"},
        {"single", json::array({{{"SpecialToken", {{"id", "[CLS]"}, {"type_id", 0}}}},
                                {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
                                {{"SpecialToken", {{"id", "[SEP]"}, {"type_id", 0}}}}})},
        {"special_tokens",
         {{"[CLS]", {{"id", "[CLS]"}, {"ids", {2}}, {"tokens", {"[CLS]"}}}},
          {"[SEP]", {{"id", "[SEP]"}, {"ids", {3}}, {"tokens", {"[SEP]"}}}}}}}},
      {"decoder", {{"type", "WordPiece"}, {"prefix", "##"}, {"cleanup", true}}},
      {"model",
       {{"type", "WordPiece"},
        {"unk_token", "[UNK]"},
        {"continuing_subword_prefix", "##"},
        {"max_input_chars_per_word", 10},
        {"vocab", vocab}}},
  };
}

Tokenizer load(const json& doc) { return Tokenizer::from_json(doc.dump(), "tiny.json"); }

// The ids between [CLS] and [SEP].
Ids body(const Tokenizer& t, const std::string& text) {
  Ids ids = t.encode_unpadded(text);
  REQUIRE(ids.size() >= 2);
  CHECK(ids.front() == 2);
  CHECK(ids.back() == 3);
  return Ids(ids.begin() + 1, ids.end() - 1);
}

std::string error_of(const json& doc) {
  try {
    load(doc);
  } catch (const ArtifactError& e) {
    return e.what();
  }
  return "(no error)";
}

}  // namespace

TEST_CASE("words, case and accents") {
  const auto t = load(tiny());
  CHECK(body(t, "Hello WORLD") == Ids{5, 6});
  CHECK(body(t, "H\xC3\xA9llo") == Ids{5});   // héllo: strip_accents null follows lowercase
  CHECK(body(t, "He\xCC\x81llo") == Ids{5});  // e + COMBINING ACUTE, already decomposed
  CHECK(body(t, "  hello \t\n world  ") == Ids{5, 6});
  CHECK(body(t, "") == Ids{});
  CHECK(body(t, " \t ") == Ids{});

  json cased = tiny();
  cased["normalizer"]["lowercase"] = false;  // strip_accents null now means: keep the accents
  const auto c = load(cased);
  CHECK(body(c, "h\xC3\xA9llo") == Ids{20});
  CHECK(body(c, "Hello") == Ids{1});
  cased["normalizer"]["strip_accents"] = true;
  CHECK(body(load(cased), "h\xC3\xA9llo") == Ids{5});
}

TEST_CASE("capital I with dot above lowercases to two characters") {
  // U+0130 decomposes to I + U+0307, so with accents stripped it is plain "i"; without, lowercasing makes it
  // "i" + U+0307 (a full, two-character mapping) and the dot stays as a continuing piece.
  json doc = tiny();
  CHECK(body(load(doc), "\xC4\xB0") == Ids{18});
  doc["normalizer"]["strip_accents"] = false;
  CHECK(body(load(doc), "\xC4\xB0") == Ids{18, 19});
}

TEST_CASE("punctuation is split off, ASCII symbols count as punctuation") {
  const auto t = load(tiny());
  CHECK(body(t, "hello,world!") == Ids{5, 10, 6, 11});
  CHECK(body(t, "$hello") == Ids{12, 5});
  CHECK(body(t, "\xC2\xBFhello") == Ids{21, 5});  // ¿ is Po
  CHECK(body(t, "hello+world") == Ids{5, 1, 6});  // '+' is Sm but ASCII punctuation: its own word, [UNK]
  CHECK(body(t,
             "a\xC2\xA9"
             "b") == Ids{1});  // '©' is So: not punctuation, so "a©b" is one unknown word
}

TEST_CASE("Chinese characters are words of their own") {
  const auto t = load(tiny());
  CHECK(body(t, "\xE4\xB8\xAD\xE6\x96\x87hello") == Ids{13, 14, 5});  // 中文hello
  json off = tiny();
  off["normalizer"]["handle_chinese_chars"] = false;
  CHECK(body(load(off), "\xE4\xB8\xAD\xE6\x96\x87hello") == Ids{1});
}

TEST_CASE("control characters are removed, other whitespace splits") {
  const auto t = load(tiny());
  CHECK(body(t, std::string("a\x01") + "b") == Ids{15});
  CHECK(body(t, std::string("a\0b", 3)) == Ids{15});
  CHECK(body(t,
             "a\xE2\x80\x8B"
             "b") == Ids{15});  // U+200B ZERO WIDTH SPACE is Cf
  CHECK(body(t,
             "a\xC2\x85"
             "b") == Ids{15});  // U+0085 NEL is Cc: removed before whitespace mapping
  CHECK(body(t,
             "a\xEF\xBF\xBD"
             "b") == Ids{15});  // U+FFFD
  CHECK(body(t,
             "a\xEE\x80\x80"
             "b") == Ids{15});  // U+E000 private use
  CHECK(body(t,
             "a\xC2\xA0"
             "b") == Ids{16, 17});  // NO-BREAK SPACE
  CHECK(body(t,
             "a\xE3\x80\x80"
             "b") == Ids{16, 17});  // IDEOGRAPHIC SPACE
  CHECK(body(t,
             "a\xE2\x80\xA8"
             "b") == Ids{16, 17});  // LINE SEPARATOR
  CHECK(body(t, "a\rb") == Ids{16, 17});
}

TEST_CASE("ill-formed UTF-8 reads as U+FFFD, which clean_text drops") {
  const auto t = load(tiny());
  CHECK(body(t,
             "a\xFF"
             "b") == Ids{15});
  CHECK(body(t,
             "a\xE4\xB8"
             "b") == Ids{15});  // truncated 3-byte sequence
  CHECK(body(t,
             "a\xED\xA0\x80"
             "b") == Ids{15});  // an encoded surrogate
  CHECK(body(t,
             "a\xC0\xAF"
             "b") == Ids{15});            // overlong
  CHECK(body(t, "hello\xE4") == Ids{5});  // cut at the end
}

TEST_CASE("continuing subwords and [UNK]") {
  const auto t = load(tiny());
  CHECK(body(t, "unaffable") == Ids{7, 8, 9});
  CHECK(body(t, "nihao") == Ids{24, 25});
  CHECK(body(t, "xxxx") == Ids{22, 23, 23, 23});
  CHECK(body(t, "unaffablez hello") == Ids{1, 5});  // one missing piece makes the whole word [UNK]
  CHECK(body(t, "xxxxxxxxxx") == Ids(std::vector<std::int64_t>{22, 23, 23, 23, 23, 23, 23, 23, 23, 23}));
  CHECK(body(t, "xxxxxxxxxxx") == Ids{1});  // 11 characters > max_input_chars_per_word 10
  // the limit counts characters, not bytes
  CHECK(body(t, "\xE4\xB8\xAD") == Ids{13});
}

TEST_CASE("added tokens are found anywhere in the raw text") {
  const auto t = load(tiny());
  CHECK(body(t, "hello[SEP]world") == Ids{5, 3, 6});
  CHECK(body(t, "[MASK] [PAD][UNK]") == Ids{4, 0, 1});
  CHECK(body(t, "[mask]") == Ids{1, 1, 1});  // not normalized: case matters; '[' and ']' are punctuation
  CHECK(t.token_id("[MASK]") == 4);

  // a normalized (non-special) added token is matched in the normalised text, with its normalised content
  json doc = tiny();
  doc["added_tokens"].push_back({{"id", 26},
                                 {"content", "HeLLo-W\xC3\xB6rld"},
                                 {"single_word", false},
                                 {"lstrip", false},
                                 {"rstrip", false},
                                 {"normalized", true},
                                 {"special", false}});
  const auto n = load(doc);
  CHECK(body(n, "say HELLO-WORLD!hello-w\xC3\xB6rldx") == Ids{1, 26, 11, 26, 22});
  CHECK(n.token_id("HeLLo-W\xC3\xB6rld") == 26);
  CHECK_FALSE(t.token_id("nothing").has_value());
}

TEST_CASE("truncation and padding to max_length") {
  const auto t = load(tiny());
  CHECK(t.pad_id() == 0);
  CHECK(t.num_special_tokens() == 2);
  auto enc = t.encode("hello world hello", 8);
  CHECK(enc.input_ids == Ids{2, 5, 6, 5, 3, 0, 0, 0});
  CHECK(enc.attention_mask == Ids{1, 1, 1, 1, 1, 0, 0, 0});
  enc = t.encode("hello world hello", 4);
  CHECK(enc.input_ids == Ids{2, 5, 6, 3});
  CHECK(enc.attention_mask == Ids{1, 1, 1, 1});
  enc = t.encode("hello world hello", 5);
  CHECK(enc.input_ids == Ids{2, 5, 6, 5, 3});
  CHECK(t.encode("hello", 2).input_ids == Ids{2, 3});
  CHECK_THROWS_AS(t.encode("hello", 1), ConfigError);

  json padded = tiny();
  padded["padding"] = {{"strategy", {{"Fixed", 8}}}, {"pad_id", 4}, {"pad_token", "[MASK]"}};
  CHECK(load(padded).encode("hello", 4).input_ids == Ids{2, 5, 3, 4});
}

TEST_CASE("BertProcessing gives the same ids as the template") {
  json doc = tiny();
  doc["post_processor"] = {{"type", "BertProcessing"}, {"sep", {"[SEP]", 3}}, {"cls", {"[CLS]", 2}}};
  CHECK(load(doc).encode_unpadded("hello, world") == Ids{2, 5, 10, 6, 3});
}

TEST_CASE("anything unsupported or malformed is one ArtifactError line") {
  const auto check = [](const json& doc, const std::string& needle) {
    const std::string what = error_of(doc);
    CHECK_MESSAGE(what.find(needle) != std::string::npos, what);
    CHECK(what.find("tiny.json") != std::string::npos);
    CHECK(what.find('\n') == std::string::npos);
  };
  json doc = tiny();
  doc["normalizer"] = {{"type", "NFKC"}};
  check(doc, "normalizer type 'NFKC' is not supported");
  doc = tiny();
  doc["pre_tokenizer"] = {{"type", "Whitespace"}};
  check(doc, "pre_tokenizer type 'Whitespace' is not supported");
  doc = tiny();
  doc["model"]["type"] = "BPE";
  check(doc, "model type 'BPE' is not supported");
  doc = tiny();
  doc["post_processor"] = {{"type", "ByteLevel"}};
  check(doc, "post_processor type 'ByteLevel' is not supported");
  doc = tiny();
  doc["normalizer"] = nullptr;
  check(doc, "normalizer is missing");
  doc = tiny();
  doc["model"]["unk_token"] = "<unk>";
  check(doc, "'<unk>' is not in the vocabulary");
  doc = tiny();
  doc["model"]["vocab"]["hello"] = "five";
  check(doc, "model.vocab[\"hello\"] is not a non-negative integer");
  doc = tiny();
  doc["normalizer"]["lowercase"] = "yes";
  check(doc, "normalizer.lowercase is not true or false");
  doc = tiny();
  doc["added_tokens"][2]["lstrip"] = true;
  check(doc, "sets lstrip");
  doc = tiny();
  doc["post_processor"]["special_tokens"].erase("[SEP]");
  check(doc, "special_tokens has no '[SEP]'");
  doc = tiny();
  doc["version"] = "2.0";
  check(doc, "unknown version");

  CHECK_THROWS_AS(Tokenizer::from_json("{\"model\": ", "x"), ArtifactError);
  CHECK_THROWS_AS(Tokenizer::from_json("[1, 2]", "x"), ArtifactError);
  CHECK_THROWS_WITH_AS(Tokenizer::from_file("/nonexistent/tokenizer.json"),
                       "tokenizer '/nonexistent/tokenizer.json' cannot be read", ArtifactError);
}

TEST_CASE("from_file reads what from_json reads") {
  const std::string path = "test_tokenizer_tiny.json";
  {
    std::ofstream out(path);
    out << tiny().dump();
  }
  const auto t = Tokenizer::from_file(path);
  std::remove(path.c_str());
  CHECK(t.vocab_size() == kVocab.size());
  CHECK(t.encode("Hello, world!", 6).input_ids == Ids{2, 5, 10, 6, 11, 3});
}
