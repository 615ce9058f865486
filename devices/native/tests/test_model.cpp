// The device-side math of the federated methods and the artifact checks, on plain buffers (no runtime).
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>

#include "amole.h"
#include "config.h"
#include "errors.h"
#include "lora_a2.h"
#include "manifest.h"
#include "optimizer.h"
#include "wire_state.h"

using namespace edgemole;
using nlohmann::json;

namespace {

Tensor matrix(std::int64_t rows, std::int64_t cols, std::vector<float> values) {
  return Tensor::from_f32({rows, cols}, values);
}

}  // namespace

TEST_CASE("rank scores are the products of the probe's change and the frozen factor's norms") {
  // one adapter, r = 2, d_in = 2, d_out = 2
  TensorMap global{{"m.lora_A", matrix(2, 2, {3, 4, 0, 1})}, {"m.lora_B", matrix(2, 2, {0, 0, 0, 0})}};
  TensorMap probed = global;
  probed["m.lora_B"] = matrix(2, 2, {1, 0, 0, 2});  // dB columns: (1, 0) and (0, 2)
  const auto scores = rank_scores(global, probed, {"m"}, kTrainB);
  CHECK(scores.at("m")[0] == doctest::Approx(1.0 * 5.0));
  CHECK(scores.at("m")[1] == doctest::Approx(2.0 * 1.0));
  // A round: ||B[:, i]|| * ||dA[i, :]|| is zero where B's column is zero
  TensorMap probed_a = global;
  probed_a["m.lora_A"] = matrix(2, 2, {4, 4, 0, 3});
  const auto a_scores = rank_scores(global, probed_a, {"m"}, kTrainA);
  CHECK(a_scores.at("m")[0] == 0.0f);
  CHECK(a_scores.at("m")[1] == 0.0f);
}

TEST_CASE("the global top-k over all adapters may leave one adapter without a rank; ties go to order") {
  std::map<std::string, std::vector<float>> scores{{"a", {0.5f, 0.1f}}, {"b", {0.9f, 0.7f}}};
  const Selection two = select_ranks(scores, 2);
  CHECK(two.at("a").empty());
  CHECK(two.at("b") == std::vector<std::int64_t>{0, 1});
  std::map<std::string, std::vector<float>> ties{{"a", {0.0f, 0.0f}}, {"b", {0.0f, 0.0f}}};
  const Selection tied = select_ranks(ties, 3);
  CHECK(tied.at("a") == std::vector<std::int64_t>{0, 1});
  CHECK(tied.at("b") == std::vector<std::int64_t>{0});
  CHECK_THROWS(select_ranks(scores, -1));
}

TEST_CASE("masks hold unselected ranks and slices carry the selected ones with their indices") {
  TensorMap global{{"m.lora_A", matrix(2, 3, {1, 1, 1, 2, 2, 2})}, {"m.lora_B", matrix(3, 2, {0, 0, 0, 0, 0, 0})}};
  TensorMap now = global;
  now["m.lora_B"] = matrix(3, 2, {1, 2, 3, 4, 5, 6});
  const Selection sel{{"m", {1}}};
  hold_unselected(now, global, sel, kTrainB);
  CHECK(now.at("m.lora_B").f32() == std::vector<float>{0, 2, 0, 4, 0, 6});
  const TensorMap up = encode_slices(now, sel, kTrainB);
  CHECK(up.at("m.lora_B").shape == std::vector<std::int64_t>{3, 1});
  CHECK(up.at("m.lora_B").f32() == std::vector<float>{2, 4, 6});
  CHECK(up.at("m.ranks").i64() == std::vector<std::int64_t>{1});
  const TensorMap a_up = encode_slices(global, Selection{{"m", {0}}}, kTrainA);
  CHECK(a_up.at("m.lora_A").f32() == std::vector<float>{1, 1, 1});
  CHECK(encode_slices(global, Selection{{"m", {}}}, kTrainA).empty());
  CHECK_THROWS_AS(active_factor("train"), ProtocolError);
}

TEST_CASE("adapter prefixes and modules of plain LoRA and AMoLE names") {
  TensorMap state{{"q.expert.3.lora_A", {}}, {"q.expert.3.lora_B", {}}, {"q.shared.lora_A", {}},
                  {"q.shared.lora_B", {}},   {"q.router", {}},          {"head.weight", {}}};
  CHECK(adapter_prefixes(state) == std::vector<std::string>{"q.expert.3", "q.shared"});
  CHECK(adapter_module("q.expert.3") == "q");
  CHECK(adapter_module("q.shared") == "q");
  CHECK(adapter_module("layer.0.query") == "layer.0.query");
}

