#include "tokenizer.h"

#include <utf8proc.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>
#include <utility>

#include "errors.h"
#include "utf8.h"

// Each step follows the definition in Hugging Face tokenizers (Rust), which the Python client runs:
//  - BertNormalizer: clean_text drops NUL, U+FFFD and "other" characters (Cc, Cf, Co; not tab, LF, CR), then maps
//    whitespace to ' '; Chinese characters get a space either side; accents are stripped as NFD followed by dropping
//    Mn; lowercase is the full per-character mapping (U+0130 becomes two characters), with no final-sigma rule.
//  - BertPreTokenizer: split on White_Space (removed), then isolate each punctuation character (ASCII punctuation
//    or a P* category).
//  - WordPiece: greedy longest match from the left, "##" on continuing pieces, [UNK] for the whole word when a
//    piece is missing or the word has more than max_input_chars_per_word characters.
//  - added tokens ([CLS], [SEP], ...) are found in the text first, leftmost-longest, and never split further.

namespace edgemole {
namespace {

using json = nlohmann::json;

// ---------------------------------------------------------------------------------- character classes ----------

// HF tokenizers takes Cc/Cf/Co, P* and Mn from the unicode_categories crate, whose tables are Unicode 8.0; utf8proc
// 2.8 has Unicode 15.0. These are the characters on which the two disagree (found by running both on every code
// point): nearly all were assigned after 8.0, so HF sees an ordinary character where utf8proc has a mark, a
// punctuation or a format character; a few changed category since (U+166D, U+1734, U+1885-6, U+A9BD, U+111C9).
// White_Space, case mapping and NFD come from newer tables in HF (Rust std, unicode-normalization) and need none.
// A utf8proc newer than Unicode 15.0 would add characters (new scripts) that belong here too.
enum HfClass : std::uint8_t { kOther, kPunctuation, kMark };
struct CategoryOverride {
  char32_t first, last;
  HfClass hf;
};
// clang-format off
constexpr CategoryOverride kUnicode8Overrides[] = {
    {0x61D, 0x61D, kOther}, {0x7FD, 0x7FD, kOther}, {0x890, 0x891, kOther}, {0x898, 0x89F, kOther},
    {0x8CA, 0x8E2, kOther}, {0x9FD, 0x9FE, kOther}, {0xA76, 0xA76, kOther}, {0xAFA, 0xAFF, kOther},
    {0xB55, 0xB55, kOther}, {0xC04, 0xC04, kOther}, {0xC3C, 0xC3C, kOther}, {0xC77, 0xC77, kOther},
    {0xC84, 0xC84, kOther}, {0xD00, 0xD00, kOther}, {0xD3B, 0xD3C, kOther}, {0xD81, 0xD81, kOther},
    {0xEBA, 0xEBA, kOther}, {0xECE, 0xECE, kOther}, {0x166D, 0x166D, kPunctuation}, {0x1734, 0x1734, kMark},
    {0x180F, 0x180F, kOther}, {0x1885, 0x1886, kOther}, {0x1ABF, 0x1ACE, kOther}, {0x1B7D, 0x1B7E, kOther},
    {0x1DF6, 0x1DFB, kOther}, {0x2E43, 0x2E4F, kOther}, {0x2E52, 0x2E5D, kOther}, {0xA82C, 0xA82C, kOther},
    {0xA8C5, 0xA8C5, kOther}, {0xA8FF, 0xA8FF, kOther}, {0xA9BD, 0xA9BD, kOther}, {0x10D24, 0x10D27, kOther},
    {0x10EAB, 0x10EAD, kOther}, {0x10EFD, 0x10EFF, kOther}, {0x10F46, 0x10F50, kOther}, {0x10F55, 0x10F59, kOther},
    {0x10F82, 0x10F89, kOther}, {0x11070, 0x11070, kOther}, {0x11073, 0x11074, kOther}, {0x110C2, 0x110C2, kOther},
    {0x110CD, 0x110CD, kOther}, {0x111C9, 0x111C9, kPunctuation}, {0x111CF, 0x111CF, kOther},
    {0x1123E, 0x1123E, kOther}, {0x11241, 0x11241, kOther}, {0x1133B, 0x1133B, kOther}, {0x11438, 0x1143F, kOther},
    {0x11442, 0x11444, kOther}, {0x11446, 0x11446, kOther}, {0x1144B, 0x1144F, kOther}, {0x1145A, 0x1145B, kOther},
    {0x1145D, 0x1145E, kOther}, {0x11660, 0x1166C, kOther}, {0x116B9, 0x116B9, kOther}, {0x1182F, 0x11837, kOther},
    {0x11839, 0x1183B, kOther}, {0x1193B, 0x1193C, kOther}, {0x1193E, 0x1193E, kOther}, {0x11943, 0x11946, kOther},
    {0x119D4, 0x119D7, kOther}, {0x119DA, 0x119DB, kOther}, {0x119E0, 0x119E0, kOther}, {0x119E2, 0x119E2, kOther},
    {0x11A01, 0x11A0A, kOther}, {0x11A33, 0x11A38, kOther}, {0x11A3B, 0x11A47, kOther}, {0x11A51, 0x11A56, kOther},
    {0x11A59, 0x11A5B, kOther}, {0x11A8A, 0x11A96, kOther}, {0x11A98, 0x11A9C, kOther}, {0x11A9E, 0x11AA2, kOther},
    {0x11B00, 0x11B09, kOther}, {0x11C30, 0x11C36, kOther}, {0x11C38, 0x11C3D, kOther}, {0x11C3F, 0x11C3F, kOther},
    {0x11C41, 0x11C45, kOther}, {0x11C70, 0x11C71, kOther}, {0x11C92, 0x11CA7, kOther}, {0x11CAA, 0x11CB0, kOther},
    {0x11CB2, 0x11CB3, kOther}, {0x11CB5, 0x11CB6, kOther}, {0x11D31, 0x11D36, kOther}, {0x11D3A, 0x11D3A, kOther},
    {0x11D3C, 0x11D3D, kOther}, {0x11D3F, 0x11D45, kOther}, {0x11D47, 0x11D47, kOther}, {0x11D90, 0x11D91, kOther},
    {0x11D95, 0x11D95, kOther}, {0x11D97, 0x11D97, kOther}, {0x11EF3, 0x11EF4, kOther}, {0x11EF7, 0x11EF8, kOther},
    {0x11F00, 0x11F01, kOther}, {0x11F36, 0x11F3A, kOther}, {0x11F40, 0x11F40, kOther}, {0x11F42, 0x11F4F, kOther},
    {0x11FFF, 0x11FFF, kOther}, {0x12FF1, 0x12FF2, kOther}, {0x13430, 0x13440, kOther}, {0x13447, 0x13455, kOther},
    {0x16E97, 0x16E9A, kOther}, {0x16F4F, 0x16F4F, kOther}, {0x16FE2, 0x16FE2, kOther}, {0x16FE4, 0x16FE4, kOther},
    {0x1CF00, 0x1CF2D, kOther}, {0x1CF30, 0x1CF46, kOther}, {0x1E000, 0x1E006, kOther}, {0x1E008, 0x1E018, kOther},
    {0x1E01B, 0x1E021, kOther}, {0x1E023, 0x1E024, kOther}, {0x1E026, 0x1E02A, kOther}, {0x1E08F, 0x1E08F, kOther},
    {0x1E130, 0x1E136, kOther}, {0x1E2AE, 0x1E2AE, kOther}, {0x1E2EC, 0x1E2EF, kOther}, {0x1E4EC, 0x1E4EF, kOther},
    {0x1E944, 0x1E94A, kOther}, {0x1E95E, 0x1E95F, kOther}};
// clang-format on

// The general category as HF's tables have it (see kUnicode8Overrides).
utf8proc_propval_t category(char32_t c) {
  if (c >= 0x61D && c <= 0x1E95F) {
    const auto* end = std::end(kUnicode8Overrides);
    const auto* it = std::upper_bound(std::begin(kUnicode8Overrides), end, c,
                                      [](char32_t v, const CategoryOverride& o) { return v < o.first; });
    if (it != std::begin(kUnicode8Overrides) && c <= (it - 1)->last) {
      switch ((it - 1)->hf) {
        case kPunctuation:
          return UTF8PROC_CATEGORY_PO;
        case kMark:
          return UTF8PROC_CATEGORY_MN;
        case kOther:
          return UTF8PROC_CATEGORY_LO;
      }
    }
  }
  return utf8proc_get_property(static_cast<utf8proc_int32_t>(c))->category;
}

// Rust's char::is_whitespace: the White_Space property, i.e. Zs plus tab..CR, NEL, LINE and PARAGRAPH SEPARATOR.
bool is_whitespace(char32_t c) {
  if (c < 0x80) return c == ' ' || (c >= 0x09 && c <= 0x0D);
  if (c == 0x85 || c == 0x2028 || c == 0x2029) return true;
  return utf8proc_get_property(static_cast<utf8proc_int32_t>(c))->category == UTF8PROC_CATEGORY_ZS;
}

// What clean_text removes: Cc, Cf and Co, except tab, LF and CR (which count as whitespace).
bool is_control(char32_t c) {
  if (c == '\t' || c == '\n' || c == '\r') return false;
  if (c < 0x80) return c < 0x20 || c == 0x7F;
  const auto cat = category(c);
  return cat == UTF8PROC_CATEGORY_CC || cat == UTF8PROC_CATEGORY_CF || cat == UTF8PROC_CATEGORY_CO;
}

bool is_punctuation(char32_t c) {
  if (c < 0x80) {  // ASCII punctuation includes symbols such as $ + < = > ^ ` | ~
    return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) || (c >= 0x7B && c <= 0x7E);
  }
  const auto cat = category(c);
  return cat >= UTF8PROC_CATEGORY_PC && cat <= UTF8PROC_CATEGORY_PO;
}

// The CJK ideograph blocks BERT puts spaces around (not Hangul, Hiragana or Katakana).
bool is_chinese_char(char32_t c) {
  return (c >= 0x4E00 && c <= 0x9FFF) || (c >= 0x3400 && c <= 0x4DBF) || (c >= 0x20000 && c <= 0x2A6DF) ||
         (c >= 0x2A700 && c <= 0x2B73F) || (c >= 0x2B740 && c <= 0x2B81F) || (c >= 0x2B920 && c <= 0x2CEAF) ||
         (c >= 0xF900 && c <= 0xFAFF) || (c >= 0x2F800 && c <= 0x2FA1F);
}

// Canonical decomposition (NFD) of `in`, with canonical reordering of combining marks.
void nfd(const std::u32string& in, std::u32string& out) {
  out.clear();
  out.reserve(in.size() + in.size() / 4);
  std::array<utf8proc_int32_t, 8> buf{};
  std::vector<utf8proc_int32_t> big;
  for (const char32_t c : in) {
    if (c < 0xC0) {  // nothing below U+00C0 decomposes
      out.push_back(c);
      continue;
    }
    const auto cp = static_cast<utf8proc_int32_t>(c);
    auto n =
        utf8proc_decompose_char(cp, buf.data(), static_cast<utf8proc_ssize_t>(buf.size()), UTF8PROC_DECOMPOSE, nullptr);
    const utf8proc_int32_t* from = buf.data();
    if (n > static_cast<utf8proc_ssize_t>(buf.size())) {
      big.resize(static_cast<std::size_t>(n));
      n = utf8proc_decompose_char(cp, big.data(), n, UTF8PROC_DECOMPOSE, nullptr);
      from = big.data();
    }
    if (n < 0) {  // cannot happen for a valid scalar value; keep the character
      out.push_back(c);
      continue;
    }
    for (utf8proc_ssize_t k = 0; k < n; ++k) out.push_back(static_cast<char32_t>(from[k]));
  }
  // Canonical ordering: stable sort of every run of characters with a non-zero combining class.
  const auto ccc = [](char32_t c) {
    return c < 0x300 ? 0 : utf8proc_get_property(static_cast<utf8proc_int32_t>(c))->combining_class;
  };
  std::size_t i = 0;
  while (i < out.size()) {
    if (ccc(out[i]) == 0) {
      ++i;
      continue;
    }
    std::size_t j = i;
    while (j < out.size() && ccc(out[j]) != 0) ++j;
    if (j - i > 1) {
      std::stable_sort(out.begin() + static_cast<std::ptrdiff_t>(i), out.begin() + static_cast<std::ptrdiff_t>(j),
                       [&](char32_t a, char32_t b) { return ccc(a) < ccc(b); });
    }
    i = j;
  }
}

// Leftmost-longest match of any pattern starting at or after `from`; {end, nullptr} when none.
template <typename Token>
std::pair<const char32_t*, const Token*> find_added(const char32_t* from, const char32_t* end,
                                                    const std::vector<Token>& tokens) {
  for (const char32_t* p = from; p < end; ++p) {
    const Token* best = nullptr;
    for (const auto& token : tokens) {
      const auto len = token.pattern.size();
      if (token.pattern[0] != *p || static_cast<std::size_t>(end - p) < len) continue;
      if (best != nullptr && best->pattern.size() >= len) continue;
      if (std::equal(token.pattern.begin(), token.pattern.end(), p)) best = &token;
    }
    if (best != nullptr) return {p, best};
  }
  return {end, nullptr};
}

// ----------------------------------------------------------------------------------------- parsing ----------

class Parser {
 public:
  explicit Parser(std::string origin) : origin_(std::move(origin)) {}

