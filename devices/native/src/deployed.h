// The model a device serves between rounds: its weights after the last round it handled (the trained adapters of a
// training round, the final aggregated ones of the closing evaluation round), kept in `state_dir` so that
// `edgemole-device predict` answers with them while the service waits for the next round, or after it exits.
#pragma once

#include <chrono>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "config.h"
#include "engine.h"
#include "manifest.h"
#include "tokenizer.h"

namespace edgemole {

inline constexpr const char* kDeployedFile = "deployed.safetensors";

// Write the deployed model atomically (temporary file, fsync, rename): the task as received, the assignment body
// (its expert map), round, run and the trainable tensors under their wire names.
void save_deployed(const std::string& state_dir, const nlohmann::json& task, const nlohmann::json& body,
                   std::int64_t round, const std::string& run, const TensorMap& state);

class DeployedModel {
 public:
  // Loads the artifact and the deployed model of `config.state_dir`; ArtifactError / ConfigError with one line.
  explicit DeployedModel(const DeviceConfig& config);
  // {"label": ..., "probability": p, "probabilities": {label: p, ...}, "round": R, "latency_ms": t}
  nlohmann::json predict(const std::string& text);

 private:
  TaskSpec task_;
  std::int64_t round_ = 0;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Engine> engine_;
};

}  // namespace edgemole
