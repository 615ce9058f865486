#include "data.h"

#include <sys/stat.h>
#include <zlib.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <nlohmann/json.hpp>
#include <numeric>
#include <stdexcept>
#include <tuple>
#include <unordered_map>

#include "errors.h"
#include "pyfmt.h"
#include "utf8.h"

// The reader gives the rows, the strings and the messages of the Python client's reader:
//  - the file is decoded as Python's "utf-8-sig" codec does (a leading BOM dropped; error offsets count from after
//    it; a file that is only a prefix of the BOM reads as empty);
//  - CSV follows CPython's _csv.c reader with the default dialect, fed the lines io.StringIO(newline="") yields;
//  - JSON is parsed by nlohmann-json into ordered_json (keys in file order; a repeated key keeps its first place and
//    takes the last value, as a Python dict does) and values become strings as loaders.py `_to_str` makes them. A
//    syntax error names the line and the column in characters as Python's message does, but the reason is
//    nlohmann's wording and the place is where nlohmann stopped, which can differ from where Python stops.
//    Known differences from Python's json module, for data files that are not expected: NaN, Infinity and
//    -Infinity, lone surrogate escapes ("\ud800") and numbers beyond a double's range (1e400) are rejected (Python
//    accepts them), the last with no position in its message; integers beyond 64 bits are read as the nearest
//    double (str() gives "1.2345678901234568e+29" here for 123456789012345678901234567890, whose digits Python
//    keeps); a value nested more than 900 levels deep is refused (Python stops with a RecursionError).

namespace edgemole {
namespace {

// ------------------------------------------------------------------------------------------- files ----------

struct PyPath {
  std::string fs;      // str(Path(path)): what is opened
  std::string suffix;  // Path(path).suffix
};

// pathlib's reading of a POSIX path: empty and "." parts dropped, a trailing slash ignored.
PyPath parse_path(const std::string& path) {
  std::vector<std::string> parts;
  std::string root;
  std::size_t i = 0;
  if (!path.empty() && path[0] == '/') {
    std::size_t slashes = path.find_first_not_of('/');
    if (slashes == std::string::npos) slashes = path.size();
    root = slashes == 2 ? "//" : "/";
    i = slashes;
  }
  while (i < path.size()) {
    std::size_t end = path.find('/', i);
    if (end == std::string::npos) end = path.size();
    const std::string part = path.substr(i, end - i);
    if (!part.empty() && part != ".") parts.push_back(part);
    i = end + 1;
  }
  PyPath out;
  out.fs = root;
  for (std::size_t k = 0; k < parts.size(); ++k) out.fs += (k ? "/" : "") + parts[k];
  if (out.fs.empty()) out.fs = ".";
  const std::string name = parts.empty() ? "" : parts.back();
  const std::size_t dot = name.rfind('.');
  if (dot != std::string::npos && dot > 0 && dot + 1 < name.size()) out.suffix = name.substr(dot);
  return out;
}

std::string ascii_lower(std::string s) {
  for (char& c : s) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  }
  return s;
}

// The file's text as Python's open(path, encoding="utf-8-sig", newline="").read() gives it.
std::string read_file_text(const std::string& fs_path, const std::string& shown) {
  struct stat st {};
  if (::stat(fs_path.c_str(), &st) != 0) throw DataError("data file " + shown + " does not exist");
  if (S_ISDIR(st.st_mode)) throw DataError("data file " + shown + " is a directory, not a file");
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(fs_path.c_str(), "rb"), &std::fclose);
  if (!file) throw DataError("data file " + shown + " cannot be read: " + std::strerror(errno));
  std::string bytes;
  std::array<char, 65536> buffer{};
  for (;;) {
    const std::size_t got = std::fread(buffer.data(), 1, buffer.size(), file.get());
    bytes.append(buffer.data(), got);
    if (got < buffer.size()) {
      if (std::ferror(file.get())) throw DataError("data file " + shown + " cannot be read: " + std::strerror(errno));
      break;
    }
  }
  static constexpr std::string_view kBom = "\xEF\xBB\xBF";
  std::string content;
  if (bytes.size() < kBom.size() && kBom.substr(0, bytes.size()) == bytes) {
    content.clear();  // the codec waits for more bytes to decide and the file ends: nothing is decoded
  } else {
    content = bytes.compare(0, kBom.size(), kBom) == 0 ? bytes.substr(kBom.size()) : std::move(bytes);
  }
  const std::size_t bad = first_invalid_utf8(content);
  if (bad != std::string_view::npos) {
    throw DataError("data file " + shown + " is not valid UTF-8 (byte " + std::to_string(bad) + ")");
  }
  if (py_strip(content).empty()) throw DataError("data file " + shown + " is empty");
  return content;
}