  [[noreturn]] void fail(const std::string& what) const { throw ArtifactError("tokenizer '" + origin_ + "': " + what); }

  const json& object(const json& parent, const char* key, const std::string& where) const {
    const auto it = parent.find(key);
    if (it == parent.end() || it->is_null()) fail(where + " is missing");
    if (!it->is_object()) fail(where + " is not an object");
    return *it;
  }

  std::string type_of(const json& section, const std::string& where) const {
    const auto it = section.find("type");
    if (it == section.end() || !it->is_string()) fail(where + " has no \"type\"");
    return it->get<std::string>();
  }

  bool flag(const json& section, const char* key, bool fallback, const std::string& where) const {
    const auto it = section.find(key);
    if (it == section.end()) return fallback;
    if (!it->is_boolean()) fail(where + "." + key + " is not true or false");
    return it->get<bool>();
  }

  std::string text(const json& section, const char* key, const std::string& fallback, const std::string& where) const {
    const auto it = section.find(key);
    if (it == section.end()) return fallback;
    if (!it->is_string()) fail(where + "." + key + " is not a string");
    return it->get<std::string>();
  }

  std::int64_t id(const json& value, const std::string& where) const {
    if (!value.is_number_integer() || value.get<std::int64_t>() < 0) fail(where + " is not a non-negative integer");
    return value.get<std::int64_t>();
  }

