// The wire protocol against docs/protocol.md: every test vector of section 9 (read from the document itself, so the
// two cannot drift apart), hostile payloads of our own, the receiver's tensor checks, and topic names.
#include <doctest/doctest.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "errors.h"
#include "message.h"
#include "protocol_vectors.h"
#include "pyfmt.h"
#include "safetensors.h"
#include "topics.h"
#include "validate.h"

using namespace edgemole;
using edgemole::testing::Bytes;

namespace {

const std::string kA = "backbone.encoder.layer.0.attention.self.query.lora_A";
const std::string kB = "backbone.encoder.layer.0.attention.self.query.lora_B";
const std::string kRun = "5f3a9c0e12ab";

// The protocol's test vectors, read once.
const std::map<std::string, Bytes>& vectors() {
  static const std::map<std::string, Bytes> blocks = edgemole::testing::protocol_vectors();
  return blocks;
}

const Bytes& vec(const std::string& name) {
  const auto it = vectors().find(name);
  REQUIRE_MESSAGE(it != vectors().end(), "no test vector " << name);
  return it->second;
}

// The reason decode gives for rejecting `payload` ("" when it accepts it). Any other exception fails the test.
std::string rejection(const Bytes& payload, std::size_t max_bytes = kDefaultMaxMessageBytes) {
  try {
    decode(payload.data(), payload.size(), max_bytes);
  } catch (const ProtocolError& exc) {
    return exc.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// A payload from header text (padded with spaces to a multiple of 8) and a data section.
Bytes payload(const std::string& header, const Bytes& data = {}, bool pad = true) {
  std::string text = header;
  if (pad) text.append((8 - text.size() % 8) % 8, ' ');
  Bytes out(8);
  const std::uint64_t n = text.size();
  for (int i = 0; i < 8; ++i) out[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(n >> (8 * i));
  out.insert(out.end(), text.begin(), text.end());
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

// A valid status message's metadata, as JSON members, with `override` replacing (or adding) members verbatim.
std::string metadata(const std::map<std::string, std::string>& override = {}) {
  std::map<std::string, std::string> members = {
      {"schema", "\"edgemole/1\""}, {"kind", "\"status\""}, {"fleet", "\"demo\""},
      {"round", "\"0\""},           {"phase", "\"\""},      {"client", "\"phone-1\""},
      {"body", "\"{}\""},           {"roles", "\"{}\""}};
  for (const auto& [key, value] : override) members[key] = value;
  std::string out = "{";
  for (const auto& [key, value] : members) {
    if (value.empty()) continue;  // "" removes the member
    out += (out.size() > 1 ? "," : "") + ("\"" + key + "\":") + value;
  }
  return out + "}";
}

std::string header_with(const std::string& meta, const std::string& tensors = "") {
  return "{\"__metadata__\":" + meta + (tensors.empty() ? "" : "," + tensors) + "}";
}

Tensor f32(std::vector<std::int64_t> shape, const std::vector<float>& values) {
  return Tensor::from_f32(std::move(shape), values);
}

TensorSpec spec(std::vector<std::optional<std::int64_t>> shape, DType dtype = DType::F32, std::string role = "",
                bool optional = false, std::int64_t bound = 0) {
  TensorSpec s;
  s.shape = std::move(shape);
  s.dtype = dtype;
  s.role = std::move(role);
  s.optional = optional;
  s.bound = bound;
  return s;
}

SpecMap lora_spec() { return {{kA, spec({2, 3}, DType::F32, "lora_A")}, {kB, spec({3, 2}, DType::F32, "lora_B")}}; }

std::string check_error(const Message& msg, const SpecMap& expected) {
  try {
    check_tensors(msg, expected);
  } catch (const ProtocolError& exc) {
    return exc.what();
  }
  return "";
}

Message update_ok() { return decode(vec("update-ok")); }

}  // namespace

// -- section 9: the test vectors ---------------------------------------------------------------------------------

TEST_CASE("every test vector of docs/protocol.md is found with its stated size") {
  for (const char* name : {"task", "status-ready", "round-train", "assign-train", "update-ok", "round-done",
                           "update-nan", "hostile-dtype-f64", "hostile-header-length", "hostile-offsets"}) {
    CAPTURE(name);
    CHECK(vectors().count(name) == 1);
  }
  CHECK(vec("task").size() == 528);
  CHECK(vec("status-ready").size() == 248);
  CHECK(vec("round-train").size() == 272);
  CHECK(vec("assign-train").size() == 576);
  CHECK(vec("update-ok").size() == 648);
  CHECK(vec("round-done").size() == 248);
  CHECK(vec("hostile-header-length").size() == 32);
}

TEST_CASE("vector task") {
  const Message m = decode(vec("task"));
  CHECK(m.kind == "task");
  CHECK(m.fleet == "demo");
  CHECK(m.round == 0);
  CHECK(m.phase == "");
  CHECK(m.client == "");
  CHECK(m.roles.empty());
  CHECK(m.tensors.empty());
  const auto body = nlohmann::json::parse(R"({"run": "5f3a9c0e12ab",
    "task": {"labels": ["negative", "positive"], "method": "fedit", "seed": 0,
             "model": {"name": "all-MiniLM-L6-v2", "max_length": 32},
             "lora": {"r": 8, "alpha": 16.0, "dropout": 0.05, "target_modules": ["query", "value"],
                      "train_head": true},
             "train": {"local_steps": 10, "batch_size": 16, "lr": 0.002, "weight_decay": 0.0,
                       "eval_batch_size": 64}}})");
  CHECK(m.body == body);
  CHECK(m.body["task"]["lora"]["alpha"].is_number_float());
  CHECK(m.body["task"]["seed"].is_number_integer());
}

TEST_CASE("vector status-ready") {
  const Bytes& v = vec("status-ready");
  CHECK(v[0] == 0xf0);  // N = 240: 237 bytes of JSON and 3 spaces
  CHECK(std::string(v.begin() + 245, v.end()) == "   ");
  const Message m = decode(v);
  CHECK(m.kind == "status");
  CHECK(m.fleet == "demo");
  CHECK(m.round == 0);
  CHECK(m.phase == "");
  CHECK(m.client == "phone-1");
  CHECK(m.roles.empty());
  CHECK(m.tensors.empty());
  CHECK(m.body ==
        nlohmann::json::parse(
            R"({"engine": "eager", "num_test": 30, "num_train": 120, "run": "5f3a9c0e12ab", "state": "ready"})"));
}

TEST_CASE("vectors round-train and round-done") {
  const Message train = decode(vec("round-train"));
  CHECK(train.kind == "round");
  CHECK(train.fleet == "demo");
  CHECK(train.round == 1);
  CHECK(train.phase == "train");
  CHECK(train.client == "");
  CHECK(train.tensors.empty());
  CHECK(train.body == nlohmann::json::parse(R"({"deadline_unix": 1700000300.5, "hparams": {}, "rounds": 5,
      "run": "5f3a9c0e12ab", "selected": ["phone-1", "phone-2"]})"));

  const Message done = decode(vec("round-done"));
  CHECK(done.kind == "round");
  CHECK(done.round == 6);
  CHECK(done.phase == "done");
  CHECK(done.client == "");
  CHECK(done.tensors.empty());
  CHECK(done.body == nlohmann::json::parse(R"({"deadline_unix": 1700000900.0, "hparams": {}, "rounds": 5,
      "run": "5f3a9c0e12ab", "selected": []})"));
}

TEST_CASE("vector assign-train") {
  const Message m = decode(vec("assign-train"));
  CHECK(m.kind == "assign");
  CHECK(m.fleet == "demo");
  CHECK(m.round == 1);
  CHECK(m.phase == "train");
  CHECK(m.client == "phone-1");
  CHECK(m.body == nlohmann::json{{"run", kRun}});
  CHECK(m.roles == std::map<std::string, std::string>{{kA, "lora_A"}, {kB, "lora_B"}});
  REQUIRE(m.tensors.size() == 2);
  CHECK(m.tensors.at(kA).dtype == DType::F32);
  CHECK(m.tensors.at(kA).shape == std::vector<std::int64_t>{2, 3});
  CHECK(m.tensors.at(kA).f32() == std::vector<float>{0.5f, -1.0f, 2.0f, 0.25f, 1.5f, -0.75f});
  CHECK(m.tensors.at(kB).shape == std::vector<std::int64_t>{3, 2});
  CHECK(m.tensors.at(kB).f32() == std::vector<float>(6, 0.0f));
  CHECK_NOTHROW(validate_assignment(m, "demo", kRun, "phone-1", 0, lora_spec()));
}

TEST_CASE("vector update-ok, and the aggregator's checks of it") {
  const Message m = update_ok();
  CHECK(m.kind == "update");
  CHECK(m.fleet == "demo");
  CHECK(m.round == 1);
  CHECK(m.phase == "train");
  CHECK(m.client == "phone-1");
  CHECK(m.body ==
        nlohmann::json::parse(
            R"({"metrics": {"acc_before": 0.5, "train_loss": 0.25}, "num_samples": 120, "run": "5f3a9c0e12ab"})"));
  CHECK(m.roles == std::map<std::string, std::string>{{kA, "lora_A"}, {kB, "lora_B"}});
  CHECK(m.tensors.at(kA).f32() == std::vector<float>{0.5f, -1.0f, 2.0f, 0.25f, 1.5f, -0.75f});
  CHECK(m.tensors.at(kB).f32() == std::vector<float>{1.0f, 0.0f, -0.5f, 0.125f, 3.0f, -2.0f});
  CHECK_NOTHROW(check_tensors(m, lora_spec()));
  CHECK_NOTHROW(validate_update(m, "demo", kRun, 1, "train", "phone-1", {"phone-1", "phone-2"}, lora_spec()));
}

TEST_CASE("vector update-nan decodes, and check_tensors rejects it") {
  const Message m = decode(vec("update-nan"));
  CHECK(m.kind == "update");
  CHECK(std::isnan(m.tensors.at(kB).f32()[1]));
  CHECK(check_error(m, lora_spec()) == "tensor '" + kB + "' contains NaN or Inf");
  CHECK_THROWS_AS(validate_update(m, "demo", kRun, 1, "train", "phone-1", {"phone-1"}, lora_spec()), ProtocolError);
}

TEST_CASE("hostile vectors are rejected while decoding, with the reference's reasons") {
  CHECK(rejection(vec("hostile-dtype-f64")) ==
        "tensor 'head.bias' has dtype 'F64', not one of ['BF16', 'F16', 'F32', 'I32', 'I64']");
  CHECK(rejection(vec("hostile-header-length")) == "header length 4096 exceeds the payload (32 bytes) or the limit");
  const std::string offsets = rejection(vec("hostile-offsets"));
  CHECK(contains(offsets, "tensor data is malformed: "));
  CHECK(contains(offsets, "invalid offset for tensor 'head.weight'"));
}

TEST_CASE("encoding a decoded vector gives back its exact bytes") {
  for (const char* name :
       {"task", "status-ready", "round-train", "assign-train", "update-ok", "round-done", "update-nan"}) {
    CAPTURE(name);
    CHECK(encode(decode(vec(name))) == vec(name));
  }
}

TEST_CASE("a header with very many members is decoded in linear time") {
  const auto start = std::chrono::steady_clock::now();
  std::string members;
  for (int i = 0; i < 35000; ++i) members += ",\"k" + std::to_string(i) + "\":{\"dtype\":\"F32\"}";
  const Bytes wide = payload(header_with(metadata(), members.substr(1)));
  CHECK(wide.size() < kMaxHeaderBytes);
  CHECK(rejection(wide) == "tensor data is malformed: tensor 'k0' has no 'shape' array");
  std::string meta_members;
  for (int i = 0; i < 60000; ++i) meta_members += ",\"m" + std::to_string(i) + "\":\"x\"";
  CHECK(rejection(payload(header_with(metadata({{"extra", "\"x\"" + meta_members}})))).empty());
  // about a second with sanitizers; a parser that rescans objects took minutes here
  CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(60));
}

TEST_CASE("no vector with a flipped or truncated byte crashes the decoder") {
  for (const char* name : {"update-ok", "task", "hostile-offsets"}) {
    const Bytes& good = vec(name);
    for (std::size_t cut = 0; cut < good.size(); ++cut) {
      const Bytes truncated(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(cut));
      CAPTURE(cut);
      CHECK(!rejection(truncated).empty());
    }
    for (std::size_t i = 0; i < good.size(); ++i) {
      for (const std::uint8_t value : Bytes{0x00, 0xff, 0x22, 0x7b, 0x5d, 0x39, 0x80}) {
        Bytes bad = good;
        bad[i] = value;
        try {
          const Message m = decode(bad);
          check_tensors(m, spec_of(m.tensors, m.roles));
        } catch (const ProtocolError& exc) {
          // the reason is one line of valid UTF-8, so that it can travel in a status message's JSON body
          const std::string reason = exc.what();
          CHECK(reason.find('\n') == std::string::npos);
          CHECK_NOTHROW(nlohmann::json(reason).dump());
        }
      }
    }
  }
}

// -- decoding: hostile payloads of our own ---------------------------------------------------------------------------

TEST_CASE("the size limit and the header length are checked before anything is parsed") {
  CHECK(rejection({}) == "payload of 0 bytes is too short for a safetensors header");
  CHECK(rejection(Bytes(7, 0)) == "payload of 7 bytes is too short for a safetensors header");
  CHECK(contains(rejection(Bytes(8, 0)), "header is not valid JSON"));
  Bytes huge(16, 0xff);  // N = 2^64 - 1
  CHECK(rejection(huge) == "header length 18446744073709551615 exceeds the payload (16 bytes) or the limit");
  Bytes over_limit(8 + kMaxHeaderBytes + 8, ' ');  // N = 1 MiB + 1, within the payload
  const std::uint64_t n = kMaxHeaderBytes + 1;
  for (int i = 0; i < 8; ++i) over_limit[static_cast<std::size_t>(i)] = static_cast<std::uint8_t>(n >> (8 * i));
  CHECK(rejection(over_limit) == "header length 1048577 exceeds the payload (1048592 bytes) or the limit");

  const Bytes ok = payload(header_with(metadata()));
  CHECK(rejection(ok).empty());
  CHECK(rejection(ok, ok.size()).empty());
  CHECK(rejection(ok, ok.size() - 1) == "payload of " + std::to_string(ok.size()) + " bytes exceeds the limit of " +
                                            std::to_string(ok.size() - 1) + " bytes");
  Bytes big = payload(header_with(metadata()));
  big.resize(kDefaultMaxMessageBytes + 1);  // the limit is checked before anything else
  CHECK(rejection(big) == "payload of 16777217 bytes exceeds the limit of 16777216 bytes");
}

TEST_CASE("the header must be one strict JSON object") {
  const std::string meta = metadata();
  for (const std::string& bad :
       std::vector<std::string>{std::string("{"), std::string("{\"__metadata__\":") + meta, header_with(meta) + "x",
                                header_with(meta) + std::string(1, '\0'), "\xEF\xBB\xBF" + header_with(meta),
                                "/* c */" + header_with(meta), std::string("{\"__metadata__\":") + meta + ",\"t\":NaN}",
                                std::string("{\"__metadata__\":") + meta + ",\"t\":1e999}",
                                std::string("{\"__metadata__\":") + meta + ",\"t\":\"\xff\"}",
                                std::string("{\"__metadata__\":") + meta + ",\"t\":\"\\ud800\"}",
                                std::string("{\"__metadata__\":") + meta + ",'t':1}"}) {
    CAPTURE(bad);
    CHECK(contains(rejection(payload(bad)), "header is not valid JSON: "));
  }
  CHECK(rejection(payload("[1,2]")) == "header is not a JSON object");
  CHECK(rejection(payload("\"x\"")) == "header is not a JSON object");
  // whitespace around the object, and a header that is not padded, are fine
  CHECK(rejection(payload(" " + header_with(meta) + "\n\t", {}, false)).empty());
  CHECK(rejection(payload(header_with(meta), {}, false)).empty());
}

TEST_CASE("duplicate keys and deep nesting are rejected anywhere") {
  const std::string meta = metadata();
  CHECK(rejection(payload("{\"__metadata__\":" + meta + ",\"__metadata__\":" + meta + "}")) ==
        "header is not valid JSON: duplicate key '__metadata__'");
  CHECK(rejection(payload(header_with(metadata({{"kind", "\"status\",\"kind\":\"task\""}})))) ==
        "header is not valid JSON: duplicate key 'kind'");
  const std::string entry = R"({"dtype":"F32","shape":[0],"data_offsets":[0,0],"shape":[0]})";
  CHECK(rejection(payload(header_with(meta, "\"t\":" + entry))) == "header is not valid JSON: duplicate key 'shape'");
  CHECK(rejection(payload(header_with(metadata({{"body", R"("{\"a\":1,\"a\":2}")"}})))) ==
        "metadata 'body' is not valid JSON (duplicate key 'a')");
  std::string deep(100, '[');
  deep += std::string(100, ']');
  CHECK(contains(rejection(payload(header_with(meta, "\"x\":" + deep))), "nesting deeper than"));
  CHECK(contains(rejection(payload(header_with(metadata({{"body", "\"{\\\"a\\\":" + deep + "}\""}})))),
                 "metadata 'body' is not valid JSON (nesting deeper than"));
  // the same key in different objects is fine
  CHECK(rejection(payload(header_with(metadata({{"body", R"("{\"a\":{\"a\":1}}")"}})))).empty());
}

TEST_CASE("the metadata must be an object of strings") {
  CHECK(rejection(payload("{}")) == "header has no '__metadata__' object of strings");
  CHECK(rejection(payload(R"({"__metadata__":[]})")) == "header has no '__metadata__' object of strings");
  CHECK(rejection(payload(R"({"__metadata__":"x"})")) == "header has no '__metadata__' object of strings");
  for (const std::string& value : std::vector<std::string>{"0", "null", "true", "[]", "{}", "1.5"}) {
    CAPTURE(value);
    CHECK(rejection(payload(header_with(metadata({{"round", value}})))) ==
          "header has no '__metadata__' object of strings");
    CHECK(rejection(payload(header_with(metadata({{"extra", value}})))) ==
          "header has no '__metadata__' object of strings");
  }
  CHECK(rejection(payload(header_with(metadata({{"extra", "\"unknown keys are ignored\""}})))).empty());
}

TEST_CASE("schema, kind and round") {
  CHECK(rejection(payload(header_with(metadata({{"schema", ""}})))) ==
        "unsupported schema None (expected 'edgemole/1')");
  CHECK(rejection(payload(header_with(metadata({{"schema", "\"edgemole/2\""}})))) ==
        "unsupported schema 'edgemole/2' (expected 'edgemole/1')");
  CHECK(rejection(payload(header_with(metadata({{"kind", ""}})))) == "unknown message kind None");
  CHECK(rejection(payload(header_with(metadata({{"kind", "\"Task\""}})))) == "unknown message kind 'Task'");
  CHECK(rejection(payload(header_with(metadata({{"round", ""}})))) == "invalid round ''");
  for (const std::string& round :
       std::vector<std::string>{"\"\"", "\"-1\"", "\"+1\"", "\"1e3\"", "\" 1\"", "\"1 \"", "\"1.0\"", "\"0x10\"",
                                "\"1000000001\"", "\"99999999999\"", "\"\\u0661\"", "\"\\uff11\""}) {
    CAPTURE(round);
    CHECK(contains(rejection(payload(header_with(metadata({{"round", round}})))), "invalid round "));
  }
  CHECK(rejection(payload(header_with(metadata({{"round", "\"+1\""}})))) == "invalid round '+1'");
  CHECK(decode(payload(header_with(metadata({{"round", "\"1000000000\""}})))).round == 1000000000);
  CHECK(decode(payload(header_with(metadata({{"round", "\"007\""}})))).round == 7);
  const Message m = decode(payload(header_with(metadata({{"fleet", ""}, {"phase", ""}, {"client", ""}}))));
  CHECK(m.fleet == "");
  CHECK(m.client == "");
}

TEST_CASE("tensor entries: dtype first, then structure, sizes and tiling") {
  const std::string meta = metadata();
  auto reject = [&](const std::string& tensors, const Bytes& data) {
    return rejection(payload(header_with(meta, tensors), data));
  };
  const std::string allowed = ", not one of ['BF16', 'F16', 'F32', 'I32', 'I64']";
  CHECK(reject(R"("t":{"dtype":"F64","shape":[1],"data_offsets":[0,8]})", Bytes(8)) ==
        "tensor 't' has dtype 'F64'" + allowed);
  CHECK(reject(R"("t":{"dtype":"f32","shape":[1],"data_offsets":[0,4]})", Bytes(4)) ==
        "tensor 't' has dtype 'f32'" + allowed);
  CHECK(reject(R"("t":{"dtype":"BOOL","shape":[1],"data_offsets":[0,1]})", Bytes(1)) ==
        "tensor 't' has dtype 'BOOL'" + allowed);
  CHECK(reject(R"("t":{"shape":[1],"data_offsets":[0,4]})", Bytes(4)) == "tensor 't' has dtype None" + allowed);
  CHECK(reject(R"("t":{"dtype":5,"shape":[1],"data_offsets":[0,4]})", Bytes(4)) == "tensor 't' has dtype 5" + allowed);
  CHECK(reject(R"("t":5)", {}) == "tensor 't' has dtype None" + allowed);
  // the first bad dtype in document order is named, before a malformed earlier entry is looked at
  CHECK(reject(R"("z":{"dtype":"F32"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]})", Bytes(1)) ==
        "tensor 'a' has dtype 'U8'" + allowed);

  for (const std::string& entry : std::vector<std::string>{
           R"({"dtype":"F32","data_offsets":[0,4]})", R"({"dtype":"F32","shape":4,"data_offsets":[0,4]})",
           R"({"dtype":"F32","shape":[-1],"data_offsets":[0,4]})",
           R"({"dtype":"F32","shape":[1.0],"data_offsets":[0,4]})",
           R"({"dtype":"F32","shape":[true],"data_offsets":[0,4]})",
           R"({"dtype":"F32","shape":["1"],"data_offsets":[0,4]})", R"({"dtype":"F32","shape":[1]})",
           R"({"dtype":"F32","shape":[1],"data_offsets":[0]})", R"({"dtype":"F32","shape":[1],"data_offsets":[0,4,4]})",
           R"({"dtype":"F32","shape":[1],"data_offsets":[-4,0]})",
           R"({"dtype":"F32","shape":[1],"data_offsets":[0,4.0]})", R"({"dtype":"F32","shape":[1],"data_offsets":{}})",
           R"({"dtype":"F32","shape":[2],"data_offsets":[0,4]})", R"({"dtype":"F32","shape":[1],"data_offsets":[4,8]})",
           R"({"dtype":"F32","shape":[0],"data_offsets":[4,0]})", R"({"dtype":"F32","shape":[1],"data_offsets":[0,4]})",
           R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]})",
           R"({"dtype":"F32","shape":[1],"data_offsets":[18446744073709551612,18446744073709551615]})"}) {
    CAPTURE(entry);
    CHECK(contains(reject("\"t\":" + entry, Bytes(8)), "tensor data is malformed: "));
  }
  // shape vs bytes: 2 elements of F32 are 8 bytes, not 4
  CHECK(contains(reject(R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,4]})", Bytes(4)),
                 "tensor 't' has 4 bytes, not what its shape and dtype need"));
  // a gap before the first tensor, one between two, overlapping ones, trailing bytes, data past the end
  CHECK(contains(reject(R"("t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]})", Bytes(8)), "invalid offset"));
  CHECK(contains(reject(R"("a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]})",
                        Bytes(12)),
                 "invalid offset for tensor 'b'"));
  CHECK(contains(reject(R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]})",
                        Bytes(8)),
                 "invalid offset for tensor 'b'"));
  CHECK(contains(reject(R"("t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})", Bytes(5)),
                 "the tensors cover 4 of the 5 bytes of the data section"));
  CHECK(contains(reject(R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})", Bytes(4)),
                 "ends past the end of the payload"));
  CHECK(contains(reject("", Bytes(1)), "the tensors cover 0 of the 1 bytes"));
  // a huge shape product is refused, even with a zero dimension that makes it empty
  CHECK(contains(reject(R"("t":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]})", {}),
                 "has a shape too large"));
}

TEST_CASE("valid unusual tensors: every dtype, scalars, empty tensors, any order in the data section") {
  const std::string meta = metadata();
  Bytes data;
  for (int i = 0; i < 8; ++i) data.push_back(static_cast<std::uint8_t>(i + 1));  // I64 scalar
  for (const std::uint8_t b : Bytes{0x00, 0x3c, 0x00, 0xc0}) data.push_back(b);  // F16 [1.0, -2.0]
  for (const std::uint8_t b : Bytes{0x80, 0x3f}) data.push_back(b);              // BF16 [1.0]
  for (const std::uint8_t b : Bytes{0xff, 0xff, 0xff, 0xff}) data.push_back(b);  // I32 [-1]
  const Message m = decode(payload(header_with(meta, R"("s":{"dtype":"I64","shape":[],"data_offsets":[0,8]},)"
                                                     R"("z":{"dtype":"F32","shape":[0,3],"data_offsets":[18,18]},)"
                                                     R"("i":{"dtype":"I32","shape":[1],"data_offsets":[14,18]},)"
                                                     R"("h":{"dtype":"F16","shape":[2],"data_offsets":[8,12]},)"
                                                     R"("b":{"dtype":"BF16","shape":[1,1],"data_offsets":[12,14]})"),
                                   data));
  REQUIRE(m.tensors.size() == 5);
  CHECK(m.tensors.at("s").shape.empty());
  CHECK(m.tensors.at("s").i64() == std::vector<std::int64_t>{0x0807060504030201});
  CHECK(m.tensors.at("h").f32() == std::vector<float>{1.0f, -2.0f});
  CHECK(m.tensors.at("b").f32() == std::vector<float>{1.0f});
  CHECK(m.tensors.at("i").i64() == std::vector<std::int64_t>{-1});
  CHECK(m.tensors.at("z").numel() == 0);
  CHECK(m.tensors.at("z").bytes.empty());
  // unknown fields of an entry are ignored, as the reference decoder does
  CHECK(rejection(payload(header_with(meta, R"("t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1})"), Bytes(4)))
            .empty());
}

TEST_CASE("roles and body") {
  const std::string t = R"("t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]})";
  auto reject = [&](const std::map<std::string, std::string>& meta) {
    return rejection(payload(header_with(metadata(meta), t), Bytes(4)));
  };
  CHECK(reject({{"roles", R"("{\"t\":\"head\"}")"}}).empty());
  CHECK(reject({{"roles", ""}}).empty());  // absent: {}
  CHECK(reject({{"roles", R"("{\"u\":\"head\"}")"}}) ==
        "metadata 'roles' must map tensor names in the message to strings");
  CHECK(reject({{"roles", R"("{\"t\":1}")"}}) == "metadata 'roles' must map tensor names in the message to strings");
  CHECK(reject({{"roles", R"("{\"t\":null}")"}}) == "metadata 'roles' must map tensor names in the message to strings");
  CHECK(reject({{"roles", R"("[]")"}}) == "metadata 'roles' is not a JSON object");
  CHECK(contains(reject({{"roles", R"("{")"}}), "metadata 'roles' is not valid JSON ("));

  CHECK(reject({{"body", ""}}).empty());  // absent: {}
  for (const std::string& body :
       std::vector<std::string>{"NaN", "Infinity", "-Infinity", "1e999", "-1e999", "nan", "1e400"}) {
    CAPTURE(body);
    CHECK(contains(reject({{"body", "\"{\\\"a\\\":" + body + "}\""}}), "metadata 'body' is not valid JSON ("));
    CHECK(contains(reject({{"body", "\"{\\\"a\\\":[1," + body + "]}\""}}), "metadata 'body' is not valid JSON ("));
  }
  CHECK(reject({{"body", R"("[]")"}}) == "metadata 'body' is not a JSON object");
  CHECK(reject({{"body", R"("\"x\"")"}}) == "metadata 'body' is not a JSON object");
  CHECK(reject({{"body", R"("null")"}}) == "metadata 'body' is not a JSON object");
  CHECK(contains(reject({{"body", R"("")"}}), "metadata 'body' is not valid JSON ("));
  CHECK(contains(reject({{"body", R"("{\"a\":}")"}}), "metadata 'body' is not valid JSON ("));
  const std::string long_error = reject({{"body", "\"{\\\"" + std::string(300, 'a') + "\\\"\""}});
  CHECK(long_error.size() <= std::string("metadata 'body' is not valid JSON ()").size() + 103);
  // roles are checked before the body (the reference's order)
  CHECK(reject({{"roles", R"("[]")"}, {"body", R"("[]")"}}) == "metadata 'roles' is not a JSON object");
  // the biggest finite numbers and huge integers are fine
  const Message m = decode(payload(header_with(metadata({{"body", R"("{\"a\":1.7976931348623157e308,\"b\":-5e-324,)"
                                                                  R"(\"c\":123456789012345678901234567890}")"}}))));
  CHECK(m.body["a"].get<double>() == std::numeric_limits<double>::max());
  CHECK(finite_number(m.body["c"]));
}

// -- encoding ------------------------------------------------------------------------------------------------------

TEST_CASE("encode and decode round trip every field") {
  Message m;
  m.kind = "update";
  m.fleet = "fleet.1";
  m.round = 1000000000;
  m.phase = "train-B";
  m.client = "dev_1";
  m.body = {
      {"run", "r"}, {"num_samples", 3}, {"text", "caf\xc3\xa9 \"q\" \\ \n"},
      {"x", -0.1},  {"big", 1e300},     {"nested", {{"b", {1, 2.5, nullptr, true}}, {"a", nlohmann::json::object()}}}};
  m.tensors["w"] = f32({2, 2}, {1.0f, -2.0f, 3.5f, 0.0f});
  m.tensors["ranks"] = Tensor::from_i64({2}, {0, 3});
  m.tensors["scalar"] = f32({}, {7.0f});
  m.tensors["empty"] = f32({0, 4}, {});
  Tensor half;
  half.dtype = DType::F16;
  half.shape = {3};
  half.bytes = {0x00, 0x3c, 0x00, 0x40, 0x00, 0x00};
  m.tensors["half"] = half;
  m.roles = {{"w", "lora_B"}, {"ranks", "ranks"}};

  const Bytes bytes = encode(m);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[static_cast<std::size_t>(i)];
  CHECK(n % 8 == 0);
  CHECK(bytes[8] == '{');
  const Message back = decode(bytes);
  CHECK(back.kind == m.kind);
  CHECK(back.fleet == m.fleet);
  CHECK(back.round == m.round);
  CHECK(back.phase == m.phase);
  CHECK(back.client == m.client);
  CHECK(back.body == m.body);
  CHECK(back.roles == m.roles);
  REQUIRE(back.tensors.size() == m.tensors.size());
  for (const auto& [name, tensor] : m.tensors) {
    CAPTURE(name);
    CHECK(back.tensors.at(name).dtype == tensor.dtype);
    CHECK(back.tensors.at(name).shape == tensor.shape);
    CHECK(back.tensors.at(name).bytes == tensor.bytes);
  }
  // body and roles are written compactly with sorted keys and non-ASCII escaped, as json.dumps does
  const Safetensors raw = read_safetensors(bytes.data(), bytes.size());
  CHECK(raw.metadata.at("roles") == R"({"ranks":"ranks","w":"lora_B"})");
  CHECK(contains(raw.metadata.at("body"), R"("text":"caf\u00e9 \"q\" \\ \n")"));
  CHECK(raw.metadata.at("body").rfind(R"({"big":1e+300,"nested":{"a":{},"b":[1,2.5,null,true]},"num_samples":3,)", 0) ==
        0);
  CHECK(raw.metadata.at("schema") == "edgemole/1");
  CHECK(raw.metadata.at("round") == "1000000000");
  // larger elements first in the data section: I64 before F32 before F16
  const Header header = read_header(bytes.data(), bytes.size());
  CHECK(header.order == std::vector<std::string>{"__metadata__", "ranks", "empty", "scalar", "w", "half"});
  CHECK(header.object.at("ranks").at("data_offsets") == nlohmann::json::array({0, 16}));
  CHECK(header.object.at("half").at("data_offsets").at(0) == 16 + 16 + 4);

  // text that is not valid UTF-8 (say, a file name in an error) is replaced, not a failure to send the status
  Message status;
  status.kind = "status";
  status.body = {{"error", "cannot read /data/\xff.csv"}};
  const Message sent = decode(encode(status));
  CHECK(sent.body["error"] == "cannot read /data/\xef\xbf\xbd.csv");
}

TEST_CASE("encode refuses what the decoder would reject") {
  Message m;
  m.kind = "status";
  m.fleet = "demo";
  CHECK_NOTHROW(encode(m));
  auto refuses = [](const Message& bad, const std::string& part) {
    try {
      encode(bad);
    } catch (const ProtocolError& exc) {
      CHECK_MESSAGE(contains(exc.what(), part), exc.what());
      return;
    }
    FAIL("encode accepted it: " << part);
  };
  Message bad = m;
  bad.body["metrics"] = {{"loss", std::nan("")}};
  refuses(bad, "non-finite number at 'metrics.loss'");
  bad = m;
  bad.body["x"] = {1.0, std::numeric_limits<double>::infinity()};
  refuses(bad, "non-finite number at 'x[1]'");
  bad = m;
  bad.body = nlohmann::json::array();
  refuses(bad, "not a JSON object");
  bad = m;
  bad.kind = "nope";
  refuses(bad, "unknown message kind 'nope'");
  bad = m;
  bad.round = -1;
  refuses(bad, "invalid round -1");
  bad = m;
  bad.round = kMaxRound + 1;
  refuses(bad, "invalid round");
  bad = m;
  bad.roles["ghost"] = "head";
  refuses(bad, "roles given for tensors not in the message");
  bad = m;
  bad.tensors["t"] = f32({2}, {1.0f, 2.0f});
  bad.tensors["t"].bytes.pop_back();
  refuses(bad, "tensor 't' has 7 bytes, its shape and dtype need 8");
  bad = m;
  bad.tensors[""] = f32({1}, {1.0f});
  refuses(bad, "invalid tensor name");
  bad = m;
  bad.tensors["__metadata__"] = f32({1}, {1.0f});
  refuses(bad, "invalid tensor name");
  bad = m;
  bad.tensors["t"] = f32({1}, {1.0f});
  bad.tensors["t"].shape = {-1};
  refuses(bad, "negative dimension");
}

TEST_CASE("error texts stay printable, one line and valid UTF-8") {
  CHECK(printable("abc") == "abc");
  CHECK(printable("caf\xc3\xa9") == "caf\xc3\xa9");  // valid UTF-8 is kept
  CHECK(printable("a\xff\xc3"
                  "b") == "a\\xff\\xc3b");
  CHECK(printable("\xed\xa0\x80") == "\\xed\\xa0\\x80");  // an encoded surrogate is not valid UTF-8
  CHECK(printable("\xc0\xaf") == "\\xc0\\xaf");           // nor is an overlong sequence
  CHECK(printable("a\nb\x01\\") == "a\\nb\\x01\\\\");
  CHECK(printable("it's", 200, '\'') == "it\\'s");
  CHECK(printable(std::string(300, 'x'), 10) == "xxxxxxxxxx...");
  CHECK(printable("\xc3\xa9\xc3\xa9\xc3\xa9", 3) == "\xc3\xa9\xc3\xa9...");  // whole characters only
  // a header whose bad JSON is echoed by the parser
  const std::string reason = rejection(payload("{\"__metadata__\":\xff\xfe\n}"));
  CHECK(contains(reason, "header is not valid JSON: "));
  CHECK(reason.find('\n') == std::string::npos);
  CHECK_NOTHROW(nlohmann::json(reason).dump());
  // a body text with a NUL after the object (\u0000 in the metadata string)
  CHECK(contains(rejection(payload(header_with(metadata({{"body", R"("{}\u0000{}")"}})))),
                 "metadata 'body' is not valid JSON (NUL byte at 2)"));
}

TEST_CASE("py_repr shows values as the reference's messages do") {
  CHECK(py_repr("a") == "'a'");
  CHECK(py_repr("it's") == "\"it's\"");
  CHECK(py_repr("a'\"b") == "'a\\'\"b'");
  CHECK(py_repr("x\ny\x01") == "'x\\ny\\x01'");
  CHECK(py_repr(nullptr) == "None");
  CHECK(py_repr(true) == "True");
  CHECK(py_repr(nlohmann::json::array({"a", 1, false})) == "['a', 1, False]");
  CHECK(py_repr(std::string(1000, 'x')).size() < 210);
}

// -- the receiver's checks -----------------------------------------------------------------------------------------

TEST_CASE("check_tensors: names, shapes, dtypes, roles, finite values") {
  const Message m = update_ok();
  SpecMap expected = lora_spec();
  CHECK(check_error(m, expected).empty());

  expected["head.bias"] = spec({2}, DType::F32, "head");
  CHECK(check_error(m, expected) == "tensor names differ from expected: missing ['head.bias'], unexpected []");
  expected["head.bias"].optional = true;
  CHECK(check_error(m, expected).empty());
  expected = lora_spec();
  expected.erase(kB);
  CHECK(check_error(m, expected) == "tensor names differ from expected: missing [], unexpected ['" + kB + "']");
  SpecMap many;
  for (const char* name : {"a", "b", "c", "d"}) many[name] = spec({1});
  CHECK(check_error(m, many) ==
        "tensor names differ from expected: missing ['a', 'b', 'c'], unexpected ['" + kA + "', '" + kB + "']");

  expected = lora_spec();
  expected[kA].shape = {3, 2};
  CHECK(check_error(m, expected) == "tensor '" + kA + "' has shape (2, 3), expected (3, 2)");
  expected[kA].shape = {2, 3, 1};
  CHECK(check_error(m, expected) == "tensor '" + kA + "' has shape (2, 3), expected (2, 3, 1)");
  expected[kA].shape = {std::nullopt, 3};
  expected[kA].bound = 2;
  CHECK(check_error(m, expected).empty());  // 2 is within 1..2
  expected[kA].bound = 1;
  CHECK(check_error(m, expected) == "tensor '" + kA + "' has shape (2, 3), expected (1..1, 3)");
  expected[kA] = spec({6});
  CHECK(check_error(m, expected) == "tensor '" + kA + "' has shape (2, 3), expected (6)");

  expected = lora_spec();
  expected[kB].dtype = DType::F16;
  CHECK(check_error(m, expected) == "tensor '" + kB + "' has dtype F32, expected F16");
  expected = lora_spec();
  expected[kB].role = "lora_A";
  CHECK(check_error(m, expected) == "tensor '" + kB + "' has role 'lora_B', expected 'lora_A'");
  expected[kB].role = "";  // an empty expected role is not checked
  CHECK(check_error(m, expected).empty());
  Message no_roles = m;
  no_roles.roles.clear();
  CHECK(check_error(no_roles, lora_spec()) == "tensor '" + kA + "' has role None, expected 'lora_A'");

  for (const float bad : {std::nanf(""), INFINITY, -INFINITY}) {
    Message nan = m;
    nan.tensors[kA] = f32({2, 3}, {0, 0, 0, 0, 0, bad});
    CHECK(check_error(nan, lora_spec()) == "tensor '" + kA + "' contains NaN or Inf");
  }
}

TEST_CASE("all_finite for every dtype") {
  Tensor t;
  t.shape = {2};
  t.dtype = DType::F16;
  t.bytes = {0x00, 0x3c, 0xff, 0x7b};  // 1.0, 65504 (largest finite)
  CHECK(all_finite(t));
  t.bytes = {0x00, 0x3c, 0x00, 0x7c};  // +inf
  CHECK_FALSE(all_finite(t));
  t.bytes = {0x00, 0xfe, 0x00, 0x3c};  // NaN
  CHECK_FALSE(all_finite(t));
  t.dtype = DType::BF16;
  t.bytes = {0x7f, 0x7f, 0x80, 0x3f};  // largest finite, 1.0
  CHECK(all_finite(t));
  t.bytes = {0x80, 0xff, 0x80, 0x3f};  // -inf
  CHECK_FALSE(all_finite(t));
  t.dtype = DType::I32;
  t.bytes = {0xff, 0xff, 0x80, 0x7f, 0, 0, 0xc0, 0x7f};  // bit patterns of inf/NaN are plain integers here
  CHECK(all_finite(t));
  CHECK(all_finite(f32({1}, {std::numeric_limits<float>::max()})));
  CHECK(all_finite(f32({1}, {std::numeric_limits<float>::denorm_min()})));
}

TEST_CASE("rank slices: a slice with its increasing indices, never one without the other") {
  // adapter "m" with r = 4, d_out = 3: phase train-B sends m.lora_B (3, k) and m.ranks (k,)
  const SpecMap expected = {{"m.lora_B", spec({3, std::nullopt}, DType::F32, "lora_B", true, 4)},
                            {"m.ranks", spec({std::nullopt}, DType::I64, kRanksRole, true, 4)},
                            {"head.bias", spec({2}, DType::F32, "head")}};
  auto message = [](std::int64_t k, std::optional<std::vector<std::int64_t>> ranks, bool slice = true) {
    Message m;
    m.kind = "update";
    m.tensors["head.bias"] = f32({2}, {0.0f, 1.0f});
    m.roles["head.bias"] = "head";
    if (slice) {
      m.tensors["m.lora_B"] = f32({3, k}, std::vector<float>(static_cast<std::size_t>(3 * k), 0.5f));
      m.roles["m.lora_B"] = "lora_B";
    }
    if (ranks) {
      m.tensors["m.ranks"] = Tensor::from_i64({static_cast<std::int64_t>(ranks->size())}, *ranks);
      m.roles["m.ranks"] = kRanksRole;
    }
    return m;
  };
  CHECK(check_error(message(2, std::vector<std::int64_t>{0, 2}), expected).empty());
  CHECK(check_error(message(4, std::vector<std::int64_t>{0, 1, 2, 3}), expected).empty());
  CHECK(check_error(message(1, std::vector<std::int64_t>{3}), expected).empty());
  CHECK(check_error(message(1, std::nullopt, false), expected).empty());  // no rank selected: neither is sent
  CHECK(check_error(message(2, std::nullopt), expected) == "'m': a rank slice and its '.ranks' must be sent together");
  CHECK(check_error(message(2, std::vector<std::int64_t>{0, 1}, false), expected) ==
        "'m': a rank slice and its '.ranks' must be sent together");
  const std::string indices = "'m.ranks' must hold 2 increasing rank indices in [0, 4)";
  CHECK(check_error(message(2, std::vector<std::int64_t>{2, 0}), expected) == indices);
  CHECK(check_error(message(2, std::vector<std::int64_t>{1, 1}), expected) == indices);
  CHECK(check_error(message(2, std::vector<std::int64_t>{0, 4}), expected) == indices);
  CHECK(check_error(message(2, std::vector<std::int64_t>{-1, 0}), expected) == indices);
  CHECK(check_error(message(2, std::vector<std::int64_t>{0}), expected) == indices);  // count differs from k
  CHECK(contains(check_error(message(5, std::vector<std::int64_t>{0, 1, 2, 3, 4}), expected),
                 "has shape (3, 5), expected (3, 1..4)"));

  // FlexLoRA: both factors of an adapter variable, with the same k
  const SpecMap flex = {{"p.lora_A", spec({std::nullopt, 5}, DType::F32, "lora_A", false, 4)},
                        {"p.lora_B", spec({3, std::nullopt}, DType::F32, "lora_B", false, 4)}};
  Message m;
  m.tensors["p.lora_A"] = f32({2, 5}, std::vector<float>(10, 0.0f));
  m.tensors["p.lora_B"] = f32({3, 2}, std::vector<float>(6, 0.0f));
  m.roles = {{"p.lora_A", "lora_A"}, {"p.lora_B", "lora_B"}};
  CHECK(check_error(m, flex).empty());
  m.tensors["p.lora_B"] = f32({3, 1}, std::vector<float>(3, 0.0f));
  CHECK(check_error(m, flex) == "'p': the factors of one adapter must have the same rank, got [1, 2]");
}

TEST_CASE("validate_assignment") {
  const Message good = decode(vec("assign-train"));
  const SpecMap expected = lora_spec();
  auto error = [&](const Message& m, std::int64_t after_round = 0) {
    try {
      validate_assignment(m, "demo", kRun, "phone-1", after_round, expected);
    } catch (const ProtocolError& exc) {
      return std::string(exc.what());
    }
    return std::string();
  };
  CHECK(error(good).empty());
  Message m = good;
  m.kind = "update";
  CHECK(error(m) == "expected a assign message, got update");
  m = good;
  m.fleet = "other";
  CHECK(error(m) == "message is for fleet 'other', not 'demo'");
  m = good;
  m.body["run"] = "old";
  CHECK(error(m) == "message belongs to run 'old', not the current run '5f3a9c0e12ab'");
  m.body["run"] = 5;
  CHECK(error(m) == "message belongs to run 5, not the current run '5f3a9c0e12ab'");
  m.body.erase("run");
  CHECK(error(m) == "message belongs to run None, not the current run '5f3a9c0e12ab'");
  m = good;
  m.client = "phone-2";
  CHECK(error(m) == "assignment is addressed to 'phone-2', not 'phone-1'");
  CHECK(error(good, 1) == "stale assignment for round 1 (already past round 1)");
  CHECK(error(good, 2) == "stale assignment for round 1 (already past round 2)");
  for (const char* phase : {"train", "train-A", "train-B", "eval"}) {
    m = good;
    m.phase = phase;
    CHECK(error(m).empty());
  }
  m.phase = "done";
  CHECK(error(m) == "unknown phase 'done' in assignment");
  m = good;
  m.tensors.erase(kB);
  CHECK(contains(error(m), "tensor names differ from expected"));
}

TEST_CASE("validate_update: num_samples and metrics") {
  auto error = [](const std::string& body_json) {
    Message m = update_ok();
    m.body = nlohmann::json::parse(body_json);
    m.body["run"] = kRun;
    try {
      validate_update(m, "demo", kRun, 1, "train", "phone-1", {"phone-1"}, lora_spec());
    } catch (const ProtocolError& exc) {
      return std::string(exc.what());
    }
    return std::string();
  };
  CHECK(error(R"({"num_samples": 1})").empty());
  CHECK(error(R"({"num_samples": 1000000000, "metrics": {"a": 1, "b": -0.5}})").empty());
  const std::string range = "num_samples must be an integer in [1, 1000000000], got ";
  CHECK(error(R"({"num_samples": 0})") == range + "0");
  CHECK(error(R"({"num_samples": -3})") == range + "-3");
  CHECK(error(R"({"num_samples": 1000000001})") == range + "1000000001");
  CHECK(error(R"({"num_samples": 2.0})") == range + "2.0");
  CHECK(error(R"({"num_samples": true})") == range + "True");
  CHECK(error(R"({"num_samples": "5"})") == range + "'5'");
  CHECK(error(R"({})") == range + "None");
  CHECK(error(R"({"num_samples": 1, "metrics": {"a": true}})") == "metrics must be an object of finite numbers");
  CHECK(error(R"({"num_samples": 1, "metrics": {"a": "1"}})") == "metrics must be an object of finite numbers");
  CHECK(error(R"({"num_samples": 1, "metrics": [1]})") == "metrics must be an object of finite numbers");

  Message m = update_ok();
  CHECK_THROWS_WITH_AS(validate_update(m, "demo", kRun, 2, "train", "phone-1", {"phone-1"}, lora_spec()),
                       "stale or future round 1 (open round is 2)", ProtocolError);
  CHECK_THROWS_WITH_AS(validate_update(m, "demo", kRun, 1, "eval", "phone-1", {"phone-1"}, lora_spec()),
                       "phase 'train' does not match the open phase 'eval'", ProtocolError);
  CHECK_THROWS_WITH_AS(validate_update(m, "demo", kRun, 1, "train", "phone-2", {"phone-1"}, lora_spec()),
                       "client field 'phone-1' does not match topic client 'phone-2'", ProtocolError);
  CHECK_THROWS_WITH_AS(validate_update(m, "demo", kRun, 1, "train", "phone-1", {"phone-2"}, lora_spec()),
                       "client 'phone-1' is not selected for round 1", ProtocolError);
}

TEST_CASE("finite_number") {
  CHECK(finite_number(1));
  CHECK(finite_number(-1));
  CHECK(finite_number(1.5));
  CHECK(finite_number(nlohmann::json::parse("18446744073709551615")));
  CHECK_FALSE(finite_number(std::nan("")));
  CHECK_FALSE(finite_number(std::numeric_limits<double>::infinity()));
  CHECK_FALSE(finite_number(true));
  CHECK_FALSE(finite_number("1"));
  CHECK_FALSE(finite_number(nullptr));
}

// -- topics and names ------------------------------------------------------------------------------------------------

TEST_CASE("topics of a fleet") {
  const Topics t("demo");
  CHECK(t.base() == "edgemole/demo");
  CHECK(t.task() == "edgemole/demo/task");
  CHECK(t.round() == "edgemole/demo/round");
  CHECK(t.metrics() == "edgemole/demo/metrics");
  CHECK(t.assign("phone-1") == "edgemole/demo/clients/phone-1/assign");
  CHECK(t.update("phone-1") == "edgemole/demo/clients/phone-1/update");
  CHECK(t.status("phone-1") == "edgemole/demo/clients/phone-1/status");
  CHECK(t.all_updates() == "edgemole/demo/clients/+/update");
  CHECK(t.all_status() == "edgemole/demo/clients/+/status");
  CHECK(t.device_mqtt_id("phone-1") == "edgemole:demo:device:phone-1");
  CHECK(t.mqtt_client_id("aggregator") == "edgemole:demo:aggregator");
  CHECK(Topics().task() == "edgemole/default/task");
  CHECK(Topics("f", "site1/edgemole").round() == "site1/edgemole/f/round");

  CHECK(t.parse_client_topic("edgemole/demo/clients/phone-1/update") ==
        std::make_optional(std::make_pair(std::string("phone-1"), std::string("update"))));
  CHECK_FALSE(t.parse_client_topic("edgemole/demo/clients/phone-1/update/x"));
  CHECK_FALSE(t.parse_client_topic("edgemole/demo/clients/phone-1"));
  CHECK_FALSE(t.parse_client_topic("edgemole/demo/clients/-bad/update"));
  CHECK_FALSE(t.parse_client_topic("edgemole/other/clients/phone-1/update"));
  CHECK_FALSE(t.parse_client_topic("edgemole/demo/task"));
}

TEST_CASE("names and prefixes") {
  for (const std::string& good : std::vector<std::string>{"a", "A.b_c-1", "0", std::string(64, 'x'), "phone-1"}) {
    CAPTURE(good);
    CHECK(valid_name(good));
    CHECK_NOTHROW(check_name(good, "client id"));
  }
  for (const std::string& bad :
       std::vector<std::string>{"", std::string(65, 'x'), "-a", "_a", ".a", "a b", "a/b", "a+b", "a#b", "a:b",
                                "caf\xc3\xa9", std::string("a\0b", 3), "a\n"}) {
    CAPTURE(bad);
    CHECK_FALSE(valid_name(bad));
    CHECK_THROWS_AS(check_name(bad, "client id"), ConfigError);
  }
  CHECK_THROWS_WITH_AS(check_name("a b", "fleet name"),
                       "invalid fleet name 'a b': use 1-64 characters from letters, digits, '_', '.', '-' "
                       "(starting with a letter or digit)",
                       ConfigError);
  CHECK_THROWS_AS(Topics("a/b"), ConfigError);
  for (const std::string& prefix : std::vector<std::string>{"", "/a", "a/", "a//b", "a/+", "#", "a/b#"}) {
    CAPTURE(prefix);
    CHECK_THROWS_AS(Topics("demo", prefix), ConfigError);
  }
  CHECK_THROWS_WITH_AS(Topics("demo", "a//b"), "invalid topic prefix 'a//b': no empty levels, '+' or '#'", ConfigError);
  CHECK_NOTHROW(Topics("demo", "a/b/c"));
}