// ------------------------------------------------------------------------------------- records ----------

// One row: its place for messages and its values as strings by column, in key order (a missing key reads as "").
struct Record {
  std::string where;
  std::vector<std::pair<std::string, std::string>> values;

  std::string* find(const std::string& column) {
    for (auto& [key, value] : values) {
      if (key == column) return &value;
    }
    return nullptr;
  }
};

struct Table {
  std::vector<std::string> columns;
  std::vector<Record> records;
};

// ------------------------------------------------------------------------------------------- CSV ----------

class CsvError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// CPython's csv.reader (default dialect: delimiter ',', quotechar '"', doublequote, not strict) over the lines of
// io.StringIO(content, newline=""), which end at "\n", "\r\n" or a lone "\r" and keep their line break.
class CsvReader {
 public:
  explicit CsvReader(std::string_view content) : content_(content) {}

  // The next row (empty for a blank line); false at the end of the input.
  bool next(std::vector<std::string>& row) {
    fields_.clear();
    field_.clear();
    state_ = State::kStartRecord;
    do {
      std::string_view line;
      if (!next_line(line)) {
        if (!field_.empty() || state_ == State::kInQuotedField) {
          save_field();  // the input ended inside a field: it ends there (not strict)
          break;
        }
        return false;
      }
      ++line_num_;
      for (const char c : line) process(static_cast<unsigned char>(c));
      process(kEol);
    } while (state_ != State::kStartRecord);
    row = std::move(fields_);
    fields_ = {};
    return true;
  }

  std::size_t line_num() const { return line_num_; }

 private:
  enum class State { kStartRecord, kStartField, kInField, kInQuotedField, kQuoteInQuotedField, kEatCrnl };
  static constexpr int kEol = -2;

  bool next_line(std::string_view& line) {
    if (pos_ >= content_.size()) return false;
    const std::size_t brk = content_.find_first_of("\r\n", pos_);
    std::size_t end = content_.size();
    if (brk != std::string_view::npos) {
      end = brk + 1;
      if (content_[brk] == '\r' && end < content_.size() && content_[end] == '\n') ++end;
    }
    line = content_.substr(pos_, end - pos_);
    pos_ = end;
    return true;
  }

  void save_field() {
    fields_.push_back(std::move(field_));
    field_.clear();
  }

  void process(int c) {
    const bool newline = c == '\n' || c == '\r';
    switch (state_) {
      case State::kStartRecord:
        if (c == kEol) return;  // a blank line: an empty row
        if (newline) {
          state_ = State::kEatCrnl;
          return;
        }
        state_ = State::kStartField;
        [[fallthrough]];
      case State::kStartField:
        if (newline || c == kEol) {
          save_field();
          state_ = c == kEol ? State::kStartRecord : State::kEatCrnl;
        } else if (c == '"') {
          state_ = State::kInQuotedField;
        } else if (c == ',') {
          save_field();
        } else {
          field_ += static_cast<char>(c);
          state_ = State::kInField;
        }
        return;
      case State::kInField:
        if (newline || c == kEol) {
          save_field();
          state_ = c == kEol ? State::kStartRecord : State::kEatCrnl;
        } else if (c == ',') {
          save_field();
          state_ = State::kStartField;
        } else {
          field_ += static_cast<char>(c);
        }
        return;
      case State::kInQuotedField:
        if (c == kEol) return;  // the record goes on with the next line
        if (c == '"') {
          state_ = State::kQuoteInQuotedField;
        } else {
          field_ += static_cast<char>(c);
        }
        return;
      case State::kQuoteInQuotedField:
        if (c == '"') {
          field_ += '"';
          state_ = State::kInQuotedField;
        } else if (c == ',') {
          save_field();
          state_ = State::kStartField;
        } else if (newline || c == kEol) {
          save_field();
          state_ = c == kEol ? State::kStartRecord : State::kEatCrnl;
        } else {
          field_ += static_cast<char>(c);
          state_ = State::kInField;
        }
        return;
      case State::kEatCrnl:
        if (newline) return;
        if (c == kEol) {
          state_ = State::kStartRecord;
          return;
        }
        throw CsvError("new-line character seen in unquoted field - do you need to open the file with newline=''?");
    }
  }

