// edgemole-tokenize-tool: the native tokenizer on JSON Lines, so that the Python tests can compare its ids with
// Hugging Face's on whole datasets.
//   edgemole-tokenize-tool --tokenizer PATH --max-length N  < {"text": ...} lines  > one JSON array of ids a line
// N = 0: neither truncated nor padded. Exit 2 with `error: <line>` on a bad tokenizer file or flag, 1 on bad input.
#include <cstdio>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>

#include "errors.h"
#include "tokenizer.h"

namespace {

int usage(const std::string& what) {
  std::cerr << "error: " << what << " (usage: edgemole-tokenize-tool --tokenizer PATH --max-length N)\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  std::string path;
  long long max_length = -1;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (i + 1 >= argc) return usage("missing value after " + arg);
    if (arg == "--tokenizer") {
      path = argv[++i];
    } else if (arg == "--max-length") {
      try {
        std::size_t used = 0;
        max_length = std::stoll(argv[++i], &used);
        if (argv[i][used] != '\0') max_length = -1;
      } catch (const std::exception&) {
        max_length = -1;
      }
      if (max_length < 0) return usage("--max-length must be a non-negative integer");
    } else {
      return usage("unknown argument " + arg);
    }
  }
  if (path.empty() || max_length < 0) return usage("--tokenizer and --max-length are required");

  std::ios::sync_with_stdio(false);
  try {
    const auto tokenizer = edgemole::Tokenizer::from_file(path);
    const auto limit = static_cast<std::size_t>(max_length);
    if (limit > 0 && limit < tokenizer.num_special_tokens()) {
      return usage("--max-length " + std::to_string(limit) + " cannot hold the special tokens");
    }
    std::string line, out;
    std::size_t number = 0;
    while (std::getline(std::cin, line)) {
      ++number;
      nlohmann::json record;
      try {
        record = nlohmann::json::parse(line);
      } catch (const nlohmann::json::exception& e) {
        std::cerr << "error: line " << number << " is not JSON: " << edgemole::first_line(e.what()) << "\n";
        return 1;
      }
      if (!record.is_object() || !record.contains("text") || !record["text"].is_string()) {
        std::cerr << "error: line " << number << " has no string \"text\"\n";
        return 1;
      }
      const auto& text = record["text"].get_ref<const std::string&>();
      const auto ids = limit == 0 ? tokenizer.encode_unpadded(text) : tokenizer.encode(text, limit).input_ids;
      out.clear();
      out.push_back('[');
      for (std::size_t k = 0; k < ids.size(); ++k) {
        if (k > 0) out.push_back(',');
        out += std::to_string(ids[k]);
      }
      out += "]\n";
      std::fwrite(out.data(), 1, out.size(), stdout);
    }
  } catch (const edgemole::ArtifactError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const edgemole::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return std::fflush(stdout) == 0 ? 0 : 1;
}
