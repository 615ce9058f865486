// edgemole-device: the native edgemole client.
//
//   edgemole-device --config FILE [--broker URL] [--client-id ID] [--KEY VALUE ...]   serve the fleet
//   edgemole-device predict --config FILE [TEXT ... | -]                              use the deployed model
//   edgemole-device round --config FILE --task T.st --assign A.st [--assign A2.st ...] --out U.st [--losses L.json]
//                                                         rounds from saved messages (parity checks)
//
// A fatal configuration error (bad flag, config file, data file or artifact) prints one `error: ...` line and exits
// with status 2, like the Python roles.
#include <atomic>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "client.h"
#include "deployed.h"
#include "errors.h"
#include "log.h"

namespace {

using namespace edgemole;

constexpr const char* kVersion = "0.1.0";

std::atomic<bool> stop_requested{false};

extern "C" void on_signal(int) { stop_requested.store(true); }

const char* kUsage =
    "usage: edgemole-device --config FILE [--broker URL] [--client-id ID] [--artifact DIR] [--data FILE]\n"
    "                       [--upload-rank R] [--threads T] [--keep-serving] [--KEY VALUE ...]\n"
    "       edgemole-device predict --config FILE [TEXT ... | -]\n"
    "       edgemole-device round --config FILE --task FILE --assign FILE [--assign FILE ...] --out FILE\n"
    "                             [--losses FILE] [--published FILE]\n"
    "       edgemole-device --version\n"
    "Keys of the JSON config file (and --key-with-dashes flags): broker, client_id, fleet, topic_prefix, artifact,\n"
    "data, test_data, test_fraction, val_fraction (share of the training rows held out to choose the deployed\n"
    "model, default 0.1), text_column, label_column, upload_rank, threads, max_message_bytes, connect_timeout_s,\n"
    "keep_serving, eval_after_training, state_dir, log_level, ca_file, cert_file, key_file, username,\n"
    "password_file (the password: that file or EDGEMOLE_MQTT_PASSWORD, never a flag).\n"
    "See devices/native/README.md.\n";

std::vector<std::uint8_t> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("cannot read '" + path + "'");
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
  if (!out) throw ConfigError("cannot write '" + path + "'");
}

// --config FILE first, then every --key value on top (dashes in keys become underscores).
struct Parsed {
  DeviceConfig config;
  std::vector<std::string> positional;
  std::map<std::string, std::vector<std::string>> extra;  // sub-command flags (task, assign, out, losses), in order
  // The last value of a sub-command flag ("" when not given).
  std::string flag(const std::string& key) const {
    const auto it = extra.find(key);
    return it == extra.end() ? "" : it->second.back();
  }
};

Parsed parse(int argc, char** argv, int first, const std::vector<std::string>& extra_flags) {
  Parsed p;
  std::vector<std::pair<std::string, std::string>> options;
  std::string config_path;
  for (int i = first; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0 || arg == "-") {
      p.positional.push_back(arg);
      continue;
    }
    std::string key = arg.substr(2);
    std::string value;
    const auto eq = key.find('=');
    if (eq != std::string::npos) {
      value = key.substr(eq + 1);
      key = key.substr(0, eq);
    } else if (key == "keep-serving" || key == "no-eval-after-training") {
      value = "true";
    } else {
      if (i + 1 >= argc) throw ConfigError("--" + key + " needs a value");
      value = argv[++i];
    }
    if (key == "no-eval-after-training") {
      key = "eval-after-training";
      value = "false";
    }
    for (char& c : key) c = c == '-' ? '_' : c;
    if (key == "config") {
      config_path = value;
    } else if (std::find(extra_flags.begin(), extra_flags.end(), key) != extra_flags.end()) {
      p.extra[key].push_back(value);
    } else {
      options.emplace_back(key, value);
    }
  }
  if (!config_path.empty()) p.config = read_device_config(config_path);
  for (const auto& option : options) set_device_option(p.config, option.first, option.second);
  return p;
}

int serve(int argc, char** argv) {
  Parsed p = parse(argc, argv, 1, {});
  if (!p.positional.empty()) throw ConfigError("unexpected argument '" + p.positional[0] + "'");
  check_device_config(p.config);
  set_log_level(p.config.log_level == "debug"     ? LogLevel::kDebug
                : p.config.log_level == "warning" ? LogLevel::kWarning
                                                  : LogLevel::kInfo);
  std::signal(SIGTERM, on_signal);
  std::signal(SIGINT, on_signal);
  DeviceClient client(p.config);
  return client.run(stop_requested);
}

