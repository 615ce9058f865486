// edgemole-mqtt-tool: drives one MqttLink from the command line so that tests/test_native_mqtt.py can check it
// against a real Mosquitto and paho-mqtt on the other side (client id, QoS 1, will, birth, reconnects, big payloads).
//
//   edgemole-mqtt-tool --broker URL --client-id ID [--clean-session] [--keepalive S] [--connect-timeout S]
//       [--will-topic T --will-file F] [--birth-topic T --birth-file F] [--subscribe T]...
//       [--publish T=FILE]... [--retain] [--busy S [--poll-ms MS]] [--publish-after T=FILE]... [--receive N]
//       [--timeout S] [--out DIR] [--hold] [--ca-file F] [--cert-file F] [--key-file F] [--username U]
//       [--password-file F]
//
// Steps: connect; set and publish the birth status (retained); subscribe; publish the --publish files (QoS 1,
// waiting for the acknowledgement); "train" for --busy seconds calling only poll() every --poll-ms; publish the
// --publish-after files; receive N messages (writing each payload to DIR/<i>.bin); with --hold keep receiving until
// --timeout. Then disconnect cleanly.
// One line per event on stdout:
//   ready | published <topic> <bytes> | busy queued=<n> | received <i> <topic> <bytes> retained=<0|1> qos=<q>
//   done received=<n> bytes_in=<n> bytes_out=<n> reconnects=<n>
// Errors: "error: <one line>" on stderr; exit 1 (an Error), 2 (usage), 3 (fewer than N messages in time).
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "credentials.h"
#include "errors.h"
#include "mqtt_link.h"

namespace {

struct Args {
  std::string broker, client_id;
  bool clean_session = false, retain = false, hold = false;
  int keepalive_s = 30;
  double connect_timeout_s = 10, timeout_s = 30, busy_s = 0;
  int poll_ms = 100;
  std::string will_topic, will_file, birth_topic, birth_file, out_dir;
  std::vector<std::string> subscribe;
  std::vector<std::pair<std::string, std::string>> publish, publish_after;  // topic, file
  long receive = 0;
  edgemole::CredentialConfig credentials;
};

struct UsageError {
  std::string what;
};

std::vector<std::uint8_t> read_file(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw edgemole::ConfigError("cannot read " + path);
  return {std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::vector<std::uint8_t>& bytes) {
  std::ofstream file(path, std::ios::binary);
  file.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!file) throw edgemole::ConfigError("cannot write " + path);
}

double number(const std::string& flag, const std::string& text) {
  try {
    std::size_t used = 0;
    const double value = std::stod(text, &used);
    if (used == text.size() && value >= 0) return value;
  } catch (const std::exception&) {
  }
  throw UsageError{flag + " needs a non-negative number, got '" + text + "'"};
}

Args parse(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    const auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError{flag + " needs a value"};
      return argv[++i];
    };
    if (flag == "--broker") {
      args.broker = value();
    } else if (flag == "--client-id") {
      args.client_id = value();
    } else if (flag == "--clean-session") {
      args.clean_session = true;
    } else if (flag == "--keepalive") {
      args.keepalive_s = static_cast<int>(number(flag, value()));
    } else if (flag == "--connect-timeout") {
      args.connect_timeout_s = number(flag, value());
    } else if (flag == "--will-topic") {
      args.will_topic = value();
    } else if (flag == "--will-file") {
      args.will_file = value();
    } else if (flag == "--birth-topic") {
      args.birth_topic = value();
    } else if (flag == "--birth-file") {
      args.birth_file = value();
    } else if (flag == "--subscribe") {
      args.subscribe.push_back(value());
    } else if (flag == "--publish" || flag == "--publish-after") {
      const std::string spec = value();
      const auto eq = spec.rfind('=');
      if (eq == std::string::npos || eq == 0) throw UsageError{flag + " needs TOPIC=FILE, got '" + spec + "'"};
      (flag == "--publish" ? args.publish : args.publish_after).emplace_back(spec.substr(0, eq), spec.substr(eq + 1));
    } else if (flag == "--retain") {
      args.retain = true;
    } else if (flag == "--busy") {
      args.busy_s = number(flag, value());
    } else if (flag == "--poll-ms") {
      args.poll_ms = static_cast<int>(number(flag, value()));
    } else if (flag == "--receive") {
      args.receive = static_cast<long>(number(flag, value()));
    } else if (flag == "--timeout") {
      args.timeout_s = number(flag, value());
    } else if (flag == "--out") {
      args.out_dir = value();
    } else if (flag == "--hold") {
      args.hold = true;
    } else if (flag == "--ca-file") {
      args.credentials.ca_file = value();
    } else if (flag == "--cert-file") {
      args.credentials.cert_file = value();
    } else if (flag == "--key-file") {
      args.credentials.key_file = value();
    } else if (flag == "--username") {
      args.credentials.username = value();
    } else if (flag == "--password-file") {
      args.credentials.password_file = value();
    } else {
      throw UsageError{"unknown option " + flag};
    }
  }
  if (args.broker.empty() || args.client_id.empty()) throw UsageError{"--broker and --client-id are required"};
  if (args.will_topic.empty() != args.will_file.empty()) throw UsageError{"--will-topic needs --will-file"};
  if (args.birth_topic.empty() != args.birth_file.empty()) throw UsageError{"--birth-topic needs --birth-file"};
  return args;
}