TEST_CASE("FlexLoRA keeps the leading ranks") {
  TensorMap s{{"m.lora_A", matrix(2, 2, {1, 2, 3, 4})}, {"m.lora_B", matrix(2, 2, {5, 6, 7, 8})}};
  const TensorMap t = truncate_ranks(s, {"m"}, 1);
  CHECK(t.at("m.lora_A").f32() == std::vector<float>{1, 2, 0, 0});
  CHECK(t.at("m.lora_B").f32() == std::vector<float>{5, 0, 7, 0});
  const TensorMap l = leading_ranks(s, {"m"}, 1);
  CHECK(l.at("m.lora_A").shape == std::vector<std::int64_t>{1, 2});
  CHECK(l.at("m.lora_B").f32() == std::vector<float>{5, 7});
}

TEST_CASE("AdamW's first step moves every entry by lr against the gradient's sign (plus decoupled decay)") {
  std::vector<float> p{1.0f, -1.0f, 0.5f};
  const std::vector<float> g{0.3f, -2.0f, 0.0f};
  AdamWOptions options;
  options.weight_decay = 0.1;
  AdamW adamw({ParamSlot{p.data(), p.size(), 0.01}}, options);
  adamw.step({g.data()});
  CHECK(p[0] == doctest::Approx(1.0 * (1 - 0.001) - 0.01).epsilon(1e-5));
  CHECK(p[1] == doctest::Approx(-1.0 * (1 - 0.001) + 0.01).epsilon(1e-5));
  CHECK(p[2] == doctest::Approx(0.5 * (1 - 0.001)).epsilon(1e-6));
  std::vector<float> q{1.0f};
  const std::vector<float> h{2.0f};
  Sgd sgd({ParamSlot{q.data(), 1, 0.1}}, 0.5);
  sgd.step({h.data()});
  CHECK(q[0] == doctest::Approx(1.0 - 0.1 * (2.0 + 0.5)));
}

TEST_CASE("AMoLE experts go into the first slots in id order, the rest are zeroed and masked off") {
  // one module, 3 slots, r = 1, d_in = 2, d_out = 1
  std::vector<float> ea(6, 9.0f), eb(3, 9.0f), sa(2), sb(1), router(2), head(2);
  std::vector<ParamView> params{
      {"q.experts_A", "lora_A", {3, 1, 2}, ea.data(), 6}, {"q.experts_B", "lora_B", {3, 1, 1}, eb.data(), 3},
      {"q.shared_A", "lora_A", {1, 2}, sa.data(), 2},     {"q.shared_B", "lora_B", {1, 1}, sb.data(), 1},
      {"q.router", "router", {1, 2}, router.data(), 2},   {"head.weight", "head", {1, 2}, head.data(), 2}};
  WireState wire(params, {"q"}, 3, 5);
  const json body = {{"experts", {{"q", {4, 1}}}}};
  const SpecMap spec = wire.assignment_spec(body);
  CHECK(spec.count("q.expert.1.lora_A") == 1);
  CHECK(spec.count("q.expert.4.lora_B") == 1);
  CHECK(spec.at("q.router").role == "router");
  CHECK(spec.at("head.weight").role == "head");
  TensorMap in{{"q.expert.1.lora_A", matrix(1, 2, {1, 2})}, {"q.expert.1.lora_B", matrix(1, 1, {3})},
               {"q.expert.4.lora_A", matrix(1, 2, {4, 5})}, {"q.expert.4.lora_B", matrix(1, 1, {6})},
               {"q.shared.lora_A", matrix(1, 2, {7, 8})},   {"q.shared.lora_B", matrix(1, 1, {9})},
               {"q.router", matrix(1, 2, {10, 11})},        {"head.weight", matrix(1, 2, {12, 13})}};
  wire.load(in, body);
  CHECK(ea == std::vector<float>{1, 2, 4, 5, 0, 0});
  CHECK(eb == std::vector<float>{3, 6, 0});
  CHECK(wire.slot_mask() == std::vector<std::uint8_t>{1, 1, 0});
  Roles roles;
  const TensorMap out = wire.state(body, &roles);
  CHECK(out.size() == in.size());
  CHECK(out.at("q.expert.4.lora_A").f32() == std::vector<float>{4, 5});
  CHECK(roles.at("q.expert.4.lora_A") == "lora_A");
  CHECK_THROWS_AS(wire.expert_sets(json{{"experts", {{"q", {1, 1}}}}}), ProtocolError);
  CHECK_THROWS_AS(wire.expert_sets(json{{"experts", {{"q", {5}}}}}), ProtocolError);
  CHECK_THROWS_AS(wire.expert_sets(json{{"experts", {{"q", {0, 1, 2, 3}}}}}), ProtocolError);
  CHECK_THROWS_AS(wire.expert_sets(json{{"experts", {{"k", {0}}}}}), ProtocolError);
  CHECK_THROWS_AS(wire.expert_sets(json::object()), ProtocolError);
}

