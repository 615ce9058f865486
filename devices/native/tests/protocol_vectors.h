// The test vectors of docs/protocol.md section 9, read from the document itself so that the tests and the
// specification cannot drift apart. Shared by the wire tests and the fuzzer (which grows its inputs from them).
#pragma once

#include <doctest/doctest.h>

#include <cctype>
#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <vector>

namespace edgemole::testing {

using Bytes = std::vector<std::uint8_t>;

inline Bytes from_hex(const std::string& hex) {
  Bytes out;
  for (std::size_t i = 0; i + 1 < hex.size(); i += 2) {
    out.push_back(static_cast<std::uint8_t>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  return out;
}

// The ```hex name=... blocks of docs/protocol.md, by name.
inline std::map<std::string, Bytes> protocol_vectors() {
  std::ifstream file(EDGEMOLE_REPO_ROOT "/docs/protocol.md");
  REQUIRE_MESSAGE(file.good(), "cannot read docs/protocol.md");
  std::map<std::string, Bytes> out;
  std::string line, name, hex;
  bool inside = false;
  const std::string opening = "```hex name=";
  while (std::getline(file, line)) {
    if (!inside && line.rfind(opening, 0) == 0) {
      inside = true;
      name = line.substr(opening.size());
      hex.clear();
    } else if (inside && line.rfind("```", 0) == 0) {
      inside = false;
      out[name] = from_hex(hex);
    } else if (inside) {
      for (const char c : line) {
        if (std::isxdigit(static_cast<unsigned char>(c))) hex += c;
      }
    }
  }
  return out;
}

}  // namespace edgemole::testing