void say(const std::string& line) { std::cout << line << std::endl; }

int run(const Args& args) {
  using Clock = std::chrono::steady_clock;
  edgemole::LinkOptions options;
  options.clean_session = args.clean_session;
  options.keepalive_s = args.keepalive_s;
  options.credentials = edgemole::load_credentials(args.credentials);
  if (!args.will_topic.empty()) options.will = edgemole::RetainedMessage{args.will_topic, read_file(args.will_file)};
  edgemole::MqttLink link(args.broker, args.client_id, options);
  link.connect(args.connect_timeout_s);
  if (!args.birth_topic.empty()) {
    std::vector<std::uint8_t> birth = read_file(args.birth_file);
    link.set_birth(args.birth_topic, birth);
    link.publish(args.birth_topic, birth, true);
  }
  link.subscribe(args.subscribe);
  say("ready");
  const auto publish = [&](const std::vector<std::pair<std::string, std::string>>& files) {
    for (const auto& [topic, file] : files) {
      const std::size_t n = link.publish(topic, read_file(file), args.retain);
      say("published " + topic + " " + std::to_string(n));
    }
  };
  publish(args.publish);
  if (args.busy_s > 0) {  // a training loop: only poll() between "steps"
    const auto end = Clock::now() + std::chrono::duration<double>(args.busy_s);
    while (Clock::now() < end) {
      std::this_thread::sleep_for(std::chrono::milliseconds(args.poll_ms));
      link.poll();
    }
    say("busy queued=" + std::to_string(link.queued()));
  }
  publish(args.publish_after);
  const auto deadline = Clock::now() + std::chrono::duration<double>(args.timeout_s);
  long received = 0;
  while (received < args.receive || args.hold) {
    const double left = std::chrono::duration<double>(deadline - Clock::now()).count();
    if (left <= 0) break;
    const std::optional<edgemole::MqttMessage> in = link.receive(std::min(left, 0.5));
    if (!in) continue;
    if (!args.out_dir.empty()) write_file(args.out_dir + "/" + std::to_string(received) + ".bin", in->payload);
    say("received " + std::to_string(received) + " " + in->topic + " " + std::to_string(in->payload.size()) +
        " retained=" + (in->retained ? "1" : "0") + " qos=" + std::to_string(in->qos));
    ++received;
  }
  say("done received=" + std::to_string(received) + " bytes_in=" + std::to_string(link.bytes_in()) +
      " bytes_out=" + std::to_string(link.bytes_out()) + " reconnects=" + std::to_string(link.reconnects()));
  link.close();
  if (received < args.receive) {
    std::cerr << "error: received " << received << " of " << args.receive << " messages within " << args.timeout_s
              << " s" << std::endl;
    return 3;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const UsageError& exc) {
    std::cerr << "error: " << exc.what << std::endl;
    return 2;
  } catch (const edgemole::Error& exc) {
    std::cerr << "error: " << exc.what() << std::endl;
    return 1;
  }
}
