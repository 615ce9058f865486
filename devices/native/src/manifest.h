// The artifact folder written by `edgemole export` (docs/artifact.md): its manifest, file checks and task fit.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "config.h"

namespace edgemole {

inline constexpr int kArtifactFormatVersion = 1;
inline constexpr const char* kParamPrefix = "model.";  // program tensor name = prefix + model parameter name

struct ProgramShape {
  std::int64_t batch_size = 0, max_length = 0, slots = 0;
  std::vector<std::string> amole_modules;
};

struct TensorEntry {
  std::string name;   // in the program
  std::string param;  // the model parameter (wire names derive from it)
  std::vector<std::int64_t> shape;
  std::string role;  // lora_A, lora_B, head, router
};

struct FileEntry {
  std::string file, sha256;
  std::uint64_t bytes = 0;
};

struct Manifest {
  std::string directory;
  // The first 16 hex digits of manifest.json's sha256: which artifact the device trains with (its status's
  // `artifact`, docs/protocol.md 4.2).
  std::string digest;
  std::string model, task, adapter;
  std::int64_t num_labels = 0;
  nlohmann::json config;  // the adapter settings the graph bakes in
  ProgramShape shape;
  FileEntry program, data;
  std::vector<TensorEntry> tensors;
  // The inference method (logits from the tokens and the trainable tensors, no backward pass) and the program names
  // of the tensors it takes, in order; empty for artifacts exported before it existed.
  std::string predict_method;
  std::vector<std::string> predict_inputs;
  bool xnnpack = true;

  std::vector<std::string> methods() const;
  std::string path(const std::string& file) const { return directory + "/" + file; }
};

// Parse and check manifest.json of an artifact folder (format, version, fields); ArtifactError with one line.
Manifest read_manifest(const std::string& directory);
// program.pte and base.ptd exist and have the manifest's size and sha256.
void verify_files(const Manifest& manifest);
// The task can run on this program (same model, labels, baked adapter settings, method, shapes, no dropout).
void check_task_fits(const Manifest& manifest, const TaskSpec& task);
// What edgemole/artifact.py program_config gives for a task: compared with the manifest's `config`.
nlohmann::json program_config(const TaskSpec& task);

}  // namespace edgemole
