// edgemole-data-tool: prints what the native client's data code makes of its arguments as one JSON object, so that
// tests/test_native_data.py can compare it with the Python client (edgemole/rng.py, load_table, split_train_test,
// LocalData) on the same files and seeds. A DataError or ConfigError prints `error: <what>` and exits with 1.
//
//   rng SEED COUNT                    {"u64": [...]}           the first COUNT outputs of SplitMix64(SEED)
//   uniform SEED COUNT                {"uniform": [...]}
//   below SEED N COUNT                {"below": [...]}
//   permutation SEED N                {"permutation": [...]}
//   table FILE [--text-column C] [--label-column L]                {"texts": [...], "labels": [...]}
//   split FILE --seed S --test-fraction F [--val-fraction V] [--separate-test 1] [--text-column C] [--label-column L]
//                                     {"train": [texts], "test": [texts], "val": [texts], "train_labels": [...],
//                                      "test_labels": [...], "val_labels": [...], "train_indices": [...],
//                                      "test_indices": [...], "val_indices": [...]}
//                                     the rows of the client's data loading (split_rows: the test split, none with
//                                     --separate-test 1, then the validation split; V defaults to 0)
//   batches N --batch-size B --seed S --count K                    {"batches": [[rows], ...]}
//   aux N --fraction F --max M        {"aux": [rows]}
//   seeds CLIENT_ID --task-seed T --round R                        {"crc32": .., "batch_seed": .., "dp_seed": ..}
//
// SEED values are decimal integers; negative ones are taken mod 2^64 as Python does.

#include <charconv>
#include <cstdint>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "data.h"
#include "errors.h"
#include "rng.h"

namespace {

using json = nlohmann::json;

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Positional arguments and --name value options.
struct Args {
  std::vector<std::string> positional;
  std::map<std::string, std::string> options;

  Args(int argc, char** argv) {
    for (int i = 2; i < argc; ++i) {
      const std::string arg = argv[i];
      if (arg.rfind("--", 0) == 0) {
        if (i + 1 >= argc) throw UsageError("option " + arg + " needs a value");
        options[arg.substr(2)] = argv[++i];
      } else {
        positional.push_back(arg);
      }
    }
  }
  const std::string& at(std::size_t i) const {
    if (i >= positional.size()) throw UsageError("missing argument " + std::to_string(i + 1));
    return positional[i];
  }
  std::string option(const std::string& name, const std::string& fallback = "") const {
    const auto it = options.find(name);
    return it == options.end() ? fallback : it->second;
  }
  const std::string& required(const std::string& name) const {
    const auto it = options.find(name);
    if (it == options.end()) throw UsageError("missing option --" + name);
    return it->second;
  }
};

std::int64_t to_i64(const std::string& text) {
  std::int64_t value = 0;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || ptr != text.data() + text.size()) throw UsageError("not an integer: " + text);
  return value;
}

// A seed: any decimal integer in [-2^63, 2^64), reduced mod 2^64.
std::uint64_t to_seed(const std::string& text) {
  if (!text.empty() && text[0] == '-') return static_cast<std::uint64_t>(to_i64(text));
  std::uint64_t value = 0;
  const auto [ptr, ec] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (ec != std::errc() || ptr != text.data() + text.size()) throw UsageError("not a seed: " + text);
  return value;
}

std::size_t to_size(const std::string& text) {
  const std::int64_t value = to_i64(text);
  if (value < 0) throw UsageError("not a count: " + text);
  return static_cast<std::size_t>(value);
}

double to_double(const std::string& text) {
  std::size_t used = 0;
  const double value = std::stod(text, &used);
  if (used != text.size()) throw UsageError("not a number: " + text);
  return value;
}

json run(const std::string& command, const Args& args) {
  if (command == "rng" || command == "uniform") {
    edgemole::SplitMix64 rng(to_seed(args.at(0)));
    json values = json::array();
    for (std::size_t i = to_size(args.at(1)); i > 0; --i) {
      if (command == "rng") {
        values.push_back(rng.next_u64());
      } else {
        values.push_back(rng.uniform());
      }
    }
    return {{command == "rng" ? "u64" : "uniform", values}};
  }
  if (command == "below") {
    edgemole::SplitMix64 rng(to_seed(args.at(0)));
    const std::uint64_t n = to_seed(args.at(1));
    json values = json::array();
    for (std::size_t i = to_size(args.at(2)); i > 0; --i) values.push_back(rng.below(n));
    return {{"below", values}};
  }
  if (command == "permutation") {
    return {{"permutation", edgemole::SplitMix64(to_seed(args.at(0))).permutation(to_size(args.at(1)))}};
  }
  if (command == "table") {
    const auto table = edgemole::load_table(args.at(0), args.option("text-column"), args.option("label-column"));
    return {{"texts", table.texts}, {"labels", table.labels}};
  }
  if (command == "split") {
    const auto table = edgemole::load_table(args.at(0), args.option("text-column"), args.option("label-column"));
    const edgemole::RowSplit split = edgemole::split_rows(
        table.labels, args.option("separate-test", "0") == "1", to_double(args.required("test-fraction")),
        to_double(args.option("val-fraction", "0")), to_seed(args.required("seed")));
    json out = {{"train_indices", split.train}, {"test_indices", split.test}, {"val_indices", split.val}};
    for (const auto& [name, rows] :
         {std::pair{"train", &split.train}, std::pair{"test", &split.test}, std::pair{"val", &split.val}}) {
      json texts = json::array(), labels = json::array();
      for (const std::size_t i : *rows) {
        texts.push_back(table.texts[i]);
        labels.push_back(table.labels[i]);
      }
      out[name] = texts;
      out[std::string(name) + "_labels"] = labels;
    }
    return out;
  }
  if (command == "batches") {
    edgemole::BatchOrder order(to_size(args.at(0)), to_size(args.required("batch-size")),
                               to_seed(args.required("seed")));
    json batches = json::array();
    for (std::size_t i = to_size(args.required("count")); i > 0; --i) batches.push_back(order.next());
    return {{"batches", batches}};
  }
  if (command == "aux") {
    return {{"aux", edgemole::aux_indices(to_size(args.at(0)), to_double(args.required("fraction")),
                                          to_size(args.required("max")))}};
  }
  if (command == "seeds") {
    const std::uint64_t seed =
        edgemole::batch_seed(to_i64(args.required("task-seed")), args.at(0), to_i64(args.required("round")));
    return {{"crc32", edgemole::crc32(args.at(0))}, {"batch_seed", seed}, {"dp_seed", seed + 1}};
  }
  throw UsageError("unknown command " + command);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: edgemole-data-tool rng|uniform|below|permutation|table|split|batches|aux|seeds ...\n";
    return 2;
  }
  try {
    const json out = run(argv[1], Args(argc, argv));
    std::cout << out.dump(-1, ' ', false, json::error_handler_t::replace) << "\n";
    return 0;
  } catch (const edgemole::Error& err) {
    std::cerr << "error: " << err.what() << "\n";
    return 1;
  } catch (const std::exception& err) {  // UsageError, std::invalid_argument from stod and the like
    std::cerr << "usage error: " << err.what() << "\n";
    return 2;
  }
}
