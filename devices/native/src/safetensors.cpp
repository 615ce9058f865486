#include "safetensors.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>
#include <string>
#include <tuple>
#include <utility>

#include "errors.h"
#include "pyfmt.h"

namespace edgemole {
namespace {

constexpr std::string_view kMetadataKey = "__metadata__";
constexpr std::string_view kUtf8Bom = "\xEF\xBB\xBF";

// nlohmann's messages start with "[json.exception.parse_error.101] "; the reason alone reads better in one line.
// Its "last read: '...'" part echoes payload bytes: made printable.
std::string json_reason(const std::exception& exc) {
  std::string text = exc.what();
  if (!text.empty() && text.front() == '[') {
    const auto end = text.find("] ");
    if (end != std::string::npos) text.erase(0, end + 2);
  }
  return printable(text);
}

// Quotes a name for an error message, shortened so that a hostile name cannot make the line huge.
std::string quote_name(const std::string& name) { return "'" + printable(name, 100, '\'') + "'"; }

// A SAX pass over JSON text that builds nothing and throws ProtocolError at the first syntax error, duplicate key or
// nesting deeper than kMaxJsonDepth. (nlohmann's callback parser would do the same in one pass, but it rescans the
// parent object at every nested object's end: quadratic for a hostile header with many entries.)
class StrictChecker {
 public:
  using json = nlohmann::json;
  explicit StrictChecker(std::vector<std::string>* top_level_keys) : top_level_keys_(top_level_keys) {}

  bool null() { return true; }
  bool boolean(bool) { return true; }
  bool number_integer(json::number_integer_t) { return true; }
  bool number_unsigned(json::number_unsigned_t) { return true; }
  bool number_float(json::number_float_t, const json::string_t&) { return true; }
  bool string(json::string_t&) { return true; }
  bool binary(json::binary_t&) { return true; }
  bool start_object(std::size_t) {
    enter();
    open_objects_.emplace_back();
    return true;
  }
  bool key(json::string_t& key) {
    if (!open_objects_.back().insert(key).second) throw ProtocolError("duplicate key " + quote_name(key));
    if (depth_ == 1 && top_level_keys_ != nullptr) top_level_keys_->push_back(key);
    return true;
  }
  bool end_object() {
    open_objects_.pop_back();
    --depth_;
    return true;
  }
  bool start_array(std::size_t) {
    enter();
    return true;
  }
  bool end_array() {
    --depth_;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const json::exception& exc) {
    throw ProtocolError(json_reason(exc));  // syntax errors, bad UTF-8, overflowing numbers (406)
  }

