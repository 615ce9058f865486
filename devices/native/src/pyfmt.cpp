#include "pyfmt.h"

#include <array>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <utility>

#include "utf8.h"

namespace edgemole {
namespace {

// Python's str.isspace: the characters of bidirectional class WS, B or S, or category Zs.
bool py_isspace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// Python's str.isprintable for non-ASCII code points (Unicode 14: categories Cc, Cf, Cs, Co, Zl, Zp and Zs other
// than the space; unassigned code points, also unprintable to Python, are not known here).
bool py_isprintable_nonascii(char32_t c) {
  static constexpr std::array<std::pair<char32_t, char32_t>, 27> kUnprintable = {{
      {0x80, 0xA0},       {0xAD, 0xAD},         {0x600, 0x605},     {0x61C, 0x61C},     {0x6DD, 0x6DD},
      {0x70F, 0x70F},     {0x890, 0x891},       {0x8E2, 0x8E2},     {0x1680, 0x1680},   {0x180E, 0x180E},
      {0x2000, 0x200F},   {0x2028, 0x202F},     {0x205F, 0x2064},   {0x2066, 0x206F},   {0x3000, 0x3000},
      {0xD800, 0xF8FF},   {0xFEFF, 0xFEFF},     {0xFFF9, 0xFFFB},   {0x110BD, 0x110BD}, {0x110CD, 0x110CD},
      {0x13430, 0x13438}, {0x1BCA0, 0x1BCA3},   {0x1D173, 0x1D17A}, {0xE0001, 0xE0001}, {0xE0020, 0xE007F},
      {0xF0000, 0xFFFFD}, {0x100000, 0x10FFFD},
  }};
  for (const auto& [lo, hi] : kUnprintable) {
    if (c >= lo && c <= hi) return false;
  }
  return true;
}

bool py_isprintable(char32_t c) { return c < 0x80 ? c >= 0x20 && c != 0x7F : py_isprintable_nonascii(c); }

// Appends `text` escaped as Python's repr() escapes a str's characters (see printable), a byte that is not UTF-8
// shown as `bad_byte` ("\\x" or "\\udc") and two hex digits; stops, adding "...", once max_bytes are appended.
void escape_into(std::string& out, std::string_view text, char quote, std::size_t max_bytes, const char* bad_byte) {
  const std::size_t start = out.size();
  char buf[16];
  for (std::size_t i = 0; i < text.size();) {
    if (out.size() - start >= max_bytes) {
      out += "...";
      return;
    }
    const Utf8Unit unit = decode_utf8_at(text, i);
    if (!unit.valid) {  // one byte at a time: no byte after the first of an ill-formed subpart can start a character
      std::snprintf(buf, sizeof buf, "%s%02x", bad_byte, static_cast<unsigned>(static_cast<unsigned char>(text[i])));
      out += buf;
      ++i;
      continue;
    }
    const char32_t c = unit.code_point;
    if (c == '\\' || (quote != 0 && c == static_cast<char32_t>(quote))) {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (py_isprintable(c)) {
      out.append(text.substr(i, unit.length));
    } else {
      const auto code = static_cast<unsigned>(c);
      if (c <= 0xFF) {
        std::snprintf(buf, sizeof buf, "\\x%02x", code);
      } else if (c <= 0xFFFF) {
        std::snprintf(buf, sizeof buf, "\\u%04x", code);
      } else {
        std::snprintf(buf, sizeof buf, "\\U%08x", code);
      }
      out += buf;
    }
    i += unit.length;
  }
}

}  // namespace

std::string printable(std::string_view text, std::size_t max_bytes, char quote) {
  std::string out;
  escape_into(out, text, quote, max_bytes, "\\x");
  return out;
}

std::string py_str_repr(std::string_view text, std::size_t max_bytes) {
  // Python picks double quotes only for text with a single quote and no double quote.
  const bool has_single = text.find('\'') != std::string_view::npos;
  const bool has_double = text.find('"') != std::string_view::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  escape_into(out, text, quote, max_bytes, "\\udc");
  out += quote;
  return out;
}

double py_round(double x) {
  if (!std::isfinite(x)) throw std::invalid_argument("cannot round " + py_float_str(x) + " to an integer");
  const double down = std::floor(x);
  const double diff = x - down;  // exact for doubles
  if (diff < 0.5) return down;
  if (diff > 0.5) return down + 1;
  return std::fmod(down, 2.0) == 0 ? down : down + 1;
}

std::string py_float_str(double x) {
  if (std::isnan(x)) return "nan";
  if (std::isinf(x)) return x > 0 ? "inf" : "-inf";
  std::array<char, 64> buf{};
  // Shortest digits that read back, in scientific form: d[.ddd]e[+-]XX.
  const auto result = std::to_chars(buf.data(), buf.data() + buf.size(), x, std::chars_format::scientific);
  const std::string_view sci(buf.data(), static_cast<std::size_t>(result.ptr - buf.data()));
  std::string out = sci[0] == '-' ? "-" : "";
  const std::size_t e = sci.find('e');
  std::string digits;
  for (std::size_t i = out.size(); i < e; ++i) {
    if (sci[i] != '.') digits += sci[i];
  }
  const long decpt = std::strtol(std::string(sci.substr(e + 1)).c_str(), nullptr, 10) + 1;
  const auto ndigits = static_cast<long>(digits.size());
  if (decpt <= -4 || decpt > 16) {  // Python's repr switches to the exponent form here
    out += digits[0];
    if (digits.size() > 1) out += "." + digits.substr(1);
    const long exponent = decpt - 1;
    const std::string magnitude = std::to_string(exponent < 0 ? -exponent : exponent);
    out += std::string(exponent < 0 ? "e-" : "e+") + (magnitude.size() < 2 ? "0" : "") + magnitude;
  } else if (decpt <= 0) {
    out += "0." + std::string(static_cast<std::size_t>(-decpt), '0') + digits;
  } else if (decpt >= ndigits) {
    out += digits + std::string(static_cast<std::size_t>(decpt - ndigits), '0') + ".0";
  } else {
    out += digits.substr(0, static_cast<std::size_t>(decpt)) + "." + digits.substr(static_cast<std::size_t>(decpt));
  }
  return out;
}

std::string_view py_strip(std::string_view text) {
  std::size_t begin = 0;
  while (begin < text.size()) {
    std::size_t i = begin;
    if (!py_isspace(next_code_point(text, i))) break;
    begin = i;
  }
  std::size_t end = text.size();
  while (end > begin) {
    std::size_t i = end;
    if (!py_isspace(prev_code_point(text, i))) break;
    end = i;
  }
  return text.substr(begin, end - begin);
}

}  // namespace edgemole