  std::string_view content_;
  std::size_t pos_ = 0;
  std::size_t line_num_ = 0;
  State state_ = State::kStartRecord;
  std::vector<std::string> fields_;
  std::string field_;
};

Table read_csv(const std::string& shown, std::string_view content) {
  CsvReader reader(content);
  Table table;
  bool have_header = false;
  std::size_t last_line = 0;
  std::vector<std::string> row;
  try {
    while (reader.next(row)) {
      const std::size_t start_line = last_line + 1;
      last_line = reader.line_num();
      if (row.empty() || (row.size() == 1 && py_strip(row[0]).empty())) continue;  // blank line
      if (!have_header) {
        for (std::size_t i = 0; i < row.size(); ++i) {
          if (std::find(row.begin(), row.begin() + static_cast<std::ptrdiff_t>(i), row[i]) !=
              row.begin() + static_cast<std::ptrdiff_t>(i)) {
            throw DataError("data file " + shown + " has column " + py_repr(row[i], kNoCap) +
                            " twice in its header row");
          }
        }
        table.columns = row;
        have_header = true;
        continue;
      }
      const std::string where =
          "row " + std::to_string(table.records.size() + 1) + " (line " + std::to_string(start_line) + ")";
      if (row.size() != table.columns.size()) {
        throw DataError("data file " + shown + " " + where + " has " + std::to_string(row.size()) +
                        " fields but the header has " + std::to_string(table.columns.size()));
      }
      Record record{where, {}};
      record.values.reserve(row.size());
      for (std::size_t i = 0; i < row.size(); ++i) record.values.emplace_back(table.columns[i], std::move(row[i]));
      table.records.push_back(std::move(record));
    }
  } catch (const CsvError& err) {
    throw DataError("data file " + shown + " is not valid CSV near line " + std::to_string(reader.line_num()) + ": " +
                    err.what());
  }
  // Python asserts that a file that is not blank has a header row; one whose every row is blank (e.g. `""`)
  // has none, and no data rows either.
  return table;
}

// ------------------------------------------------------------------------------------------- JSON ----------

using Json = nlohmann::ordered_json;

// Deeper values are refused before the recursive conversion to a string could exhaust the stack.
constexpr int kMaxJsonDepth = 900;
// A longer reason is cut: the text nlohmann quotes ("last read") can be the rest of the file.
constexpr std::size_t kMaxReasonBytes = 200;

// A JSON document that cannot be read: the reason and the byte offset it concerns (npos when unknown).
struct JsonError {
  std::string reason;
  std::size_t offset;
};
struct TooDeep {};

// nlohmann's message as one line of valid UTF-8, without its id and its own position in bytes: the text it quotes
// may end inside a character or hold a line break it does not escape (it escapes only U+0000 to U+001F).
std::string json_reason(std::string_view what) {
  if (const std::size_t id_end = what.find("] "); id_end != std::string_view::npos) what.remove_prefix(id_end + 2);
  const std::size_t colon = what.find(": ");
  if (what.rfind("parse error", 0) == 0 && colon != std::string_view::npos) what.remove_prefix(colon + 2);
  std::string out;
  for (std::size_t i = 0; i < what.size();) {
    if (out.size() >= kMaxReasonBytes) return out + "...";
    const char32_t c = next_code_point(what, i);
    if (c == 0x85 || c == 0x2028 || c == 0x2029) {
      char buf[16];
      std::snprintf(buf, sizeof buf, "<U+%04X>", static_cast<unsigned>(c));
      out += buf;
    } else {
      append_utf8(out, c);
    }
  }
  return out;
}