 private:
  std::string origin_;
};

}  // namespace

// ------------------------------------------------------------------------------------------ loading ----------

Tokenizer Tokenizer::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ArtifactError("tokenizer '" + path + "' cannot be read");
  std::ostringstream content;
  content << in.rdbuf();
  if (in.bad()) throw ArtifactError("tokenizer '" + path + "' cannot be read");
  return from_json(content.str(), path);
}

Tokenizer Tokenizer::from_json(std::string_view text, const std::string& origin) {
  try {
    return parse(text, origin);
  } catch (const nlohmann::json::exception& e) {  // a value of an unexpected JSON type the checks did not catch
    throw ArtifactError("tokenizer '" + origin + "': " + first_line(e.what()));
  }
}

Tokenizer Tokenizer::parse(std::string_view text, const std::string& origin) {
  const Parser p(origin);
  json doc;
  try {
    doc = json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    p.fail("is not valid JSON (" + first_line(e.what()) + ")");
  }
  if (!doc.is_object()) p.fail("is not a JSON object");
  if (const auto v = doc.find("version"); v != doc.end() && (!v->is_string() || v->get<std::string>() != "1.0")) {
    p.fail("has an unknown version " + v->dump() + " (supported: \"1.0\")");
  }
  Tokenizer t;

  // model: WordPiece
  const json& model = p.object(doc, "model", "model");
  if (const auto type = p.type_of(model, "model"); type != "WordPiece") {
    p.fail("model type '" + type + "' is not supported (supported: WordPiece)");
  }
  const json& vocab = p.object(model, "vocab", "model.vocab");
  t.vocab_.reserve(vocab.size());
  for (const auto& [token, value] : vocab.items()) {
    t.vocab_.emplace(token, p.id(value, "model.vocab[\"" + token + "\"]"));
    t.max_vocab_bytes_ = std::max(t.max_vocab_bytes_, token.size());
  }
  const std::string unk = p.text(model, "unk_token", "[UNK]", "model");
  const auto unk_it = t.vocab_.find(unk);
  if (unk_it == t.vocab_.end()) p.fail("model.unk_token '" + unk + "' is not in the vocabulary");
  t.unk_id_ = unk_it->second;
  t.continuing_subword_prefix_ = p.text(model, "continuing_subword_prefix", "##", "model");
  if (const auto m = model.find("max_input_chars_per_word"); m != model.end()) {
    t.max_input_chars_per_word_ = static_cast<std::size_t>(p.id(*m, "model.max_input_chars_per_word"));
  }

  // normalizer: BertNormalizer
  const json& norm = p.object(doc, "normalizer", "normalizer");
  if (const auto type = p.type_of(norm, "normalizer"); type != "BertNormalizer") {
    p.fail("normalizer type '" + type + "' is not supported (supported: BertNormalizer)");
  }
  t.clean_text_ = p.flag(norm, "clean_text", true, "normalizer");
  t.handle_chinese_chars_ = p.flag(norm, "handle_chinese_chars", true, "normalizer");
  t.lowercase_ = p.flag(norm, "lowercase", true, "normalizer");
  const auto strip = norm.find("strip_accents");
  t.strip_accents_ =
      (strip == norm.end() || strip->is_null()) ? t.lowercase_ : p.flag(norm, "strip_accents", false, "normalizer");

  // pre_tokenizer: BertPreTokenizer
  const json& pre = p.object(doc, "pre_tokenizer", "pre_tokenizer");
  if (const auto type = p.type_of(pre, "pre_tokenizer"); type != "BertPreTokenizer") {
    p.fail("pre_tokenizer type '" + type + "' is not supported (supported: BertPreTokenizer)");
  }

  // added tokens: the id is the vocabulary's when the content is in it (as tokenizers does), else the file's
  if (const auto added = doc.find("added_tokens"); added != doc.end() && !added->is_null()) {
    if (!added->is_array()) p.fail("added_tokens is not a list");
    for (std::size_t i = 0; i < added->size(); ++i) {
      const json& entry = (*added)[i];
      const std::string where = "added_tokens[" + std::to_string(i) + "]";
      if (!entry.is_object()) p.fail(where + " is not an object");
      const auto content = entry.find("content");
      if (content == entry.end() || !content->is_string()) p.fail(where + " has no content");
      const std::string token = content->get<std::string>();
      if (token.empty()) continue;
      for (const char* option : {"single_word", "lstrip", "rstrip"}) {
        if (p.flag(entry, option, false, where)) {
          p.fail(where + " ('" + token + "') sets " + option + ", which is not supported");
        }
      }
      const auto id_it = entry.find("id");
      if (id_it == entry.end()) p.fail(where + " has no id");
      const auto in_vocab = t.vocab_.find(token);
      const std::int64_t id = in_vocab != t.vocab_.end() ? in_vocab->second : p.id(*id_it, where + ".id");
      t.added_ids_[token] = id;
      // special tokens default to matching the raw text, others the normalised text (with a normalised pattern)
      const bool normalized = p.flag(entry, "normalized", !p.flag(entry, "special", false, where), where);
      std::u32string pattern = decode_utf8(token);
      if (normalized) {
        std::u32string normalized_pattern;
        t.normalize(pattern.data(), pattern.data() + pattern.size(), normalized_pattern);
        if (!normalized_pattern.empty()) t.normalized_added_.push_back({std::move(normalized_pattern), id});
      } else {
        t.raw_added_.push_back({std::move(pattern), id});
      }
    }
  }

  // post_processor: [CLS] A [SEP]
  const json& post = p.object(doc, "post_processor", "post_processor");
  const auto post_type = p.type_of(post, "post_processor");
  if (post_type == "TemplateProcessing") {
    const auto single = post.find("single");
    if (single == post.end() || !single->is_array()) p.fail("post_processor.single is not a list");
    const auto specials = post.find("special_tokens");
    bool seen_sequence = false;
    for (const json& item : *single) {
      if (item.is_object() && item.size() == 1 && item.contains("Sequence")) {
        const json& seq = item["Sequence"];
        if (seen_sequence || !seq.is_object() || seq.value("id", "") != "A") {
          p.fail("post_processor.single must hold exactly one Sequence \"A\"");
        }
        seen_sequence = true;
      } else if (item.is_object() && item.size() == 1 && item.contains("SpecialToken")) {
        const json& tok = item["SpecialToken"];
        if (!tok.is_object() || !tok.contains("id") || !tok["id"].is_string()) {
          p.fail("post_processor.single has a SpecialToken without an id");
        }
        const std::string name = tok["id"].get<std::string>();
        if (specials == post.end() || !specials->is_object() || !specials->contains(name)) {
          p.fail("post_processor.special_tokens has no '" + name + "'");
        }
        const json& special = (*specials)[name];
        if (!special.is_object() || !special.contains("ids") || !special["ids"].is_array() || special["ids"].empty()) {
          p.fail("post_processor.special_tokens['" + name + "'] has no ids");
        }
        for (const json& id : special["ids"]) {
          (seen_sequence ? t.suffix_ids_ : t.prefix_ids_).push_back(p.id(id, "post_processor.special_tokens id"));
        }
      } else {
        p.fail("post_processor.single has an item that is neither Sequence nor SpecialToken");
      }
    }
    if (!seen_sequence) p.fail("post_processor.single must hold exactly one Sequence \"A\"");
  } else if (post_type == "BertProcessing") {
    for (const char* key : {"cls", "sep"}) {
      const auto it = post.find(key);
      if (it == post.end() || !it->is_array() || it->size() != 2 || !(*it)[0].is_string()) {
        p.fail(std::string("post_processor.") + key + " is not [token, id]");
      }
      (std::string(key) == "cls" ? t.prefix_ids_ : t.suffix_ids_)
          .push_back(p.id((*it)[1], std::string("post_processor.") + key));
    }
  } else {
    p.fail("post_processor type '" + post_type + "' is not supported (supported: TemplateProcessing, BertProcessing)");
  }

  // padding: the file's pad id, else [PAD]
  if (const auto pad = doc.find("padding"); pad != doc.end() && pad->is_object() && pad->contains("pad_id")) {
    t.pad_id_ = p.id((*pad)["pad_id"], "padding.pad_id");
  } else if (const auto id = t.token_id("[PAD]")) {
    t.pad_id_ = *id;
  } else {
    p.fail("names no pad token (no padding section and no [PAD] token)");
  }
  return t;
}

