// The fleet's task as the aggregator publishes it (edgemole/config.py TaskSpec) and the device's own settings.
//
// The task is parsed as strictly as the Python client parses it: unknown keys, wrong types and out-of-range values
// are a one-line ConfigError naming the key, so a native device accepts exactly the tasks a Python device accepts.
#pragma once

#include <cstdint>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace edgemole {

struct ModelSpec {
  std::string name = "all-MiniLM-L6-v2";
  std::int64_t max_length = 32;
};

struct LoraSpec {
  std::int64_t r = 8;
  double alpha = 16.0;
  double dropout = 0.05;
  std::vector<std::string> target_modules{"query", "value"};
  bool train_head = true;
};

struct TrainSpec {
  std::int64_t local_steps = 10;
  std::int64_t batch_size = 16;
  double lr = 2e-3;
  double weight_decay = 0.0;
  std::int64_t eval_batch_size = 64;
  bool dropout = true;
  std::string optimizer = "adamw";
};

struct AmoleSpec {
  std::int64_t experts = 8, slots = 4, holders = 2, reassign_every = 1, top_k = 2;
  double keep_bonus = 0.0;  // aggregator only: accepted and checked, not used on the device
  double load_balance_weight = 0.001;
  bool sample_weighted = false;
  double dp_eta = 0.0;
  double aux_fraction = 0.05;
  std::int64_t aux_max = 200;
};

struct A2Spec {
  std::int64_t upload_rank = 0;
  double b_lr_multiplier = 5.0;
  std::int64_t probe_steps = 0;
  // The aggregator's choices (round 1 trains both factors; routers travel in B rounds too): a device trains the
  // phase and roles each assignment names, so these only have to parse.
  bool warm_start = false;
  bool router_every_round = false;
};

struct TaskSpec {
  std::vector<std::string> labels;
  std::string method = "fedit";
  std::int64_t seed = 0;
  ModelSpec model;
  LoraSpec lora;
  TrainSpec train;
  AmoleSpec amole;
  A2Spec a2;

  bool uses_experts() const { return method == "fedamole" || method == "fedamole-a2"; }
  bool alternating() const { return method == "lora-a2" || method == "fedamole-a2"; }
  bool operator==(const TaskSpec& other) const;
};

// Parse the `task` object of a task message; ConfigError with the offending key on any fault.
TaskSpec parse_task(const nlohmann::json& value);

// The methods the aggregator runs (edgemole/config.py).
extern const std::vector<std::string> kMethods;

// What `edgemole-device --config FILE` reads (JSON), with command-line overrides on top.
struct DeviceConfig {
  std::string broker;  // mqtt://host:port
  std::string client_id;
  std::string fleet = "default";
  std::string topic_prefix = "edgemole";
  std::string artifact;   // folder written by `edgemole export`
  std::string data;       // CSV / JSONL / JSON with text and label columns
  std::string test_data;  // optional: a separate local test file
  double test_fraction = 0.2;
  double val_fraction = 0.1;  // of the training rows, held out to choose the deployed model (10.3a)
  std::string text_column, label_column;
  std::int64_t upload_rank = 0;  // r_c; 0: the task's a2.upload_rank, else the LoRA rank
  std::int64_t threads = 1;      // ExecuTorch runtime threads (1: no worker threads; what qemu needs)
  std::int64_t max_message_bytes = 16 * 1024 * 1024;
  double connect_timeout_s = 30.0;
  bool keep_serving = false;  // join the next run after one ends (a device service)
  bool eval_after_training = true;
  std::string log_level = "info";
  std::string state_dir;  // where the deployed model is kept between rounds ("": not kept)
  // The device's identity at the broker (credentials.h): PEM files for TLS, a user name and the file with its
  // password (else EDGEMOLE_MQTT_PASSWORD). No key holds the password itself.
  std::string ca_file, cert_file, key_file, username, password_file;
};

// Read a JSON config file (unknown keys are errors); ConfigError with one line.
DeviceConfig read_device_config(const std::string& path);
// Apply one `key=value` override (the command line's --key value), checking the type like the file does.
void set_device_option(DeviceConfig& config, const std::string& key, const std::string& value);
// Required fields present and values in range; ConfigError otherwise.
void check_device_config(const DeviceConfig& config);

}  // namespace edgemole