 private:
  void enter() {
    if (++depth_ > kMaxJsonDepth) throw ProtocolError("nesting deeper than " + std::to_string(kMaxJsonDepth));
  }
  std::vector<std::string>* top_level_keys_;
  std::vector<std::set<std::string>> open_objects_;  // the keys seen so far in each open object
  int depth_ = 0;
};

nlohmann::json parse_strict(std::string_view text, std::vector<std::string>* top_level_keys) {
  if (text.substr(0, kUtf8Bom.size()) == kUtf8Bom) throw ProtocolError("unexpected UTF-8 byte order mark");
  // nlohmann stops at a NUL byte as if the text ended there; valid JSON never contains one.
  const auto nul = text.find('\0');
  if (nul != std::string_view::npos) throw ProtocolError("NUL byte at " + std::to_string(nul));
  StrictChecker checker(top_level_keys);
  nlohmann::json::sax_parse(text.begin(), text.end(), &checker, nlohmann::json::input_format_t::json,
                            /*strict=*/true, /*ignore_comments=*/false);
  try {
    return nlohmann::json::parse(text.begin(), text.end());  // checked above: linear, and cannot fail now
  } catch (const nlohmann::json::exception& exc) {
    throw ProtocolError(json_reason(exc));
  }
}

std::uint64_t load_u64_le(const std::uint8_t* p) {
  std::uint64_t value = 0;
  for (int i = 7; i >= 0; --i) value = (value << 8) | p[i];
  return value;
}

[[noreturn]] void malformed(const std::string& why) { throw ProtocolError("tensor data is malformed: " + why); }

// A JSON value that is a non-negative integer (not a boolean, not 2.0), as serde's usize would require.
bool as_size(const nlohmann::json& value, std::uint64_t& out) {
  if (!value.is_number_unsigned()) {
    if (value.is_number_integer() && value.get<std::int64_t>() >= 0) {
      out = static_cast<std::uint64_t>(value.get<std::int64_t>());
      return true;
    }
    return false;
  }
  out = value.get<std::uint64_t>();
  return true;
}

// A JSON string literal of `text`; invalid UTF-8 becomes U+FFFD instead of an exception.
std::string json_text(const std::string& text) {
  return nlohmann::json(text).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

struct Entry {
  std::string name;
  DType dtype = DType::F32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;
};

Entry parse_entry(const std::string& name, const nlohmann::json& info) {
  Entry entry;
  entry.name = name;
  entry.dtype = *parse_dtype(info.at("dtype").get_ref<const std::string&>());  // checked by the caller
  const auto shape = info.find("shape");
  if (shape == info.end() || !shape->is_array()) malformed("tensor " + quote_name(name) + " has no 'shape' array");
  // The product of the non-zero dimensions must fit an int64, so that no partial product overflows later.
  std::uint64_t nonzero_product = 1;
  for (const auto& dim : *shape) {
    std::uint64_t d = 0;
    if (!as_size(dim, d)) malformed("tensor " + quote_name(name) + " has a shape that is not non-negative integers");
    if (d != 0) {
      if (nonzero_product > static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()) / d) {
        malformed("tensor " + quote_name(name) + " has a shape too large");
      }
      nonzero_product *= d;
    }
    entry.shape.push_back(static_cast<std::int64_t>(d));
  }
  const auto offsets = info.find("data_offsets");
  if (offsets == info.end() || !offsets->is_array() || offsets->size() != 2 || !as_size((*offsets)[0], entry.begin) ||
      !as_size((*offsets)[1], entry.end)) {
    malformed("tensor " + quote_name(name) + " has no 'data_offsets' pair of non-negative integers");
  }
  return entry;
}

}  // namespace

nlohmann::json parse_strict_json(std::string_view text, std::vector<std::string>* top_level_keys) {
  return parse_strict(text, top_level_keys);
}

Header read_header(const std::uint8_t* data, std::size_t size) {
  if (size < 8) {
    throw ProtocolError("payload of " + std::to_string(size) + " bytes is too short for a safetensors header");
  }
  const std::uint64_t n = load_u64_le(data);
  if (n > kMaxHeaderBytes || n > size - 8) {
    throw ProtocolError("header length " + std::to_string(n) + " exceeds the payload (" + std::to_string(size) +
                        " bytes) or the limit");
  }
  Header header;
  try {
    header.object = parse_strict(std::string_view(reinterpret_cast<const char*>(data + 8), n), &header.order);
  } catch (const ProtocolError& exc) {
    throw ProtocolError(std::string("header is not valid JSON: ") + exc.what());
  }
  if (!header.object.is_object()) throw ProtocolError("header is not a JSON object");
  return header;
}

TensorMap read_tensors(const Header& header, const std::uint8_t* data, std::size_t size) {
  // Every dtype first, in document order, before anything else of the entries is looked at (section 7.1 step 8).
  for (const std::string& name : header.order) {
    if (name == kMetadataKey) continue;
    const nlohmann::json& info = header.object.at(name);
    const nlohmann::json* dtype = nullptr;
    if (info.is_object()) {
      const auto it = info.find("dtype");
      if (it != info.end()) dtype = &*it;
    }
    if (dtype == nullptr || !dtype->is_string() || !parse_dtype(dtype->get_ref<const std::string&>())) {
      const std::string shown = dtype == nullptr     ? "None"
                                : dtype->is_string() ? quote_name(dtype->get<std::string>())
                                                     : dtype->dump();
      throw ProtocolError("tensor " + quote_name(name) + " has dtype " + shown +
                          ", not one of ['BF16', 'F16', 'F32', 'I32', 'I64']");
    }
  }
  const std::size_t data_start = 8 + static_cast<std::size_t>(load_u64_le(data));  // read_header checked it
  const std::uint64_t data_size = size - data_start;
  std::vector<Entry> entries;
  for (const auto& [name, info] : header.object.items()) {
    if (name != kMetadataKey) entries.push_back(parse_entry(name, info));
  }
  std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) {
    return std::tie(a.begin, a.end, a.name) < std::tie(b.begin, b.end, b.name);
  });
  std::uint64_t expected_begin = 0;
  for (const Entry& entry : entries) {
    if (entry.begin != expected_begin || entry.end < entry.begin) {
      malformed("invalid offset for tensor " + quote_name(entry.name) + " (tensors must tile the data section)");
    }
    std::uint64_t numel = 1;
    for (std::int64_t d : entry.shape) numel *= static_cast<std::uint64_t>(d);  // fits: parse_entry checked it
    const std::uint64_t element = dtype_size(entry.dtype);
    if (numel > std::numeric_limits<std::uint64_t>::max() / element || entry.end - entry.begin != numel * element) {
      malformed("tensor " + quote_name(entry.name) + " has " + std::to_string(entry.end - entry.begin) +
                " bytes, not what its shape and dtype need");
    }
    if (entry.end > data_size) malformed("tensor " + quote_name(entry.name) + " ends past the end of the payload");
    expected_begin = entry.end;
  }
  if (expected_begin != data_size) {
    malformed("the tensors cover " + std::to_string(expected_begin) + " of the " + std::to_string(data_size) +
              " bytes of the data section");
  }
  TensorMap tensors;
  for (Entry& entry : entries) {
    Tensor tensor;
    tensor.dtype = entry.dtype;
    tensor.shape = std::move(entry.shape);
    const std::uint8_t* begin = data + data_start + entry.begin;
    tensor.bytes.assign(begin, begin + (entry.end - entry.begin));
    tensors.emplace(std::move(entry.name), std::move(tensor));
  }
  return tensors;
}

