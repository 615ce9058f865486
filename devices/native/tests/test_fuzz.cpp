// Fuzzing of everything that reads bytes the device did not write itself: the safetensors container and message
// decoder, the receiver's validators, the task parser (the task arrives over MQTT), the device config and its flags,
// and broker URLs. Thousands of random and mutated inputs, grown from the valid messages of docs/protocol.md section
// 9, with a fixed seed (a failure reproduces). Each target may throw only its own error type (ProtocolError for
// the wire, ConfigError for configuration); anything else escaping (a JSON library exception, std::out_of_range,
// ...) fails the test, and under AddressSanitizer/UBSan (tests/test_native_unit.py) so does any memory error.
#include <doctest/doctest.h>

#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <typeinfo>
#include <vector>

#include "config.h"
#include "errors.h"
#include "message.h"
#include "mqtt_link.h"
#include "protocol_vectors.h"
#include "safetensors.h"
#include "validate.h"
#include "wire_state.h"

using namespace edgemole;
using edgemole::testing::Bytes;
using edgemole::testing::protocol_vectors;
using nlohmann::json;

namespace {

constexpr std::uint64_t kSeed = 22;

// Runs `target`; only `Allowed` may escape it. Counts what was rejected.
struct Outcome {
  int accepted = 0, rejected = 0;
};

template <class Allowed>
void only(const char* what, Outcome& outcome, const std::function<void()>& target) {
  std::string escaped;
  try {
    target();
    ++outcome.accepted;
  } catch (const Allowed& exc) {
    ++outcome.rejected;
    const std::string reason = exc.what();
    const std::string message = std::string(what) + ": a reason of more than one line: " + reason;
    CHECK_MESSAGE(reason.find('\n') == std::string::npos, message);
  } catch (const std::exception& exc) {
    escaped = std::string(what) + " let " + typeid(exc).name() + " escape: " + exc.what();
  } catch (...) {
    escaped = std::string(what) + " let a non-standard exception escape";
  }
  if (!escaped.empty()) FAIL_CHECK(escaped);
}

class Fuzzer {
 public:
  explicit Fuzzer(std::uint64_t seed) : rng_(seed) {}

  std::size_t below(std::size_t n) { return n == 0 ? 0 : std::uniform_int_distribution<std::size_t>(0, n - 1)(rng_); }
  bool chance(double p) { return std::bernoulli_distribution(p)(rng_); }
  std::uint8_t byte() { return static_cast<std::uint8_t>(below(256)); }
  template <class T>
  const T& pick(const std::vector<T>& items) {
    return items[below(items.size())];
  }