std::optional<std::int64_t> Tokenizer::token_id(const std::string& token) const {
  if (const auto it = added_ids_.find(token); it != added_ids_.end()) return it->second;
  if (const auto it = vocab_.find(token); it != vocab_.end()) return it->second;
  return std::nullopt;
}

// ----------------------------------------------------------------------------------------- encoding ----------

Tokenizer::Encoding Tokenizer::encode(std::string_view text, std::size_t max_length) const {
  const std::size_t specials = num_special_tokens();
  if (max_length < specials) {
    throw ConfigError("max_length " + std::to_string(max_length) + " cannot hold the tokenizer's " +
                      std::to_string(specials) + " special tokens");
  }
  std::vector<std::int64_t> body;
  tokenize(text, body);
  if (body.size() > max_length - specials) body.resize(max_length - specials);
  Encoding enc;
  enc.input_ids.reserve(max_length);
  enc.input_ids.insert(enc.input_ids.end(), prefix_ids_.begin(), prefix_ids_.end());
  enc.input_ids.insert(enc.input_ids.end(), body.begin(), body.end());
  enc.input_ids.insert(enc.input_ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  enc.attention_mask.assign(enc.input_ids.size(), 1);
  enc.input_ids.resize(max_length, pad_id_);
  enc.attention_mask.resize(max_length, 0);
  return enc;
}

std::vector<std::int64_t> Tokenizer::encode_unpadded(std::string_view text) const {
  std::vector<std::int64_t> ids(prefix_ids_);
  tokenize(text, ids);
  ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

void Tokenizer::tokenize(std::string_view text, std::vector<std::int64_t>& out) const {
  const std::u32string chars = decode_utf8(text);
  const char32_t* p = chars.data();
  const char32_t* const end = p + chars.size();
  std::u32string normalized;
  while (p < end) {
    const auto [at, token] = find_added(p, end, raw_added_);
    if (at > p) {
      normalize(p, at, normalized);
      tokenize_normalized(normalized, out);
    }
    if (token == nullptr) break;
    out.push_back(token->id);
    p = at + token->pattern.size();
  }
}

void Tokenizer::tokenize_normalized(const std::u32string& piece, std::vector<std::int64_t>& out) const {
  const char32_t* p = piece.data();
  const char32_t* const end = p + piece.size();
  while (p < end) {
    const auto [at, token] = find_added(p, end, normalized_added_);
    if (at > p) pre_tokenize_and_model(p, at, out);
    if (token == nullptr) break;
    out.push_back(token->id);
    p = at + token->pattern.size();
  }
}

void Tokenizer::normalize(const char32_t* begin, const char32_t* end, std::u32string& out) const {
  out.clear();
  out.reserve(static_cast<std::size_t>(end - begin));
  for (const char32_t* p = begin; p < end; ++p) {
    char32_t c = *p;
    if (clean_text_) {
      if (c == 0 || c == kReplacementChar || is_control(c)) continue;
      if (is_whitespace(c)) c = ' ';
    }
    if (handle_chinese_chars_ && c >= 0x3400 && is_chinese_char(c)) {
      out.push_back(' ');
      out.push_back(c);
      out.push_back(' ');
    } else {
      out.push_back(c);
    }
  }
  if (strip_accents_) {
    std::u32string decomposed;
    nfd(out, decomposed);
    out.clear();
    for (const char32_t c : decomposed) {
      if (c < 0x300 || category(c) != UTF8PROC_CATEGORY_MN) out.push_back(c);
    }
  }
  if (lowercase_) {
    std::size_t i = 0;
    for (; i < out.size(); ++i) {  // in place until a character lowercases to two
      const char32_t c = out[i];
      if (c < 0x80) {
        if (c >= 'A' && c <= 'Z') out[i] = c + 32;
      } else if (c == 0x130) {
        break;
      } else {
        out[i] = static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c)));
      }
    }
    if (i < out.size()) {
      std::u32string lowered(out.begin(), out.begin() + static_cast<std::ptrdiff_t>(i));
      for (; i < out.size(); ++i) {
        const char32_t c = out[i];
        if (c == 0x130) {  // LATIN CAPITAL LETTER I WITH DOT ABOVE: "i" + COMBINING DOT ABOVE
          lowered.push_back('i');
          lowered.push_back(0x307);
        } else if (c < 0x80) {
          lowered.push_back(c >= 'A' && c <= 'Z' ? c + 32 : c);
        } else {
          lowered.push_back(static_cast<char32_t>(utf8proc_tolower(static_cast<utf8proc_int32_t>(c))));
        }
      }
      out = std::move(lowered);
    }
  }
}

