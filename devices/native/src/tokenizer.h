// On-device tokenisation from a Hugging Face tokenizer.json, so that a device with no Python feeds the program the
// very ids the Python client gets from AutoTokenizer(texts, padding="max_length", truncation=True, max_length=N).
// Supported: the BERT WordPiece family (BertNormalizer, BertPreTokenizer, WordPiece, TemplateProcessing or
// BertProcessing); anything else is refused when the file is read, never approximated.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace edgemole {

class Tokenizer {
 public:
  // Reads and checks `path`; ArtifactError (one line naming the file and what is wrong or unsupported) otherwise.
  static Tokenizer from_file(const std::string& path);
  // The same from the file's text; `origin` names it in errors.
  static Tokenizer from_json(std::string_view json, const std::string& origin = "tokenizer.json");

  struct Encoding {
    std::vector<std::int64_t> input_ids, attention_mask;  // both exactly max_length long
  };

  // Ids with the post-processor's special tokens, the sequence cut to fit max_length and padded (right) to it.
  // ConfigError when max_length cannot hold the special tokens. Ill-formed UTF-8 reads as U+FFFD per maximal
  // subpart, as Python's bytes.decode("utf-8", "replace") does.
  Encoding encode(std::string_view text, std::size_t max_length) const;
  // Ids with the special tokens, neither truncated nor padded.
  std::vector<std::int64_t> encode_unpadded(std::string_view text) const;

  std::int64_t pad_id() const { return pad_id_; }
  // How many ids the post-processor adds around one sequence (2 for [CLS] ... [SEP]).
  std::size_t num_special_tokens() const { return prefix_ids_.size() + suffix_ids_.size(); }
  std::size_t vocab_size() const { return vocab_.size(); }
  // The id of a vocabulary entry or added token.
  std::optional<std::int64_t> token_id(const std::string& token) const;

 private:
  // An entry of "added_tokens": matched in the text before (normalized: false) or after normalisation.
  struct AddedToken {
    std::u32string pattern;
    std::int64_t id = 0;
  };

  Tokenizer() = default;
  static Tokenizer parse(std::string_view json, const std::string& origin);
  // The ids of `text` without special tokens, appended to `out`.
  void tokenize(std::string_view text, std::vector<std::int64_t>& out) const;
  void tokenize_normalized(const std::u32string& piece, std::vector<std::int64_t>& out) const;
  void normalize(const char32_t* begin, const char32_t* end, std::u32string& out) const;
  void pre_tokenize_and_model(const char32_t* begin, const char32_t* end, std::vector<std::int64_t>& out) const;
  void word_piece(const char32_t* begin, const char32_t* end, std::vector<std::int64_t>& out) const;

  // normalizer: BertNormalizer
  bool clean_text_ = true;
  bool handle_chinese_chars_ = true;
  bool strip_accents_ = true;
  bool lowercase_ = true;
  // model: WordPiece
  std::unordered_map<std::string, std::int64_t> vocab_;
  std::int64_t unk_id_ = 0;
  std::string continuing_subword_prefix_ = "##";
  std::size_t max_input_chars_per_word_ = 100;
  std::size_t max_vocab_bytes_ = 0;  // the longest entry, to skip candidates that cannot match
  // added tokens
  std::vector<AddedToken> raw_added_;         // matched on the original text
  std::vector<AddedToken> normalized_added_;  // matched on the normalised text (pattern normalised)
  std::unordered_map<std::string, std::int64_t> added_ids_;
  // post-processor and padding
  std::vector<std::int64_t> prefix_ids_, suffix_ids_;
  std::int64_t pad_id_ = 0;
};

}  // namespace edgemole