  // Byte-level mutations of a whole payload: flips, interesting bytes, inserts, cuts, duplicates, header lengths.
  Bytes mutate_bytes(Bytes data, const Bytes& other) {
    const int rounds = 1 + static_cast<int>(below(4));
    for (int r = 0; r < rounds; ++r) {
      switch (below(8)) {
        case 0:
          if (!data.empty()) data[below(data.size())] ^= static_cast<std::uint8_t>(1u << below(8));
          break;
        case 1:
          if (!data.empty()) data[below(data.size())] = pick(interesting_bytes_);
          break;
        case 2: {
          const std::size_t at = below(data.size() + 1), n = 1 + below(16);
          Bytes insert(n);
          for (auto& b : insert) b = chance(0.5) ? byte() : pick(interesting_bytes_);
          data.insert(data.begin() + static_cast<std::ptrdiff_t>(at), insert.begin(), insert.end());
          break;
        }
        case 3:
          if (!data.empty()) {
            const std::size_t at = below(data.size()), n = 1 + below(std::min<std::size_t>(64, data.size() - at));
            data.erase(data.begin() + static_cast<std::ptrdiff_t>(at),
                       data.begin() + static_cast<std::ptrdiff_t>(at + n));
          }
          break;
        case 4:
          data.resize(below(data.size() + 1));
          break;
        case 5:
          if (!data.empty()) {
            const std::size_t at = below(data.size()), n = 1 + below(std::min<std::size_t>(64, data.size() - at));
            const Bytes chunk(data.begin() + static_cast<std::ptrdiff_t>(at),
                              data.begin() + static_cast<std::ptrdiff_t>(at + n));
            data.insert(data.begin() + static_cast<std::ptrdiff_t>(below(data.size() + 1)), chunk.begin(), chunk.end());
          }
          break;
        case 6: {  // the 8-byte header length
          const std::vector<std::uint64_t> lengths = {0,
                                                      1,
                                                      7,
                                                      data.size() >= 8 ? data.size() - 8 : 0,
                                                      data.size(),
                                                      data.size() + 1,
                                                      kMaxHeaderBytes,
                                                      kMaxHeaderBytes + 1,
                                                      std::numeric_limits<std::uint64_t>::max(),
                                                      std::uint64_t{1} << 63};
          const std::uint64_t n = pick(lengths);
          if (data.size() < 8) data.resize(8);
          for (int i = 0; i < 8; ++i) data[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(n >> (8 * i));
          break;
        }
        default: {  // splice with another payload
          const std::size_t cut = below(data.size() + 1), from = below(other.size() + 1);
          data.resize(cut);
          data.insert(data.end(), other.begin() + static_cast<std::ptrdiff_t>(from), other.end());
        }
      }
    }
    return data;
  }

  // Text-level mutations of a JSON document (a safetensors header, a config file): JSON fragments inserted,
  // spans deleted or replaced, so that most results still look like JSON to the parser.
  std::string mutate_text(std::string text) {
    const int rounds = 1 + static_cast<int>(below(3));
    for (int r = 0; r < rounds; ++r) {
      const std::size_t at = below(text.size() + 1);
      const std::size_t span = std::min<std::size_t>(below(12), text.size() - at);
      switch (below(3)) {
        case 0:
          text.insert(at, pick(fragments_));
          break;
        case 1:
          text.erase(at, span);
          break;
        default:
          text.replace(at, span, pick(fragments_));
      }
    }
    return text;
  }

  // A random JSON value, up to `depth` levels deep, with the numbers and strings that break careless code.
  json value(int depth = 3) {
    switch (below(depth > 0 ? 9 : 7)) {
      case 0:
        return nullptr;
      case 1:
        return chance(0.5);
      case 2:
        return pick(integers_);
      case 3:
        return std::numeric_limits<std::uint64_t>::max() - below(3);
      case 4:
        return pick(floats_);
      case 5:
      case 6: {
        std::string s;
        const std::size_t n = below(12);
        for (std::size_t i = 0; i < n; ++i) s += static_cast<char>(chance(0.8) ? 'a' + below(26) : byte());
        return chance(0.3) ? json(pick(words_)) : json(s);
      }
      case 7: {
        json a = json::array();
        const std::size_t n = below(5);
        for (std::size_t i = 0; i < n; ++i) a.push_back(value(depth - 1));
        return a;
      }
      default: {
        json o = json::object();
        const std::size_t n = below(5);
        for (std::size_t i = 0; i < n; ++i) o[pick(words_)] = value(depth - 1);
        return o;
      }
    }
  }

  // Replaces, adds or removes members anywhere in `doc` (objects and arrays, recursively).
  void mutate_json(json& doc, int depth = 0) {
    if (doc.is_object() && !doc.empty() && chance(0.7)) {
      auto it = doc.begin();
      std::advance(it, static_cast<std::ptrdiff_t>(below(doc.size())));
      if (depth < 4 && (it->is_object() || it->is_array()) && chance(0.6)) {
        mutate_json(*it, depth + 1);
      } else if (chance(0.2)) {
        doc.erase(it.key());
      } else {
        *it = value();
      }
    } else if (doc.is_array() && !doc.empty() && chance(0.7)) {
      json& item = doc[below(doc.size())];
      if (depth < 4 && (item.is_object() || item.is_array()) && chance(0.5)) {
        mutate_json(item, depth + 1);
      } else {
        item = value();
      }
    } else if (doc.is_object()) {
      doc[pick(words_)] = value();
    } else {
      doc = value();
    }
  }

  const std::vector<std::string>& words() const { return words_; }

 private:
  std::mt19937_64 rng_;
  const std::vector<std::uint8_t> interesting_bytes_ = {0x00, 0xff, 0x7f, 0x80, '"', '\\', '{', '}', '[',  ']',
                                                        ',',  ':',  '-',  '0',  '9', 'e',  'E', ' ', 0xc0, 0xed};
  const std::vector<std::string> fragments_ = {"\"",
                                               "{",
                                               "}",
                                               "[",
                                               "]",
                                               ",",
                                               ":",
                                               "null",
                                               "true",
                                               "-1",
                                               "0",
                                               "1e999",
                                               "-0.0",
                                               "18446744073709551616",
                                               "9223372036854775807",
                                               "\"F64\"",
                                               "\"I64\"",
                                               "\"dtype\"",
                                               "\"shape\"",
                                               "\"data_offsets\"",
                                               "\"__metadata__\"",
                                               "\"\\u0000\"",
                                               "\"\\ud800\"",
                                               "\"\\\"{}\\\"\"",
                                               "[[[[[[[[",
                                               "{\"a\":1,\"a\":2}",
                                               "NaN",
                                               "Infinity",
                                               "\xff\xfe"};
  const std::vector<json> integers_ = {0,
                                       1,
                                       -1,
                                       2,
                                       7,
                                       16,
                                       255,
                                       65536,
                                       2147483647,
                                       -2147483648LL,
                                       std::numeric_limits<std::int64_t>::max(),
                                       std::numeric_limits<std::int64_t>::min(),
                                       1000000000,
                                       1000000001};
  const std::vector<json> floats_ = {0.5, -0.0, 1e308, -1e308, 1e-320, 3.4e38, 1e30, 0.1, 2.0};
  const std::vector<std::string> words_ = {
      "run",    "task",   "experts",   "num_samples", "metrics", "train_roles", "local_steps", "own_rank",
      "labels", "method", "lora",      "train",       "amole",   "a2",          "model",       "r",
      "seed",   "state",  "failed",    "reason",      "round",   "client",      "lora_A",      "lora_B",
      "head",   "router", "embedding", "ranks",       "",        "fedit",       "fedamole-a2", "train-A",
      "eval",   "done",   "broker",    "client_id",   "threads", "upload_rank"};
};

Message decoded(const std::map<std::string, Bytes>& vectors, const char* name) {
  const auto it = vectors.find(name);
  REQUIRE_MESSAGE(it != vectors.end(), "no test vector " << name << " in docs/protocol.md");
  return decode(it->second);
}

// The checks a device or an aggregator runs on a decoded message, with what the receiver expects of it.
void validate_all(const Message& m, const SpecMap& assign_spec, const SpecMap& update_spec) {
  Outcome ignored;
  only<ProtocolError>("validate_assignment", ignored, [&] {
    validate_assignment(m, m.fleet, m.body.value("run", json("r")).dump(), m.client, 0, assign_spec);
  });
  only<ProtocolError>("validate_assignment (own spec)", ignored, [&] {
    validate_assignment(m, "demo", "5f3a9c0e12ab", "phone-1", 0, spec_of(m.tensors, m.roles));
  });
  only<ProtocolError>("validate_update", ignored, [&] {
    validate_update(m, "demo", "5f3a9c0e12ab", m.round, m.phase, m.client, {m.client}, update_spec);
  });
  only<ProtocolError>("check_tensors", ignored, [&] { check_tensors(m, update_spec); });
  only<ProtocolError>("check_rank_slices", ignored, [&] { check_rank_slices(m.tensors, spec_of(m.tensors)); });
}

}  // namespace

TEST_CASE("fuzz: payloads mutated byte by byte and as header text reach the decoder and validators") {
  const auto vectors = protocol_vectors();
  std::vector<Bytes> seeds;
  for (const auto& item : vectors) seeds.push_back(item.second);
  REQUIRE(seeds.size() >= 8);
  const SpecMap assign_spec = spec_of(decoded(vectors, "assign-train").tensors, decoded(vectors, "assign-train").roles);
  const SpecMap update_spec = spec_of(decoded(vectors, "update-ok").tensors, decoded(vectors, "update-ok").roles);
  Fuzzer fuzz(kSeed);
  Outcome bytes, text;
  for (int i = 0; i < 3000; ++i) {
    const Bytes input = fuzz.mutate_bytes(fuzz.pick(seeds), fuzz.pick(seeds));
    only<ProtocolError>("decode", bytes, [&] { validate_all(decode(input), assign_spec, update_spec); });
    only<ProtocolError>("read_safetensors", bytes, [&] { read_safetensors(input.data(), input.size()); });
  }
  for (int i = 0; i < 2000; ++i) {  // the header as text, its length kept right: deeper into the parser
    const Bytes& seed = fuzz.pick(seeds);
    std::uint64_t n = 0;
    for (int k = 0; k < 8; ++k) n |= std::uint64_t{seed[static_cast<std::size_t>(k)]} << (8 * k);
    if (n > seed.size() - 8) continue;  // a hostile vector's header length
    std::string header(seed.begin() + 8, seed.begin() + 8 + static_cast<std::ptrdiff_t>(n));
    header = fuzz.mutate_text(header);
    Bytes input(8);
    for (int k = 0; k < 8; ++k)
      input[static_cast<std::size_t>(k)] = static_cast<std::uint8_t>(header.size() >> (8 * k));
    input.insert(input.end(), header.begin(), header.end());
    input.insert(input.end(), seed.begin() + 8 + static_cast<std::ptrdiff_t>(n), seed.end());
    only<ProtocolError>("decode (header text)", text, [&] { validate_all(decode(input), assign_spec, update_spec); });
    only<ProtocolError>("parse_strict_json", text, [&] { parse_strict_json(header); });
  }
  MESSAGE("byte mutations: " << bytes.rejected << " rejected, " << bytes.accepted << " accepted; header text: "
                             << text.rejected << " rejected, " << text.accepted << " accepted");
  CHECK(bytes.rejected > 0);
  CHECK(text.accepted > 0);
}

TEST_CASE("fuzz: well-formed messages with hostile fields reach the validators") {
  const auto vectors = protocol_vectors();
  std::vector<Message> seeds;
  for (const char* name : {"task", "status-ready", "round-train", "assign-train", "update-ok", "round-done"}) {
    seeds.push_back(decoded(vectors, name));
  }
  const SpecMap assign_spec = spec_of(seeds[3].tensors, seeds[3].roles);
  const SpecMap update_spec = spec_of(seeds[4].tensors, seeds[4].roles);
  Fuzzer fuzz(kSeed + 1);
  Outcome outcome;
  for (int i = 0; i < 2000; ++i) {
    Message m = fuzz.pick(seeds);
    switch (fuzz.below(6)) {
      case 0:
        if (const json r = fuzz.value(0); r.is_number_integer()) m.round = r.get<std::int64_t>();
        break;
      case 1:
        m.phase = fuzz.pick(fuzz.words());
        break;
      case 2:
        m.client = fuzz.pick(fuzz.words());
        break;
      case 3:
        if (!m.tensors.empty()) m.roles[m.tensors.begin()->first] = fuzz.pick(fuzz.words());
        break;
      default:
        fuzz.mutate_json(m.body);
    }
    Bytes payload;
    only<ProtocolError>("encode", outcome, [&] { payload = encode(m); });
    if (payload.empty()) continue;
    only<ProtocolError>("decode", outcome, [&] { validate_all(decode(payload), assign_spec, update_spec); });
  }
  MESSAGE("hostile fields: " << outcome.rejected << " rejected, " << outcome.accepted << " accepted");
  CHECK(outcome.rejected > 0);
}

TEST_CASE("fuzz: an AMoLE assignment's expert sets") {
  std::vector<ParamView> params;
  for (const char* m : {"enc.0.query", "enc.1.value"}) {
    for (const char* attr : {"experts_A", "experts_B", "shared_A", "shared_B", "router"}) {
      params.push_back(ParamView{std::string(m) + "." + attr, "", {1}, nullptr, 0});
    }
  }
  const WireState wire(params, {"enc.0.query", "enc.1.value"}, 3, 4);
  const json valid = {{"run", "r"}, {"experts", {{"enc.0.query", {0, 1, 3}}, {"enc.1.value", {2}}}}};
  Fuzzer fuzz(kSeed + 2);
  Outcome outcome;
  only<ProtocolError>("expert_sets", outcome, [&] { wire.expert_sets(valid); });
  REQUIRE(outcome.accepted == 1);
  for (int i = 0; i < 1000; ++i) {
    json body = valid;
    fuzz.mutate_json(body);
    only<ProtocolError>("expert_sets", outcome, [&] { wire.expert_sets(body); });
  }
  CHECK(outcome.rejected > 0);
}

TEST_CASE("fuzz: task bodies") {
  const auto vectors = protocol_vectors();
  const json task = decoded(vectors, "task").body.at("task");
  Fuzzer fuzz(kSeed + 3);
  Outcome outcome;
  only<ConfigError>("parse_task", outcome, [&] { parse_task(task); });
  REQUIRE(outcome.accepted == 1);
  for (int i = 0; i < 2000; ++i) {
    json body = task;
    const int rounds = 1 + static_cast<int>(fuzz.below(3));
    for (int r = 0; r < rounds; ++r) fuzz.mutate_json(body);
    only<ConfigError>("parse_task", outcome, [&] { parse_task(body); });
  }
  MESSAGE("tasks: " << outcome.rejected << " rejected, " << outcome.accepted << " accepted");
  CHECK(outcome.rejected > 0);
}

TEST_CASE("fuzz: device config files, flags and broker URLs") {
  const json config = {{"broker", "mqtts://broker.local:8883"},
                       {"client_id", "pi-01"},
                       {"fleet", "default"},
                       {"artifact", "/opt/a"},
                       {"data", "/opt/d.csv"},
                       {"test_fraction", 0.2},
                       {"threads", 4},
                       {"keep_serving", true},
                       {"ca_file", "/etc/edgemole/ca.crt"},
                       {"username", "pi-01"},
                       {"password_file", "/etc/edgemole/password"}};
  Fuzzer fuzz(kSeed + 4);
  Outcome files, flags, urls;
  const std::string path = "edgemole-fuzz-config.json";  // in ctest's working directory (the build folder)
  for (int i = 0; i < 800; ++i) {
    std::string text;
    if (fuzz.chance(0.5)) {
      json doc = config;
      fuzz.mutate_json(doc);
      text = doc.dump(-1, ' ', false, json::error_handler_t::replace);
    } else {
      text = fuzz.mutate_text(config.dump());
    }
    std::ofstream(path, std::ios::binary) << text;
    only<ConfigError>("read_device_config", files, [&] { check_device_config(read_device_config(path)); });
  }
  std::remove(path.c_str());
  std::vector<std::string> keys = fuzz.words();
  for (const auto& item : config.items()) keys.push_back(item.key());
  for (const char* key : {"max_message_bytes", "connect_timeout_s", "password", "cert_file", "key_file"}) {
    keys.emplace_back(key);
  }
  for (int i = 0; i < 800; ++i) {
    DeviceConfig c;
    const json v = fuzz.value(1);
    const std::string value = fuzz.chance(0.5)
                                  ? fuzz.mutate_text(v.dump(-1, ' ', false, json::error_handler_t::replace))
                                  : v.dump(-1, ' ', false, json::error_handler_t::replace);
    only<ConfigError>("set_device_option", flags, [&] { set_device_option(c, fuzz.pick(keys), value); });
  }
  const std::vector<std::string> urls_seed = {"mqtt://127.0.0.1:1883", "mqtts://broker.local", "ssl://[::1]:8883",
                                              "pi-01@host:1", "tcp://h:0/"};
  for (int i = 0; i < 1500; ++i) {
    const std::string url = fuzz.mutate_text(fuzz.pick(urls_seed));
    only<ConfigError>("parse_broker_url", urls, [&] {
      const BrokerAddress a = parse_broker_url(url);
      CHECK((a.port >= 1 && a.port <= 65535));
      CHECK(!a.host.empty());
    });
  }
  MESSAGE("config files: " << files.rejected << " rejected; flags: " << flags.rejected
                           << " rejected; URLs: " << urls.rejected << " rejected, " << urls.accepted << " accepted");
  CHECK(files.rejected > 0);
  CHECK(urls.accepted > 0);
}
