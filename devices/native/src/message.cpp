#include "message.h"

#include <cmath>
#include <utility>

#include "errors.h"
#include "pyfmt.h"
#include "safetensors.h"
#include "utf8.h"

namespace edgemole {
namespace {

void repr_into(const nlohmann::json& value, std::string& out) {
  if (out.size() > kReprMaxBytes) return;
  switch (value.type()) {
    case nlohmann::json::value_t::null:
      out += "None";
      break;
    case nlohmann::json::value_t::boolean:
      out += value.get<bool>() ? "True" : "False";
      break;
    case nlohmann::json::value_t::string:
      out += py_str_repr(value.get_ref<const std::string&>());
      break;
    case nlohmann::json::value_t::array: {
      out += '[';
      bool first = true;
      for (const auto& item : value) {
        if (!first) out += ", ";
        first = false;
        repr_into(item, out);
        if (out.size() > kReprMaxBytes) return;
      }
      out += ']';
      break;
    }
    case nlohmann::json::value_t::object: {
      out += '{';
      bool first = true;
      for (const auto& [key, item] : value.items()) {
        if (!first) out += ", ";
        first = false;
        out += py_str_repr(key) + ": ";
        repr_into(item, out);
        if (out.size() > kReprMaxBytes) return;
      }
      out += '}';
      break;
    }
    default:
      out += value.dump();
      break;
  }
}

// Cuts `text` to about max_bytes without splitting a UTF-8 sequence.
std::string shorten(std::string text, std::size_t max_bytes = kReprMaxBytes) {
  if (text.size() <= max_bytes) return text;
  text.resize(floor_char_boundary(text, max_bytes));
  return text + "...";
}

// Where in `value` a number is NaN or infinite ("" for the top level), or nothing.
bool find_non_finite(const nlohmann::json& value, const std::string& path, std::string& where) {
  if (value.is_number_float() && !std::isfinite(value.get<double>())) {
    where = path;
    return true;
  }
  if (value.is_object()) {
    for (const auto& [key, item] : value.items()) {
      if (find_non_finite(item, path.empty() ? key : path + "." + key, where)) return true;
    }
  } else if (value.is_array()) {
    std::size_t i = 0;
    for (const auto& item : value) {
      if (find_non_finite(item, path + "[" + std::to_string(i++) + "]", where)) return true;
    }
  }
  return false;
}

// The metadata string `key` (absent: "{}") parsed as a JSON object, as messages.py's _json_field.
nlohmann::json json_field(const nlohmann::json& meta, const char* key) {
  const auto it = meta.find(key);
  const std::string text = it == meta.end() ? "{}" : it->get<std::string>();
  nlohmann::json value;
  try {
    value = parse_strict_json(text);
  } catch (const ProtocolError& exc) {
    const std::string reason = shorten(exc.what(), 100);
    throw ProtocolError("metadata '" + std::string(key) + "' is not valid JSON (" + reason + ")");
  }
  if (!value.is_object()) throw ProtocolError("metadata '" + std::string(key) + "' is not a JSON object");
  return value;
}

std::string meta_string(const nlohmann::json& meta, const char* key) {
  const auto it = meta.find(key);
  return it == meta.end() ? std::string() : it->get<std::string>();
}

// A metadata value for an error message: Python's repr of meta.get(key), None when absent.
std::string meta_repr(const nlohmann::json& meta, const char* key) {
  const auto it = meta.find(key);
  return it == meta.end() ? "None" : py_str_repr(it->get<std::string>());
}

}  // namespace

bool is_kind(std::string_view value) {
  for (const char* k : {kind::kTask, kind::kRound, kind::kAssign, kind::kUpdate, kind::kStatus, kind::kMetrics}) {
    if (value == k) return true;
  }
  return false;
}

bool is_work_phase(std::string_view value) {
  for (const char* phase : kPhases) {
    if (value == phase) return true;
  }
  return false;
}

std::string py_repr(const nlohmann::json& value) {
  // A string alone is py_str_repr's spelling, cut as it cuts, so that a string shows the same whichever overload
  // a call picks.
  if (value.is_string()) return py_str_repr(value.get_ref<const std::string&>());
  std::string out;
  repr_into(value, out);
  return shorten(std::move(out));
}

std::vector<std::uint8_t> encode(const Message& msg) {
  if (!is_kind(msg.kind)) throw ProtocolError("unknown message kind " + py_repr(msg.kind));
  if (msg.round < 0 || msg.round > kMaxRound) throw ProtocolError("invalid round " + std::to_string(msg.round));
  for (const auto& [name, role] : msg.roles) {
    if (msg.tensors.find(name) == msg.tensors.end()) {
      throw ProtocolError("roles given for tensors not in the message: " + py_repr(name));
    }
  }
  if (!msg.body.is_object()) throw ProtocolError("message body is not a JSON object");
  std::string where;
  if (find_non_finite(msg.body, "", where)) {
    throw ProtocolError("message body has a non-finite number at '" + where + "' (JSON has no NaN or infinity)");
  }
  const nlohmann::json roles(msg.roles);
  // nlohmann::json keeps object keys sorted; dump(-1, ' ', true) is compact with non-ASCII escaped, like json.dumps;
  // a string with invalid UTF-8 (which Python's str cannot hold) gets U+FFFD rather than failing the message.
  constexpr auto kReplace = nlohmann::json::error_handler_t::replace;
  const std::vector<std::pair<std::string, std::string>> metadata = {
      {"schema", std::string(kSchemaVersion)},
      {"kind", msg.kind},
      {"fleet", msg.fleet},
      {"round", std::to_string(msg.round)},
      {"phase", msg.phase},
      {"client", msg.client},
      {"body", msg.body.dump(-1, ' ', true, kReplace)},
      {"roles", roles.dump(-1, ' ', true, kReplace)},
  };
  return write_safetensors(metadata, msg.tensors);
}

Message decode(const std::uint8_t* data, std::size_t size, std::size_t max_bytes) {
  if (size > max_bytes) {
    throw ProtocolError("payload of " + std::to_string(size) + " bytes exceeds the limit of " +
                        std::to_string(max_bytes) + " bytes");
  }
  const Header header = read_header(data, size);
  const auto meta_it = header.object.find("__metadata__");
  bool strings = meta_it != header.object.end() && meta_it->is_object();
  if (strings) {
    for (const auto& item : *meta_it) strings = strings && item.is_string();
  }
  if (!strings) throw ProtocolError("header has no '__metadata__' object of strings");
  const nlohmann::json& meta = *meta_it;

  if (meta_string(meta, "schema") != kSchemaVersion) {
    throw ProtocolError("unsupported schema " + meta_repr(meta, "schema") + " (expected 'edgemole/1')");
  }
  const std::string kind = meta_string(meta, "kind");
  if (!is_kind(kind)) throw ProtocolError("unknown message kind " + meta_repr(meta, "kind"));
  // ASCII digits only (no sign, space or exponent), at most 10 of them, value at most kMaxRound.
  const std::string round_text = meta_string(meta, "round");
  bool round_ok = !round_text.empty() && round_text.size() <= 10;
  std::int64_t round = 0;
  for (const char c : round_text) {
    round_ok = round_ok && c >= '0' && c <= '9';
    if (round_ok) round = round * 10 + (c - '0');
  }
  if (!round_ok || round > kMaxRound) throw ProtocolError("invalid round " + py_str_repr(round_text));

  Message msg;
  msg.tensors = read_tensors(header, data, size);
  const nlohmann::json roles = json_field(meta, "roles");
  for (const auto& [name, role] : roles.items()) {
    if (!role.is_string() || msg.tensors.find(name) == msg.tensors.end()) {
      throw ProtocolError("metadata 'roles' must map tensor names in the message to strings");
    }
    msg.roles[name] = role.get<std::string>();
  }
  msg.body = json_field(meta, "body");
  msg.kind = kind;
  msg.fleet = meta_string(meta, "fleet");
  msg.round = round;
  msg.phase = meta_string(meta, "phase");
  msg.client = meta_string(meta, "client");
  return msg;
}

}  // namespace edgemole
