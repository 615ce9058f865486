// UTF-8 as Python reads it, in one place for the data reader and the tokenizer: strict decoding (no surrogates, no
// overlong forms) and, for ill-formed input, one U+FFFD per maximal subpart (Unicode D93b) as
// bytes.decode("utf-8", "replace") does. utf8proc_iterate only reports that a sequence is ill-formed, not how many
// bytes Python replaces, so the decoding is written here.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>

namespace edgemole {

constexpr char32_t kReplacementChar = 0xFFFD;

// One decoded unit of `text` at byte `i` (i < text.size()): a code point and its length, or, when `valid` is false,
// U+FFFD and the length (1 to 3) of the maximal subpart that Python replaces by one U+FFFD.
struct Utf8Unit {
  char32_t code_point;
  std::size_t length;
  bool valid;
};
Utf8Unit decode_utf8_at(std::string_view text, std::size_t i);

// The byte offset of the first ill-formed sequence (Python's UnicodeDecodeError.start), or npos when all is valid.
std::size_t first_invalid_utf8(std::string_view text);
// The code points of `text`, each ill-formed maximal subpart read as one U+FFFD.
std::u32string decode_utf8(std::string_view text);
// `text` with each ill-formed maximal subpart replaced by U+FFFD (the same decoding, back in UTF-8).
std::string to_valid_utf8(std::string_view text);
// Appends the UTF-8 of `cp` (a surrogate too, in 3 bytes).
void append_utf8(std::string& out, char32_t cp);

// The code point at text[i] (U+FFFD for an ill-formed subpart), moving i past it.
char32_t next_code_point(std::string_view text, std::size_t& i);
// The code point that ends at text[end - 1] (U+FFFD for an ill-formed byte), moving end to its first byte.
char32_t prev_code_point(std::string_view text, std::size_t& end);
// Where to cut text at or before byte i without splitting a UTF-8 sequence: the largest i' <= i that is text.size()
// or not a continuation byte (0 when there is none).
std::size_t floor_char_boundary(std::string_view text, std::size_t i);
// Characters (code points) of valid UTF-8: Python's len() of the str, and so its string positions.
std::size_t count_code_points(std::string_view text);

}  // namespace edgemole