// A link that plays saved messages to the client and keeps what it publishes.
class RecordingLink final : public Link {
 public:
  std::vector<std::pair<std::string, std::vector<std::uint8_t>>> published;
  void connect(double) override {}
  void subscribe(const std::vector<std::string>&) override {}
  void publish(const std::string& topic, const std::vector<std::uint8_t>& payload, bool) override {
    published.emplace_back(topic, payload);
  }
  std::optional<Inbound> receive(double) override { return std::nullopt; }
  void poll() override {}
  void set_birth(const std::string&, const std::vector<std::uint8_t>&) override {}
  void close() override {}
};

// The task, then every assignment in order (one client: what it trained in a round is kept for the next), as the
// service would receive them; --out gets the last update, --losses the last round's losses.
int one_round(int argc, char** argv) {
  Parsed p = parse(argc, argv, 2, {"task", "assign", "out", "losses", "published"});
  for (const char* key : {"task", "assign", "out"}) {
    if (!p.extra.count(key)) throw ConfigError(std::string("round needs --") + key + " FILE");
  }
  if (p.config.broker.empty()) p.config.broker = "mqtt://127.0.0.1:1";  // never connected
  check_device_config(p.config);
  auto link = std::make_unique<RecordingLink>();
  RecordingLink* recorded = link.get();
  DeviceClient client(p.config, std::move(link));
  client.handle(Inbound{client.topics().task(), read_file(p.flag("task")), true});
  const std::vector<std::string>& assignments = p.extra.at("assign");
  for (const std::string& path : assignments) {
    client.handle(Inbound{client.topics().assign(p.config.client_id), read_file(path), false});
  }
  const std::string update_topic = client.topics().update(p.config.client_id);
  if (p.extra.count("published")) {  // every message the client sent, as JSON lines (topic, kind, round, body)
    std::string lines;
    for (const auto& item : recorded->published) {
      const Message m = decode(item.second);
      lines +=
          nlohmann::json{{"topic", item.first}, {"kind", m.kind}, {"round", m.round}, {"body", m.body}}.dump() + "\n";
    }
    write_file(p.flag("published"), lines);
  }
  const std::vector<std::uint8_t>* last = nullptr;
  std::size_t updates = 0;
  for (const auto& item : recorded->published) {
    if (item.first == update_topic) {
      last = &item.second;
      ++updates;
    }
  }
  const std::string rejected = "(rejected " + std::to_string(client.rejected()) + " message(s))";
  if (!last) throw Error("the client sent no update " + rejected);
  if (updates < assignments.size()) {
    throw Error("the client sent " + std::to_string(updates) + " update(s) for " + std::to_string(assignments.size()) +
                " assignments " + rejected);
  }
  write_file(p.flag("out"), std::string(last->begin(), last->end()));
  if (p.extra.count("losses")) write_file(p.flag("losses"), nlohmann::json(client.last_losses()).dump());
  return 0;
}

int predict(int argc, char** argv) {
  Parsed p = parse(argc, argv, 2, {});
  if (p.config.artifact.empty()) throw ConfigError("no artifact folder given (artifact, or --artifact DIR)");
  if (p.config.state_dir.empty()) throw ConfigError("no state_dir given: the deployed model is kept there");
  DeployedModel model(p.config);
  std::vector<std::string> texts;
  const bool from_stdin = p.positional.empty() || (p.positional.size() == 1 && p.positional[0] == "-");
  if (!from_stdin) texts = p.positional;
  auto answer = [&](const std::string& text) { std::cout << model.predict(text).dump() << std::endl; };
  if (!from_stdin) {
    for (const std::string& text : texts) answer(text);
    return 0;
  }
  std::string line;
  while (std::getline(std::cin, line)) {
    if (!line.empty()) answer(line);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::string first = argc > 1 ? argv[1] : "";
    if (first == "--version") {
      std::cout << "edgemole-device " << kVersion << std::endl;
      return 0;
    }
    if (first == "--help" || first == "-h") {
      std::cout << kUsage;
      return 0;
    }
    if (first == "round") return one_round(argc, argv);
    if (first == "predict") return predict(argc, argv);
    return serve(argc, argv);
  } catch (const Error& exc) {
    std::fprintf(stderr, "error: %s\n", exc.what());
    return 2;
  } catch (const std::exception& exc) {
    std::fprintf(stderr, "error: %s\n", first_line(exc.what()).c_str());
    return 1;
  }
}
