// The safetensors container that every MQTT payload is (docs/protocol.md section 2). Reading never trusts a length,
// offset or shape before checking it against the buffer, so a hostile payload is one ProtocolError, never a read
// past the end or a huge allocation; writing produces what the reference decoder (Python `safetensors`) reads.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "tensor.h"

namespace edgemole {

// Largest header N accepted (section 2.4).
inline constexpr std::size_t kMaxHeaderBytes = 1024 * 1024;
// Deepest JSON nesting accepted in the header and in the metadata's JSON strings (the protocol needs 4).
inline constexpr int kMaxJsonDepth = 64;

// Parses RFC 8259 JSON text strictly: no NaN/Infinity literals, no comments, no numbers that overflow a binary64,
// no duplicate keys in any object, nesting at most kMaxJsonDepth, valid UTF-8. Throws ProtocolError whose text is
// only the reason (e.g. "duplicate key 'a'"), so that callers can say which JSON was bad. `top_level_keys`, when
// given, receives the members of a top-level object in document order (nlohmann::json keeps them sorted).
nlohmann::json parse_strict_json(std::string_view text, std::vector<std::string>* top_level_keys = nullptr);

// A parsed safetensors header: the object, and its member names in document order (messages name the first
// offending member, as the reference does).
struct Header {
  nlohmann::json object;
  std::vector<std::string> order;
};

// The header of a safetensors buffer: checks the 8-byte length (at most kMaxHeaderBytes and at most size - 8) and
// parses the header strictly. Errors as in edgemole/protocol/messages.py: "payload of 5 bytes is too short for a
// safetensors header", "header length 4096 exceeds the payload (32 bytes) or the limit", "header is not valid
// JSON: ...", "header is not a JSON object".
Header read_header(const std::uint8_t* data, std::size_t size);

// The tensors described by `header` (every member except "__metadata__"), copied out of the data section that
// starts at data + 8 + header length. Checks every entry (an allowed dtype, a shape of non-negative integers,
// two data offsets), that each tensor's byte size equals its shape times its element size, and that the tensors
// tile the data section exactly (no gap, overlap or trailing byte). Errors: "tensor 'x' has dtype 'F64', not one
// of [...]" for a dtype (the first in document order, before anything else is checked), "tensor data is
// malformed: ..." for the rest.
TensorMap read_tensors(const Header& header, const std::uint8_t* data, std::size_t size);

// A whole safetensors buffer whose metadata values are strings (any safetensors file, not only messages).
struct Safetensors {
  std::map<std::string, std::string> metadata;
  TensorMap tensors;
};
Safetensors read_safetensors(const std::uint8_t* data, std::size_t size);

// Serialises tensors and string metadata: the header written compactly with "__metadata__" first (its keys in the
// order given), then the tensors by descending element size and name (as the reference encoder orders them),
// padded with spaces to a multiple of 8, the data section in the same order. Throws ProtocolError for a tensor
// whose byte count does not match its shape and dtype, or a name that is empty or "__metadata__".
std::vector<std::uint8_t> write_safetensors(const std::vector<std::pair<std::string, std::string>>& metadata,
                                            const TensorMap& tensors);

}  // namespace edgemole