void Tokenizer::pre_tokenize_and_model(const char32_t* begin, const char32_t* end,
                                       std::vector<std::int64_t>& out) const {
  const char32_t* word = begin;
  for (const char32_t* p = begin; p < end; ++p) {
    const char32_t c = *p;
    if (is_whitespace(c)) {
      if (p > word) word_piece(word, p, out);
      word = p + 1;
    } else if (is_punctuation(c)) {
      if (p > word) word_piece(word, p, out);
      word_piece(p, p + 1, out);
      word = p + 1;
    }
  }
  if (end > word) word_piece(word, end, out);
}

void Tokenizer::word_piece(const char32_t* begin, const char32_t* end, std::vector<std::int64_t>& out) const {
  const auto chars = static_cast<std::size_t>(end - begin);
  if (chars > max_input_chars_per_word_) {
    out.push_back(unk_id_);
    return;
  }
  // The word's UTF-8 and where each character starts in it, so that pieces end on character boundaries.
  std::string word;
  word.reserve(chars * 2);
  std::vector<std::size_t> starts;
  starts.reserve(chars + 1);
  for (const char32_t* p = begin; p < end; ++p) {
    starts.push_back(word.size());
    append_utf8(word, *p);
  }
  starts.push_back(word.size());
  if (const auto whole = vocab_.find(word); whole != vocab_.end()) {
    out.push_back(whole->second);
    return;
  }
  const std::size_t first_piece = out.size();
  std::string candidate;
  std::size_t start = 0;  // index into starts
  while (start < chars) {
    const std::size_t prefix = start > 0 ? continuing_subword_prefix_.size() : 0;
    std::size_t stop = chars;
    // Skip the ends that make a candidate longer than any vocabulary entry.
    while (stop > start && prefix + starts[stop] - starts[start] > max_vocab_bytes_) --stop;
    bool found = false;
    for (; stop > start; --stop) {
      if (start > 0) {
        candidate.assign(continuing_subword_prefix_);
      } else {
        candidate.clear();
      }
      candidate.append(word, starts[start], starts[stop] - starts[start]);
      if (const auto it = vocab_.find(candidate); it != vocab_.end()) {
        out.push_back(it->second);
        found = true;
        break;
      }
    }
    if (!found) {
      out.resize(first_piece);
      out.push_back(unk_id_);
      return;
    }
    start = stop;
  }
}

}  // namespace edgemole
