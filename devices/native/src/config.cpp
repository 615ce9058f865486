#include "config.h"

#include <cmath>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <sstream>

#include "errors.h"

namespace edgemole {

using nlohmann::json;

const std::vector<std::string> kMethods{"fedit", "ffa-lora", "flexlora", "lora-a2", "fedamole", "fedamole-a2"};

namespace {

std::string show(const json& value) {
  std::string text = value.dump(-1, ' ', false, json::error_handler_t::replace);
  return text.size() > 80 ? text.substr(0, 80) + "..." : text;
}

// Reads the fields of one JSON object, each with its type check, then refuses any key it did not read.
class Fields {
 public:
  Fields(const json& object, std::string where) : object_(object), where_(std::move(where)) {
    if (!object_.is_object()) {
      throw ConfigError((where_.empty() ? "config" : where_) + " must be a table/object, got " + show(object_));
    }
  }

  void integer(const char* key, std::int64_t& out) {
    if (const json* v = take(key)) {
      if (!v->is_number_integer()) throw ConfigError(path(key) + " must be an integer, got " + show(*v));
      out = v->get<std::int64_t>();
    }
  }
  void number(const char* key, double& out) {
    if (const json* v = take(key)) {
      if (!v->is_number() || !std::isfinite(v->get<double>())) {
        throw ConfigError(path(key) + " must be a finite number, got " + show(*v));
      }
      out = v->get<double>();
    }
  }
  void boolean(const char* key, bool& out) {
    if (const json* v = take(key)) {
      if (!v->is_boolean()) throw ConfigError(path(key) + " must be true or false, got " + show(*v));
      out = v->get<bool>();
    }
  }
  void string(const char* key, std::string& out) {
    if (const json* v = take(key)) {
      if (!v->is_string()) throw ConfigError(path(key) + " must be a string, got " + show(*v));
      out = v->get<std::string>();
    }
  }
  void strings(const char* key, std::vector<std::string>& out) {
    if (const json* v = take(key)) {
      if (!v->is_array()) throw ConfigError(path(key) + " must be a list, got " + show(*v));
      out.clear();
      for (std::size_t i = 0; i < v->size(); ++i) {
        if (!(*v)[i].is_string()) {
          throw ConfigError(path(key) + "[" + std::to_string(i) + "] must be a string, got " + show((*v)[i]));
        }
        out.push_back((*v)[i].get<std::string>());
      }
    }
  }
  void object(const char* key, const std::function<void(Fields&)>& read) {
    if (const json* v = take(key)) {
      Fields inner(*v, path(key));
      read(inner);
      inner.finish();
    }
  }
  bool has(const char* key) const { return object_.contains(key); }

  // Unknown keys are an error, as in edgemole/config.py from_dict.
  void finish() const {
    std::set<std::string> known_sorted(known_.begin(), known_.end());
    for (const auto& item : object_.items()) {
      if (!known_sorted.count(item.key())) {
        std::string list;
        for (const auto& k : known_sorted) list += (list.empty() ? "" : ", ") + k;
        throw ConfigError("unknown key '" + path(item.key().c_str()) + "' (known: " + list + ")");
      }
    }
  }

  // Mark keys as known without reading them (fields a device ignores).
  void ignore(const char* key) { known_.push_back(key); }

 private:
  const json* take(const char* key) {
    known_.push_back(key);
    auto it = object_.find(key);
    return it == object_.end() ? nullptr : &*it;
  }
  std::string path(const char* key) const { return where_.empty() ? key : where_ + "." + key; }

