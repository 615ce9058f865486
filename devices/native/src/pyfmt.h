// Python's spellings of values in one place, so that every one-line error message of the native client shows a
// string, a float or a stripped field exactly as the Python client's message does: repr() of a str, str() of a
// float, round() and str.strip(). Built on utf8.h (Python's strict UTF-8); repr of JSON values is message.h's.
#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <type_traits>

namespace edgemole {

// The usual cap on an escaped string in a message, so that a hostile value cannot make a log line huge.
inline constexpr std::size_t kReprMaxBytes = 200;
// No cap: the whole string, as Python shows it.
inline constexpr std::size_t kNoCap = std::string_view::npos;

// `text` escaped the way Python's repr() escapes a str's characters, with no quotes around it: backslash, `quote`
// (when not 0), \t \n \r, and every character Python does not print (controls, separators, format characters) as
// \xNN, \uNNNN or \UNNNNNNNN; other characters are kept as they are. A byte that is not UTF-8 shows as \xNN (the
// text is bytes, as a payload's). The output is cut, at a character, once max_bytes are written ("..." added).
std::string printable(std::string_view text, std::size_t max_bytes = kReprMaxBytes, char quote = 0);

// Python's repr() of a str: quoted with ' (or " for text with a ' and no "), escaped as printable() does, except
// that a byte that is not UTF-8 shows as \udcNN (Python's surrogateescape, as a path or argument from bytes reads).
// Cut as printable() is (the closing quote follows the "..."). Non-ASCII characters are kept unless they are
// controls, separators or format characters (Python also escapes unassigned code points, which this does not know).
std::string py_str_repr(std::string_view text, std::size_t max_bytes = kReprMaxBytes);

// py_repr(x) for anything that is a string (std::string, std::string_view, a literal): py_str_repr. A template so
// that, where message.h's py_repr(const nlohmann::json&) is visible too, a string picks this one (an exact match)
// instead of being ambiguous, and nullptr, numbers and JSON values still pick the JSON one.
template <typename Text, typename = std::enable_if_t<std::is_convertible_v<const Text&, std::string_view> &&
                                                     !std::is_same_v<Text, std::nullptr_t>>>
std::string py_repr(const Text& text, std::size_t max_bytes = kReprMaxBytes) {
  return py_str_repr(std::string_view(text), max_bytes);
}

// Python's round() of a float to an integer: half to even. Throws std::invalid_argument for NaN and infinities.
double py_round(double x);
// Python's str() of a float: the shortest digits that read back, "1e+16", "1e-05", "0.0001", "2.0", "inf", "nan".
std::string py_float_str(double x);
// Python's str.strip() with no argument: Unicode whitespace (str.isspace) removed at both ends.
std::string_view py_strip(std::string_view text);

}  // namespace edgemole
