// One protocol message (schema edgemole/1) and its encoding, as in edgemole/protocol/messages.py: the fields travel
// as strings in the safetensors header's "__metadata__", the tensors as the payload's tensors. Decoding checks the
// whole structure (docs/protocol.md section 7.1) before returning anything, in the reference's order and with its
// one-line reasons, so that a device rejects exactly what the Python client rejects.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "pyfmt.h"
#include "tensor.h"

namespace edgemole {

inline constexpr std::string_view kSchemaVersion = "edgemole/1";
inline constexpr std::size_t kDefaultMaxMessageBytes = 16 * 1024 * 1024;
inline constexpr std::int64_t kMaxRound = 1000000000;

// Message kinds (metadata "kind").
namespace kind {
inline constexpr const char* kTask = "task";
inline constexpr const char* kRound = "round";
inline constexpr const char* kAssign = "assign";
inline constexpr const char* kUpdate = "update";
inline constexpr const char* kStatus = "status";
inline constexpr const char* kMetrics = "metrics";
}  // namespace kind

// Work phases of an assignment (train, LoRA-A2's alternating factors, evaluation), and the final announcement's.
inline constexpr const char* kPhases[] = {"train", "train-A", "train-B", "eval"};
inline constexpr const char* kPhaseDone = "done";

bool is_kind(std::string_view value);
bool is_work_phase(std::string_view value);

struct Message {
  std::string kind, fleet;
  std::int64_t round = 0;
  std::string phase, client;
  nlohmann::json body = nlohmann::json::object();
  TensorMap tensors;
  std::map<std::string, std::string> roles;  // tensor name -> role; a tensor without an entry has the role ""
};

// The payload of a message: metadata in the order of docs/protocol.md section 3, body and roles as compact JSON with
// sorted keys and non-ASCII escaped (byte for byte what the Python encoder writes for them). Throws ProtocolError
// for an unknown kind, a round outside [0, kMaxRound], a non-finite number in the body, a role for a tensor that
// is not in the message, or a tensor whose bytes do not match its shape and dtype.
std::vector<std::uint8_t> encode(const Message& msg);

// Parses and structurally checks a payload (every check of section 7.1, in that order). Throws ProtocolError with
// a one-line reason; never reads outside [data, data + size).
Message decode(const std::uint8_t* data, std::size_t size, std::size_t max_bytes = kDefaultMaxMessageBytes);
inline Message decode(const std::vector<std::uint8_t>& payload, std::size_t max_bytes = kDefaultMaxMessageBytes) {
  return decode(payload.data(), payload.size(), max_bytes);
}

// A value as Python's repr() shows it in the reference's messages ('text', None, True, 12, [1, 2]), shortened to
// about kReprMaxBytes so that a hostile value cannot make a log line huge. A string shows as pyfmt.h's py_repr of
// it (that overload takes a std::string or a literal; this one nullptr, numbers, lists and objects).
std::string py_repr(const nlohmann::json& value);

}  // namespace edgemole