  const json& object_;
  std::string where_;
  std::vector<std::string> known_;
};

void require(bool ok, const std::string& message) {
  if (!ok) throw ConfigError(message);
}

void check_task(const TaskSpec& t) {
  require(t.labels.size() >= 2, "a task needs at least 2 labels");
  require(std::set<std::string>(t.labels.begin(), t.labels.end()).size() == t.labels.size(),
          "task labels must be unique");
  bool known = false;
  for (const auto& m : kMethods) known = known || m == t.method;
  require(known, "unknown method '" + t.method + "'");
  require(1 <= t.model.max_length && t.model.max_length <= 8192, "model.max_length must be in [1, 8192]");
  require(1 <= t.lora.r && t.lora.r <= 256, "lora.r must be in [1, 256]");
  require(t.lora.alpha > 0, "lora.alpha must be > 0");
  require(0 <= t.lora.dropout && t.lora.dropout < 1, "lora.dropout must be in [0, 1)");
  require(!t.lora.target_modules.empty(), "lora.target_modules must be a non-empty list of module names");
  for (const auto& m : t.lora.target_modules) {
    require(!m.empty(), "lora.target_modules must be a non-empty list of module names");
  }
  require(t.train.local_steps >= 1, "train.local_steps must be >= 1");
  require(1 <= t.train.batch_size && t.train.batch_size <= 4096, "train.batch_size must be in [1, 4096]");
  require(1 <= t.train.eval_batch_size && t.train.eval_batch_size <= 4096,
          "train.eval_batch_size must be in [1, 4096]");
  require(0 < t.train.lr && t.train.lr < 10, "train.lr must be in (0, 10)");
  require(0 <= t.train.weight_decay && t.train.weight_decay < 1, "train.weight_decay must be in [0, 1)");
  require(t.train.optimizer == "adamw" || t.train.optimizer == "sgd", "train.optimizer must be adamw or sgd");
  const AmoleSpec& a = t.amole;
  require(1 <= a.experts && a.experts <= 1024, "amole.experts must be in [1, 1024]");
  require(1 <= a.top_k && a.top_k <= a.slots && a.slots <= 64, "amole needs 1 <= top_k <= slots <= 64");
  require(a.slots <= a.experts, "amole.slots cannot exceed amole.experts");
  require(a.holders >= 0, "amole.holders must be >= 1, or 0 for the smallest feasible C");
  require(1 <= a.reassign_every && a.reassign_every <= 1000, "amole.reassign_every must be in [1, 1000]");
  require(0 <= a.keep_bonus && a.keep_bonus <= 1000, "amole.keep_bonus must be in [0, 1000]");
  require(0 <= a.load_balance_weight && a.load_balance_weight < 10, "amole.load_balance_weight must be in [0, 10)");
  require(a.dp_eta >= 0, "amole.dp_eta must be >= 0 (0 turns the noise off)");
  require(0 < a.aux_fraction && a.aux_fraction <= 1 && a.aux_max >= 1,
          "amole.aux_fraction must be in (0, 1] and amole.aux_max >= 1");
  require(0 <= t.a2.upload_rank && t.a2.upload_rank <= 4096, "a2.upload_rank must be in [0, 4096]");
  require(0 < t.a2.b_lr_multiplier && t.a2.b_lr_multiplier <= 1000, "a2.b_lr_multiplier must be in (0, 1000]");
  require(0 <= t.a2.probe_steps && t.a2.probe_steps <= 1000000, "a2.probe_steps must be in [0, 1000000]");
}

}  // namespace

bool TaskSpec::operator==(const TaskSpec& o) const {
  auto key = [](const TaskSpec& t) {
    json j = {
        {"labels", t.labels},
        {"method", t.method},
        {"seed", t.seed},
        {"model", {t.model.name, t.model.max_length}},
        {"lora", {t.lora.r, t.lora.alpha, t.lora.dropout, t.lora.target_modules, t.lora.train_head}},
        {"train",
         {t.train.local_steps, t.train.batch_size, t.train.lr, t.train.weight_decay, t.train.eval_batch_size,
          t.train.dropout, t.train.optimizer}},
        {"amole",
         {t.amole.experts, t.amole.slots, t.amole.holders, t.amole.reassign_every, t.amole.top_k, t.amole.keep_bonus,
          t.amole.load_balance_weight, t.amole.sample_weighted, t.amole.dp_eta, t.amole.aux_fraction, t.amole.aux_max}},
        {"a2", {t.a2.upload_rank, t.a2.b_lr_multiplier, t.a2.probe_steps, t.a2.warm_start, t.a2.router_every_round}}};
    return j;
  };
  return key(*this) == key(o);
}

TaskSpec parse_task(const json& value) {
  TaskSpec t;
  Fields f(value, "task");
  require(f.has("labels"), "task.labels is missing");
  f.strings("labels", t.labels);
  f.string("method", t.method);
  f.integer("seed", t.seed);
  f.object("model", [&](Fields& m) {
    m.string("name", t.model.name);
    m.integer("max_length", t.model.max_length);
  });
  f.object("lora", [&](Fields& l) {
    l.integer("r", t.lora.r);
    l.number("alpha", t.lora.alpha);
    l.number("dropout", t.lora.dropout);
    l.strings("target_modules", t.lora.target_modules);
    l.boolean("train_head", t.lora.train_head);
  });
  f.object("train", [&](Fields& tr) {
    tr.integer("local_steps", t.train.local_steps);
    tr.integer("batch_size", t.train.batch_size);
    tr.number("lr", t.train.lr);
    tr.number("weight_decay", t.train.weight_decay);
    tr.integer("eval_batch_size", t.train.eval_batch_size);
    tr.boolean("dropout", t.train.dropout);
    tr.string("optimizer", t.train.optimizer);
  });
  f.object("amole", [&](Fields& a) {
    a.integer("experts", t.amole.experts);
    a.integer("slots", t.amole.slots);
    a.integer("holders", t.amole.holders);
    a.integer("reassign_every", t.amole.reassign_every);
    a.number("keep_bonus", t.amole.keep_bonus);
    a.integer("top_k", t.amole.top_k);
    a.number("load_balance_weight", t.amole.load_balance_weight);
    a.boolean("sample_weighted", t.amole.sample_weighted);
    a.number("dp_eta", t.amole.dp_eta);
    a.number("aux_fraction", t.amole.aux_fraction);
    a.integer("aux_max", t.amole.aux_max);
  });
  f.object("a2", [&](Fields& a) {
    a.integer("upload_rank", t.a2.upload_rank);
    a.number("b_lr_multiplier", t.a2.b_lr_multiplier);
    a.integer("probe_steps", t.a2.probe_steps);
    a.boolean("warm_start", t.a2.warm_start);
    a.boolean("router_every_round", t.a2.router_every_round);
  });
  f.finish();
  check_task(t);
  return t;
}

namespace {

void read_device_fields(Fields& f, DeviceConfig& c) {
  f.string("broker", c.broker);
  f.string("client_id", c.client_id);
  f.string("fleet", c.fleet);
  f.string("topic_prefix", c.topic_prefix);
  f.string("artifact", c.artifact);
  f.string("data", c.data);
  f.string("test_data", c.test_data);
  f.number("test_fraction", c.test_fraction);
  f.number("val_fraction", c.val_fraction);
  f.string("text_column", c.text_column);
  f.string("label_column", c.label_column);
  f.integer("upload_rank", c.upload_rank);
  f.integer("threads", c.threads);
  f.integer("max_message_bytes", c.max_message_bytes);
  f.number("connect_timeout_s", c.connect_timeout_s);
  f.boolean("keep_serving", c.keep_serving);
  f.boolean("eval_after_training", c.eval_after_training);
  f.string("log_level", c.log_level);
  f.string("state_dir", c.state_dir);
  f.string("ca_file", c.ca_file);
  f.string("cert_file", c.cert_file);
  f.string("key_file", c.key_file);
  f.string("username", c.username);
  f.string("password_file", c.password_file);
  if (f.has("password")) {
    throw ConfigError("the password is never a config value or a flag: use password_file or EDGEMOLE_MQTT_PASSWORD");
  }
}

}  // namespace

DeviceConfig read_device_config(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("config file '" + path + "' does not exist or cannot be read");
  std::stringstream buffer;
  buffer << in.rdbuf();
  json value;
  try {
    value = json::parse(buffer.str());
  } catch (const json::exception& exc) {  // parse_error, and out_of_range for a number such as 1e999
    throw ConfigError("config file '" + path + "' is not valid JSON: " + exc.what());
  }
  DeviceConfig config;
  Fields f(value, "");
  read_device_fields(f, config);
  f.finish();
  return config;
}

void set_device_option(DeviceConfig& config, const std::string& key, const std::string& value) {
  if (key == "password") {  // never echo it, never accept it: command lines show in process listings
    throw ConfigError("the password is never a config value or a flag: use password_file or EDGEMOLE_MQTT_PASSWORD");
  }
  // Parse the value as JSON where the field is not a string, so that types are checked by the same code.
  static const std::set<std::string> strings{
      "broker",       "client_id", "fleet",     "topic_prefix", "artifact",  "data",     "test_data", "text_column",
      "label_column", "log_level", "state_dir", "ca_file",      "cert_file", "key_file", "username",  "password_file"};
  json object = json::object();
  if (strings.count(key)) {
    object[key] = value;
  } else {
    try {
      object[key] = json::parse(value);
    } catch (const json::exception&) {  // parse_error, and out_of_range for a number such as 1e999
      throw ConfigError("--" + key + " has an invalid value '" + value + "'");
    }
  }
  Fields f(object, "");
  read_device_fields(f, config);
  f.finish();
}

void check_device_config(const DeviceConfig& c) {
  require(!c.broker.empty(), "no broker given (broker in the config file, or --broker mqtt://host:port)");
  require(!c.client_id.empty(), "no client id given (client_id in the config file, or --client-id ID)");
  require(!c.artifact.empty(), "no artifact folder given (artifact, or --artifact DIR written by 'edgemole export')");
  require(!c.data.empty(), "no data file given (data, or --data FILE)");
  require(0 <= c.test_fraction && c.test_fraction < 1, "test_fraction must be in [0, 1)");
  require(0 <= c.val_fraction && c.val_fraction < 1, "val_fraction must be in [0, 1)");
  require(0 <= c.upload_rank && c.upload_rank <= 4096, "upload_rank must be in [0, 4096] (0: the task's)");
  require(1 <= c.threads && c.threads <= 256, "threads must be in [1, 256]");
  require(c.max_message_bytes >= 1024, "max_message_bytes must be >= 1024");
  require(c.connect_timeout_s > 0, "connect_timeout_s must be > 0");
  require(c.log_level == "info" || c.log_level == "debug" || c.log_level == "warning",
          "log_level must be debug, info or warning");
}

}  // namespace edgemole