// json.loads(text), but with nlohmann's acceptance (see the top of the file). Python refuses a BOM, which nlohmann
// would skip.
Json parse_json(std::string_view text) {
  if (text.substr(0, 3) == "\xEF\xBB\xBF") throw JsonError{"Unexpected UTF-8 BOM (decode using utf-8-sig)", 0};
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const Json::parse_error& err) {  // err.byte: 1-based index of the byte where it stopped
    throw JsonError{json_reason(err.what()), std::min<std::size_t>(err.byte > 0 ? err.byte - 1 : 0, text.size())};
  } catch (const Json::out_of_range& err) {  // a number beyond a double's range: nlohmann gives no position
    throw JsonError{json_reason(err.what()), std::string_view::npos};
  }
}

// Python's name of the type json.loads gives a value.
const char* type_name(const Json& value) {
  switch (value.type()) {
    case Json::value_t::null:
      return "NoneType";
    case Json::value_t::boolean:
      return "bool";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return "int";
    case Json::value_t::number_float:
      return "float";
    case Json::value_t::string:
      return "str";
    case Json::value_t::array:
      return "list";
    case Json::value_t::object:
      return "dict";
    default:
      return "object";
  }
}

// json.dumps(value, ensure_ascii=False, sort_keys=True): separators ", " and ": ", floats as Python's str().
// Strings, integers, booleans and null are nlohmann's spelling, which is Python's (the same escapes).
void dump_py(const Json& value, std::string& out, int depth) {
  if (depth > kMaxJsonDepth) throw TooDeep{};
  if (value.is_object()) {
    std::vector<const Json::object_t::value_type*> items;
    for (const auto& item : value.get_ref<const Json::object_t&>()) items.push_back(&item);
    // Byte order of UTF-8 is code point order, which is how Python sorts str keys.
    std::sort(items.begin(), items.end(), [](const auto* a, const auto* b) { return a->first < b->first; });
    out += '{';
    for (std::size_t i = 0; i < items.size(); ++i) {
      out += (i ? ", " : "") + Json(items[i]->first).dump() + ": ";
      dump_py(items[i]->second, out, depth + 1);
    }
    out += '}';
  } else if (value.is_array()) {
    out += '[';
    for (std::size_t i = 0; i < value.size(); ++i) {
      if (i) out += ", ";
      dump_py(value[i], out, depth + 1);
    }
    out += ']';
  } else if (value.is_number_float()) {
    out += py_float_str(value.get<double>());
  } else {
    out += value.dump();
  }
}

// loaders.py `_to_str`: strings as they are, None as "", JSON spellings of booleans, str() of numbers, nested
// values as JSON.
std::string to_str(Json& value) {
  if (value.is_string()) return std::move(value.get_ref<std::string&>());
  if (value.is_null()) return "";
  if (value.is_number_float()) return py_float_str(value.get<double>());
  std::string out;
  dump_py(value, out, 1);
  return out;
}

Record to_record(const std::string& shown, std::string where, Json& obj) {
  Record record{std::move(where), {}};
  auto& items = obj.get_ref<Json::object_t&>();
  record.values.reserve(items.size());
  try {
    for (auto& [key, value] : items) record.values.emplace_back(key, to_str(value));
  } catch (const TooDeep&) {
    throw DataError("data file " + shown + " " + record.where + " holds a value nested more than " +
                    std::to_string(kMaxJsonDepth) + " levels deep");
  }
  return record;
}

// loaders.py `_collect_columns`: every key, in order of first appearance.
std::vector<std::string> collect_columns(const std::vector<Record>& records) {
  std::vector<std::string> columns;
  std::unordered_map<std::string, bool> seen;
  for (const Record& record : records) {
    for (const auto& kv : record.values) {
      if (seen.emplace(kv.first, true).second) columns.push_back(kv.first);
    }
  }
  return columns;
}