Safetensors read_safetensors(const std::uint8_t* data, std::size_t size) {
  const Header header = read_header(data, size);
  Safetensors out;
  const auto meta = header.object.find(kMetadataKey);
  if (meta != header.object.end()) {
    if (!meta->is_object()) throw ProtocolError("header has no '__metadata__' object of strings");
    for (const auto& [key, value] : meta->items()) {
      if (!value.is_string()) throw ProtocolError("header has no '__metadata__' object of strings");
      out.metadata[key] = value.get<std::string>();
    }
  }
  out.tensors = read_tensors(header, data, size);
  return out;
}

std::vector<std::uint8_t> write_safetensors(const std::vector<std::pair<std::string, std::string>>& metadata,
                                            const TensorMap& tensors) {
  // Larger elements first, then by name: the reference encoder's order, which keeps every tensor aligned.
  std::vector<const TensorMap::value_type*> order;
  for (const auto& item : tensors) {
    const auto& [name, tensor] = item;
    if (name.empty() || name == kMetadataKey) throw ProtocolError("invalid tensor name " + quote_name(name));
    std::uint64_t numel = 1;
    for (std::int64_t d : tensor.shape) {
      if (d < 0) throw ProtocolError("tensor " + quote_name(name) + " has a negative dimension");
      numel *= static_cast<std::uint64_t>(d);
    }
    if (tensor.bytes.size() != numel * dtype_size(tensor.dtype)) {
      throw ProtocolError("tensor " + quote_name(name) + " has " + std::to_string(tensor.bytes.size()) +
                          " bytes, its shape and dtype need " + std::to_string(numel * dtype_size(tensor.dtype)));
    }
    order.push_back(&item);
  }
  std::stable_sort(order.begin(), order.end(), [](const auto* a, const auto* b) {
    return dtype_size(a->second.dtype) > dtype_size(b->second.dtype);  // names already sorted (std::map)
  });

  // Written member by member (dump() of an object would sort the names and lose the order above).
  std::string text = "{";
  if (!metadata.empty()) {
    std::string meta = "{";
    for (const auto& [key, value] : metadata) {
      meta += (meta.size() > 1 ? "," : "") + json_text(key) + ":" + json_text(value);
    }
    text += "\"__metadata__\":" + meta + "}";
  }
  std::uint64_t offset = 0;
  for (const auto* item : order) {
    const Tensor& tensor = item->second;
    const std::string entry = "{\"dtype\":\"" + std::string(dtype_name(tensor.dtype)) +
                              "\",\"shape\":" + nlohmann::json(tensor.shape).dump() + ",\"data_offsets\":[" +
                              std::to_string(offset) + "," + std::to_string(offset + tensor.bytes.size()) + "]}";
    offset += tensor.bytes.size();
    text += (text.size() > 1 ? "," : "") + json_text(item->first) + ":" + entry;
  }
  text += "}";  // compact; UTF-8 as is, like serde_json
  text.append((8 - text.size() % 8) % 8, ' ');
  if (text.size() > kMaxHeaderBytes) {
    throw ProtocolError("the header would be " + std::to_string(text.size()) + " bytes, more than the limit");
  }

  std::vector<std::uint8_t> out;
  out.reserve(8 + text.size() + offset);
  std::uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<std::uint8_t>((n >> (8 * i)) & 0xffu));
  out.insert(out.end(), text.begin(), text.end());
  for (const auto* item : order) out.insert(out.end(), item->second.bytes.begin(), item->second.bytes.end());
  return out;
}

}  // namespace edgemole
