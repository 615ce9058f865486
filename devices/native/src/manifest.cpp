#include "manifest.h"

#include <sys/stat.h>

#include <algorithm>
#include <fstream>
#include <sstream>

#include "errors.h"
#include "sha256.h"

namespace edgemole {

using nlohmann::json;

std::vector<std::string> Manifest::methods() const {
  if (adapter == "amole") return {"fedamole", "fedamole-a2"};
  return {"fedit", "ffa-lora", "flexlora", "lora-a2"};
}

namespace {

bool is_file(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

FileEntry file_entry(const json& j) {
  return FileEntry{j.at("file").get<std::string>(), j.at("sha256").get<std::string>(),
                   j.at("bytes").get<std::uint64_t>()};
}

}  // namespace

Manifest read_manifest(const std::string& directory) {
  const std::string path = directory + "/manifest.json";
  if (!is_file(path)) {
    throw ArtifactError(directory + ": no manifest.json (not an artifact folder written by 'edgemole export')");
  }
  std::ifstream in(path, std::ios::binary);
  std::stringstream text;
  text << in.rdbuf();
  json raw;
  try {
    raw = json::parse(text.str());
  } catch (const json::parse_error& exc) {
    throw ArtifactError(path + ": not valid JSON (" + first_line(exc.what()) + ")");
  }
  if (!raw.is_object() || raw.value("format", json()) != "edgemole-artifact") {
    throw ArtifactError(path + ": not an edgemole artifact manifest (format 'edgemole-artifact' expected)");
  }
  if (raw.value("format_version", json()) != kArtifactFormatVersion) {
    throw ArtifactError(path + ": format version " + raw.value("format_version", json()).dump() +
                        ", this client reads " + std::to_string(kArtifactFormatVersion) +
                        "; export the artifact again with a matching edgemole");
  }
  Manifest m;
  m.directory = directory;
  m.digest = digest_file(path).sha256_hex.substr(0, 16);
  try {
    m.model = raw.at("model").get<std::string>();
    m.task = raw.at("task").get<std::string>();
    m.adapter = raw.at("adapter").get<std::string>();
    m.num_labels = raw.at("num_labels").get<std::int64_t>();
    m.config = raw.at("config");
    const json& shape = raw.at("shape");
    m.shape.batch_size = shape.at("batch_size").get<std::int64_t>();
    m.shape.max_length = shape.at("max_length").get<std::int64_t>();
    m.shape.slots = shape.at("slots").get<std::int64_t>();
    m.shape.amole_modules = shape.at("amole_modules").get<std::vector<std::string>>();
    m.program = file_entry(raw.at("program"));
    m.data = file_entry(raw.at("data"));
    for (const json& t : raw.at("tensors")) {
      m.tensors.push_back(TensorEntry{t.at("name").get<std::string>(), t.at("param").get<std::string>(),
                                      t.at("shape").get<std::vector<std::int64_t>>(), t.at("role").get<std::string>()});
    }
    m.xnnpack = raw.value("xnnpack", true);
    m.predict_method = raw.value("predict_method", std::string());
    m.predict_inputs = raw.value("predict_inputs", std::vector<std::string>());
  } catch (const json::exception& exc) {
    throw ArtifactError(path + ": missing or malformed field (" + first_line(exc.what()) + ")");
  }
  std::vector<std::string> names, inputs = m.predict_inputs;
  for (const TensorEntry& t : m.tensors) names.push_back(t.name);
  std::sort(names.begin(), names.end());
  std::sort(inputs.begin(), inputs.end());
  if (!m.predict_method.empty() && inputs != names) {
    throw ArtifactError(path + ": the predict method's inputs differ from the trainable tensors");
  }
  if (m.shape.batch_size < 1 || m.shape.max_length < 1 || m.tensors.empty() ||
      (m.adapter == "amole") != !m.shape.amole_modules.empty()) {
    throw ArtifactError(path + ": inconsistent shape or tensors");
  }
  return m;
}

void verify_files(const Manifest& manifest) {
  for (const FileEntry* entry : {&manifest.program, &manifest.data}) {
    const std::string path = manifest.path(entry->file);
    if (!is_file(path)) throw ArtifactError(path + ": missing");
    const FileDigest got = digest_file(path);
    if (got.bytes != entry->bytes || got.sha256_hex != entry->sha256) {
      throw ArtifactError(path + ": " + std::to_string(got.bytes) + " bytes with sha256 " +
                          got.sha256_hex.substr(0, 12) + "..., the manifest says " + std::to_string(entry->bytes) +
                          " bytes, " + entry->sha256.substr(0, 12) + "... (corrupt, truncated or from another export)");
    }
  }
}

json program_config(const TaskSpec& task) {
  json out = {{"r", task.lora.r},
              {"alpha", task.lora.alpha},
              {"target_modules", task.lora.target_modules},
              {"train_head", task.lora.train_head}};
  if (task.uses_experts()) {
    out["slots"] = task.amole.slots;
    out["top_k"] = task.amole.top_k;
    out["load_balance_weight"] = task.amole.load_balance_weight;
  }
  return out;
}

namespace {

// JSON equality where 16 and 16.0 are the same number (Python's == on the manifest's config).
bool same_value(const json& a, const json& b) {
  if (a.is_number() && b.is_number()) return a.get<double>() == b.get<double>();
  if (a.type() != b.type()) return false;
  if (a.is_object()) {
    if (a.size() != b.size()) return false;
    for (const auto& item : a.items()) {
      if (!b.contains(item.key()) || !same_value(item.value(), b.at(item.key()))) return false;
    }
    return true;
  }
  if (a.is_array()) {
    if (a.size() != b.size()) return false;
    for (std::size_t i = 0; i < a.size(); ++i) {
      if (!same_value(a[i], b[i])) return false;
    }
    return true;
  }
  return a == b;
}

}  // namespace

void check_task_fits(const Manifest& m, const TaskSpec& task) {
  if (m.task != "classify") {
    throw ArtifactError("the artifact is a " + m.task + " program; the fleet's task is classification");
  }
  std::vector<std::string> problems;
  if (m.model != task.model.name)
    problems.push_back("model '" + m.model + "', the task's is '" + task.model.name + "'");
  if (m.num_labels != static_cast<std::int64_t>(task.labels.size())) {
    problems.push_back(std::to_string(m.num_labels) + " labels, the task has " + std::to_string(task.labels.size()));
  }
  const auto methods = m.methods();
  bool serves = false;
  std::string list;
  for (const auto& method : methods) {
    serves = serves || method == task.method;
    list += (list.empty() ? "" : ", ") + method;
  }
  if (!serves) {
    problems.push_back("a " + m.adapter + " program, which serves " + list + ", not '" + task.method + "'");
  } else if (!same_value(m.config, program_config(task))) {
    problems.push_back("adapter settings " + m.config.dump() + ", the task's are " + program_config(task).dump());
  }
  if (task.train.dropout) {
    problems.push_back(
        "no dropout, the task trains with dropout (run the fleet with --no-dropout, "
        "train.dropout = false)");
  }
  if (task.train.batch_size > m.shape.batch_size) {
    problems.push_back("training batches of at most " + std::to_string(m.shape.batch_size) + ", the task's are " +
                       std::to_string(task.train.batch_size) + " (export with --batch-size)");
  }
  if (task.model.max_length > m.shape.max_length) {
    problems.push_back("sequences of at most " + std::to_string(m.shape.max_length) + " tokens, the task's are " +
                       std::to_string(task.model.max_length));
  }
  if (!problems.empty()) {
    std::string text = "the artifact does not fit the task: it has ";
    for (std::size_t i = 0; i < problems.size(); ++i) text += (i ? "; " : "") + problems[i];
    throw ArtifactError(text);
  }
}

}  // namespace edgemole