Table read_jsonl(const std::string& shown, std::string_view content) {
  Table table;
  std::size_t number = 0;
  std::size_t start = 0;
  while (start <= content.size()) {
    std::size_t end = content.find('\n', start);
    if (end == std::string_view::npos) end = content.size();
    const std::string_view line = content.substr(start, end - start);
    start = end + 1;
    ++number;
    if (py_strip(line).empty()) continue;
    const std::string where = "line " + std::to_string(number);
    Json obj;
    try {
      obj = parse_json(line);
    } catch (const JsonError& err) {
      std::string column;  // Python's colno, in characters
      if (err.offset != std::string_view::npos) {
        column = " (column " + std::to_string(count_code_points(line.substr(0, err.offset)) + 1) + ")";
      }
      throw DataError("data file " + shown + " " + where + " is not valid JSON: " + err.reason + column);
    }
    if (!obj.is_object()) {
      throw DataError("data file " + shown + " " + where + " is a JSON " + type_name(obj) + ", expected an object");
    }
    table.records.push_back(to_record(shown, where, obj));
  }
  table.columns = collect_columns(table.records);
  return table;
}

Table read_json(const std::string& shown, std::string_view content) {
  Json data;
  try {
    data = parse_json(content);
  } catch (const JsonError& err) {
    std::string position;
    if (err.offset != std::string_view::npos) {  // Python's lineno and colno, in characters
      const std::string_view before = content.substr(0, err.offset);
      const std::size_t newline = before.rfind('\n');
      const std::size_t line_start = newline == std::string_view::npos ? 0 : newline + 1;
      position = " (line " + std::to_string(std::count(before.begin(), before.end(), '\n') + 1) + ", column " +
                 std::to_string(count_code_points(before.substr(line_start)) + 1) + ")";
    }
    throw DataError("data file " + shown + " is not valid JSON: " + err.reason + position);
  }
  if (!data.is_array()) {
    throw DataError("data file " + shown + " holds a JSON " + type_name(data) + ", expected a list of objects");
  }
  Table table;
  table.records.reserve(data.size());
  for (std::size_t i = 0; i < data.size(); ++i) {
    const std::string where = "element [" + std::to_string(i) + "]";
    if (!data[i].is_object()) {
      throw DataError("data file " + shown + " " + where + " is a JSON " + type_name(data[i]) + ", expected an object");
    }
    table.records.push_back(to_record(shown, where, data[i]));
  }
  table.columns = collect_columns(table.records);
  return table;
}

// ------------------------------------------------------------------------------------ the table ----------

std::string join(const std::vector<std::string>& items, const std::string& sep) {
  std::string out;
  for (std::size_t i = 0; i < items.size(); ++i) out += (i ? sep : "") + items[i];
  return out;
}

std::string pick_column(const std::string& shown, const std::vector<std::string>& columns, const std::string& wanted,
                        const std::vector<std::string>& candidates, const char* role, bool is_csv) {
  const std::string available = columns.empty() ? "none" : join(columns, ", ");
  const auto has = [&](const std::string& name) {
    return std::find(columns.begin(), columns.end(), name) != columns.end();
  };
  if (!wanted.empty()) {
    if (!has(wanted)) {
      throw DataError("data file " + shown + " has no column " + py_repr(wanted, kNoCap) + " (columns: " + available +
                      ")");
    }
    return wanted;
  }
  for (const std::string& name : candidates) {
    if (has(name)) return name;
  }
  throw DataError("data file " + shown + " has no " + role + " column (looked for " + join(candidates, ", ") +
                  "; columns: " + available + ")" + (is_csv ? "; is the header row missing?" : ""));
}

}  // namespace

// --------------------------------------------------------------------------------------- public ----------