TEST_CASE("RSEA embeddings are token means; DP noise is seeded and never grows the norm") {
  RseaSums sums({"q"}, 2, 2);
  const std::vector<float> token{2, 4}, slots{2, 2, 6, 6}, counts{2};
  sums.add(token.data(), slots.data(), counts.data());
  const TensorMap e = sums.finish({{"q", {7}}});
  CHECK(e.at("q.embed.token").f32() == std::vector<float>{1, 2});
  CHECK(e.at("q.embed.expert.7").f32() == std::vector<float>{1, 1});
  CHECK(e.size() == 2);
  const TensorMap a = privatize(e, 1.0, 42), b = privatize(e, 1.0, 42), c = privatize(e, 1.0, 43);
  CHECK(a.at("q.embed.token").f32() == b.at("q.embed.token").f32());
  CHECK(a.at("q.embed.token").f32() != c.at("q.embed.token").f32());
  for (const auto& item : a) {
    double clean = 0, noisy = 0;
    for (float v : e.at(item.first).f32()) clean += double(v) * v;
    for (float v : item.second.f32()) noisy += double(v) * v;
    CHECK(std::sqrt(noisy) <= std::sqrt(clean) * (1 + 1e-6));
  }
}

TEST_CASE("the task is parsed as strictly as the Python client parses it") {
  const json task = {
      {"labels", {"a", "b"}},
      {"method", "fedamole-a2"},
      {"seed", 3},
      {"model", {{"name", "m"}, {"max_length", 16}}},
      {"lora", {{"r", 4}, {"alpha", 8}, {"dropout", 0.0}, {"target_modules", {"query"}}, {"train_head", true}}},
      {"train", {{"local_steps", 2}, {"lr", 0.01}, {"dropout", false}}},
      {"amole", {{"experts", 4}, {"slots", 3}}}};
  const TaskSpec t = parse_task(task);
  CHECK(t.uses_experts());
  CHECK(t.alternating());
  CHECK(t.lora.alpha == 8.0);
  CHECK(t.amole.slots == 3);
  json bad = task;
  bad["lora"]["rank"] = 4;
  CHECK_THROWS_WITH_AS(parse_task(bad), doctest::Contains("unknown key 'task.lora.rank'"), ConfigError);
  bad = task;
  bad["train"]["local_steps"] = 2.5;
  CHECK_THROWS_WITH_AS(parse_task(bad), doctest::Contains("task.train.local_steps must be an integer"), ConfigError);
  bad = task;
  bad["labels"] = {"a"};
  CHECK_THROWS_AS(parse_task(bad), ConfigError);
  bad = task;
  bad["method"] = "fedprox";
  CHECK_THROWS_AS(parse_task(bad), ConfigError);
  bad = task;
  bad["train"]["dropout"] = 1;
  CHECK_THROWS_AS(parse_task(bad), ConfigError);
}

TEST_CASE("device config: unknown keys, wrong types and missing fields are one-line errors") {
  const std::string path = "edgemole-test-device-config.json";
  {
    std::ofstream out(path);
    out << R"({"broker": "mqtt://127.0.0.1:1883", "client_id": "pi-1", "artifact": "a", "data": "d.csv",
               "threads": 2})";
  }
  DeviceConfig c = read_device_config(path);
  CHECK(c.threads == 2);
  check_device_config(c);
  set_device_option(c, "upload_rank", "3");
  CHECK(c.upload_rank == 3);
  CHECK_THROWS_AS(set_device_option(c, "upload_rank", "three"), ConfigError);
  CHECK_THROWS_AS(set_device_option(c, "colour", "red"), ConfigError);
  CHECK(c.val_fraction == 0.1);
  set_device_option(c, "val_fraction", "0");
  check_device_config(c);
  for (const char* bad : {"1", "-0.1", "1.5"}) {
    set_device_option(c, "val_fraction", bad);
    CHECK_THROWS_WITH_AS(check_device_config(c), doctest::Contains("val_fraction must be in [0, 1)"), ConfigError);
  }
  set_device_option(c, "val_fraction", "0.1");
  {
    std::ofstream out(path);
    out << R"({"broker": 5})";
  }
  CHECK_THROWS_WITH_AS(read_device_config(path), doctest::Contains("broker must be a string"), ConfigError);
  std::remove(path.c_str());
  CHECK_THROWS_AS(read_device_config("no-such-file.json"), ConfigError);
  DeviceConfig empty;
  CHECK_THROWS_WITH_AS(check_device_config(empty), doctest::Contains("no broker"), ConfigError);
}

TEST_CASE("an artifact folder without a manifest is refused with one line") {
  CHECK_THROWS_WITH_AS(read_manifest("no-such-artifact"), doctest::Contains("no manifest.json"), ArtifactError);
}