TextTable load_table(const std::string& path, const std::string& text_column, const std::string& label_column) {
  static const std::vector<std::string> kTextColumns = {"text", "sentence", "content", "instruction"};
  static const std::vector<std::string> kLabelColumns = {"label", "category", "label_name", "intent", "class"};
  const PyPath p = parse_path(path);
  const std::string shown = py_repr(path, kNoCap);
  const std::string ext = ascii_lower(p.suffix);
  if (ext != ".csv" && ext != ".jsonl" && ext != ".json") {
    throw DataError("data file " + shown + " has unsupported extension " +
                    py_repr(p.suffix.empty() ? "(none)" : p.suffix, kNoCap) + " (supported: .csv, .jsonl, .json)");
  }
  const std::string content = read_file_text(p.fs, shown);
  Table table = ext == ".csv"     ? read_csv(shown, content)
                : ext == ".jsonl" ? read_jsonl(shown, content)
                                  : read_json(shown, content);
  if (table.records.empty()) throw DataError("data file " + shown + " has no data rows");

  const std::string text_col = pick_column(shown, table.columns, text_column, kTextColumns, "text", ext == ".csv");
  const std::string label_col = pick_column(shown, table.columns, label_column, kLabelColumns, "label", ext == ".csv");
  if (text_col == label_col) {
    throw DataError("data file " + shown + ": column " + py_repr(text_col, kNoCap) +
                    " cannot be both the text and the label");
  }
  TextTable out;
  out.texts.reserve(table.records.size());
  out.labels.reserve(table.records.size());
  for (Record& record : table.records) {
    std::string* text = record.find(text_col);  // a JSON record without the key reads as None: ""
    std::string text_value = text ? std::move(*text) : std::string();
    if (py_strip(text_value).empty()) {
      throw DataError("data file " + shown + " " + record.where + " has an empty text in column " +
                      py_repr(text_col, kNoCap));
    }
    const std::string* label = record.find(label_col);
    const std::string_view stripped = label ? py_strip(*label) : std::string_view();
    if (stripped.empty()) {
      throw DataError("data file " + shown + " " + record.where + " has an empty label in column " +
                      py_repr(label_col, kNoCap));
    }
    out.labels.emplace_back(stripped);
    out.texts.push_back(std::move(text_value));
  }
  return out;
}

std::pair<std::vector<std::size_t>, std::vector<std::size_t>> split_train_test(const std::vector<std::string>& labels,
                                                                               double test_fraction,
                                                                               std::uint64_t seed) {
  if (!(test_fraction >= 0 && test_fraction < 1) || !std::isfinite(test_fraction)) {
    throw ConfigError("test fraction must be in [0, 1), got " + py_float_str(test_fraction));
  }
  const std::size_t n = labels.size();
  std::vector<std::size_t> train, test;
  if (n < 2 || test_fraction == 0) {
    train.resize(n);
    std::iota(train.begin(), train.end(), std::size_t{0});
    return {train, test};
  }
  const auto n_test = static_cast<std::size_t>(
      std::min(static_cast<double>(n - 1), std::max(1.0, py_round(static_cast<double>(n) * test_fraction))));
  SplitMix64 rng(seed);
  // Labels in sorted order (byte order of UTF-8 is Python's code point order), members in row order.
  std::vector<std::string> names(labels);
  std::sort(names.begin(), names.end());
  names.erase(std::unique(names.begin(), names.end()), names.end());
  std::vector<std::vector<std::size_t>> members(names.size());
  for (std::size_t i = 0; i < n; ++i) {
    const auto pos = std::lower_bound(names.begin(), names.end(), labels[i]) - names.begin();
    members[static_cast<std::size_t>(pos)].push_back(i);
  }
  // A random order of the labels breaks the ties of the largest-remainder quota (partition.py _largest_remainder,
  // in float64 as numpy computes it).
  const std::vector<std::size_t> order = rng.permutation(names.size());
  double total = 0;
  for (const auto& m : members) total += static_cast<double>(m.size());
  std::vector<std::size_t> quota(order.size());
  std::vector<double> remainder(order.size());
  std::size_t assigned = 0;
  for (std::size_t k = 0; k < order.size(); ++k) {
    const double exact = static_cast<double>(members[order[k]].size()) / total * static_cast<double>(n_test);
    const double whole = std::floor(exact);
    quota[k] = static_cast<std::size_t>(whole);
    remainder[k] = exact - whole;
    assigned += quota[k];
  }
  if (assigned < n_test) {
    std::vector<std::size_t> by_remainder(order.size());
    std::iota(by_remainder.begin(), by_remainder.end(), std::size_t{0});
    std::stable_sort(by_remainder.begin(), by_remainder.end(),
                     [&](std::size_t a, std::size_t b) { return remainder[a] > remainder[b]; });
    for (std::size_t k = 0; k < n_test - assigned; ++k) ++quota[by_remainder[k]];
  }
  // One shuffle per label, in the random label order: its first `quota` members are held out.
  for (std::size_t k = 0; k < order.size(); ++k) {
    std::vector<std::size_t>& group = members[order[k]];
    rng.shuffle(group);
    test.insert(test.end(), group.begin(), group.begin() + static_cast<std::ptrdiff_t>(quota[k]));
    train.insert(train.end(), group.begin() + static_cast<std::ptrdiff_t>(quota[k]), group.end());
  }
  std::sort(train.begin(), train.end());
  std::sort(test.begin(), test.end());
  return {train, test};
}

std::pair<std::vector<std::size_t>, std::vector<std::size_t>> split_validation(
    const std::vector<std::string>& train_labels, double val_fraction, std::uint64_t seed) {
  if (val_fraction > 0 && train_labels.size() >= kMinValidationRows) {
    return split_train_test(train_labels, val_fraction, seed + 1);  // seed + 1 mod 2^64, as Python's SplitMix64
  }
  std::vector<std::size_t> train(train_labels.size());
  std::iota(train.begin(), train.end(), std::size_t{0});
  return {train, {}};
}

RowSplit split_rows(const std::vector<std::string>& labels, bool separate_test, double test_fraction,
                    double val_fraction, std::uint64_t seed) {
  RowSplit rows;
  std::vector<std::size_t> train(labels.size());
  std::iota(train.begin(), train.end(), std::size_t{0});
  if (!separate_test) std::tie(train, rows.test) = split_train_test(labels, test_fraction, seed);
  std::vector<std::string> train_labels;
  for (std::size_t i : train) train_labels.push_back(labels[i]);
  const auto [kept, held] = split_validation(train_labels, val_fraction, seed);
  for (std::size_t k : kept) rows.train.push_back(train[k]);
  for (std::size_t k : held) rows.val.push_back(train[k]);
  return rows;
}

std::uint32_t crc32(std::string_view data) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  std::size_t offset = 0;
  while (offset < data.size()) {  // zlib takes uInt lengths
    const auto chunk = static_cast<uInt>(std::min<std::size_t>(data.size() - offset, 1u << 30));
    crc = ::crc32(crc, reinterpret_cast<const Bytef*>(data.data() + offset), chunk);
    offset += chunk;
  }
  return static_cast<std::uint32_t>(crc);
}

std::uint64_t batch_seed(std::int64_t task_seed, const std::string& client_id, std::int64_t round) {
  // Two's complement and wrap-around are arithmetic mod 2^64, and 2^63 divides 2^64: the low 63 bits are
  // Python's non-negative result of the exact integer expression mod 2^63.
  const std::uint64_t x = static_cast<std::uint64_t>(task_seed) * 1000003ULL +
                          static_cast<std::uint64_t>(round) * 7919ULL + crc32(client_id);
  return x & ((1ULL << 63) - 1);
}

BatchOrder::BatchOrder(std::size_t num_train, std::size_t batch_size, std::uint64_t seed)
    : batch_size_(batch_size), rng_(seed), order_(num_train), pos_(num_train) {
  if (num_train == 0 || batch_size == 0) {
    throw std::invalid_argument("BatchOrder needs training rows and a positive batch size");
  }
}

std::vector<std::size_t> BatchOrder::next() {
  if (pos_ >= order_.size()) {
    order_ = rng_.permutation(order_.size());
    pos_ = 0;
    ++epochs_;
  }
  const std::size_t end = std::min(order_.size(), pos_ + batch_size_);
  std::vector<std::size_t> batch(order_.begin() + static_cast<std::ptrdiff_t>(pos_),
                                 order_.begin() + static_cast<std::ptrdiff_t>(end));
  pos_ = end;
  return batch;
}

std::vector<std::size_t> aux_indices(std::size_t num_train, double fraction, std::size_t max_examples) {
  const double wanted = py_round(fraction * static_cast<double>(num_train));
  const double n = std::max(1.0, std::min({static_cast<double>(max_examples), wanted, static_cast<double>(num_train)}));
  std::vector<std::size_t> order = SplitMix64(num_train).permutation(num_train);
  order.resize(std::min(order.size(), static_cast<std::size_t>(n)));
  return order;
}

}  // namespace edgemole
