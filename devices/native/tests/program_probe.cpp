// edgemole-program-probe ARTIFACT_DIR: loads an edgemole artifact's program.pte + base.ptd with ExecuTorch's Module,
// runs its training metadata methods and one `forward` on constant inputs of the manifest's shapes, and prints one
// JSON line (loss, gradient and parameter counts, a gradient checksum). It depends on nothing but the runtime, so it
// shows that a cross-built runtime (aarch64 under qemu, a board, a phone) gives the host's numbers before the client
// itself is involved.
#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor_ptr.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "errors.h"

namespace {

using executorch::aten::ScalarType;
using executorch::extension::TensorPtr;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;
using json = nlohmann::json;

// An input tensor and the storage it points into (the TensorPtr does not own it).
struct Input {
  std::string name;
  ScalarType type;
  std::vector<std::int32_t> sizes;
  std::vector<std::int64_t> i64;
  std::vector<std::uint8_t> flags;
  TensorPtr tensor;
};

Input make_input(std::string name, std::vector<std::int32_t> sizes, ScalarType type, std::int64_t value) {
  Input in{std::move(name), type, std::move(sizes), {}, {}, nullptr};
  std::size_t n = 1;
  for (std::int32_t s : in.sizes) n *= static_cast<std::size_t>(s);
  void* data = nullptr;
  if (type == ScalarType::Bool) {
    in.flags.assign(n, static_cast<std::uint8_t>(value != 0));
    data = in.flags.data();
  } else {
    in.i64.assign(n, value);
    data = in.i64.data();
  }
  in.tensor = executorch::extension::make_tensor_ptr(in.sizes, data, type);
  return in;
}

std::string error_text(Error error) { return "runtime error " + std::to_string(static_cast<int>(error)); }

std::vector<EValue> run(Module& module, const std::string& method, const std::vector<EValue>& inputs) {
  auto result = module.execute(method, inputs);
  if (!result.ok()) throw edgemole::ArtifactError("cannot run method " + method + ": " + error_text(result.error()));
  return std::move(result.get());
}

std::int64_t run_index(Module& module, const std::string& method) {
  std::vector<EValue> out = run(module, method, {});
  if (out.size() != 1 || !out[0].isInt()) throw edgemole::ArtifactError(method + " does not return one integer");
  return out[0].toInt();
}

json read_manifest(const std::string& dir) {
  std::ifstream in(dir + "/manifest.json");
  if (!in) throw edgemole::ArtifactError("no manifest.json in " + dir);
  try {
    return json::parse(in);
  } catch (const json::exception& exc) {
    throw edgemole::ArtifactError("manifest.json is not valid JSON: " + edgemole::first_line(exc.what()));
  }
}

// Inputs in the program's order: input_ids, attention_mask, labels[, slot_mask], checked against its method meta.
std::vector<Input> make_inputs(const json& manifest, Module& module) {
  const json& shape = manifest.at("shape");
  const auto batch = shape.at("batch_size").get<std::int32_t>();
  const auto length = shape.at("max_length").get<std::int32_t>();
  const bool causal = manifest.value("task", std::string("classify")) == "causal-lm";
  std::vector<Input> inputs;
  inputs.push_back(make_input("input_ids", {batch, length}, ScalarType::Long, 0));
  inputs.push_back(make_input("attention_mask", {batch, length}, ScalarType::Long, 1));
  std::vector<std::int32_t> label_sizes{batch};
  if (causal) label_sizes.push_back(length);
  inputs.push_back(make_input("labels", label_sizes, ScalarType::Long, 0));
  if (manifest.value("adapter", std::string()) == "amole") {
    const auto layers = static_cast<std::int32_t>(shape.at("amole_modules").size());
    inputs.push_back(make_input("slot_mask", {layers, shape.at("slots").get<std::int32_t>()}, ScalarType::Bool, 1));
  }
  auto meta = module.method_meta("forward");
  if (!meta.ok()) throw edgemole::ArtifactError("the program has no forward method: " + error_text(meta.error()));
  if (meta->num_inputs() != inputs.size()) {
    throw edgemole::ArtifactError("forward takes " + std::to_string(meta->num_inputs()) +
                                  " inputs, the manifest says " + std::to_string(inputs.size()));
  }
  for (std::size_t i = 0; i < inputs.size(); ++i) {
    auto tensor_meta = meta->input_tensor_meta(i);
    if (!tensor_meta.ok()) throw edgemole::ArtifactError("forward input " + std::to_string(i) + " is not a tensor");
    auto sizes = tensor_meta->sizes();
    bool same = tensor_meta->scalar_type() == inputs[i].type && sizes.size() == inputs[i].sizes.size();
    for (std::size_t d = 0; same && d < sizes.size(); ++d) same = sizes[d] == inputs[i].sizes[d];
    if (!same) throw edgemole::ArtifactError("forward input " + inputs[i].name + " differs from the manifest's shape");
  }
  return inputs;
}

json probe(const std::string& dir) {
  const json manifest = read_manifest(dir);
  const std::string program = dir + "/" + manifest.at("program").at("file").get<std::string>();
  const std::string data = dir + "/" + manifest.at("data").at("file").get<std::string>();
  Module module(program, data);
  if (module.load() != Error::Ok) throw edgemole::ArtifactError("cannot load " + program);

  const std::int64_t gradients_at = run_index(module, "__et_training_gradients_index_forward");
  const std::int64_t parameters_at = run_index(module, "__et_training_parameters_index_forward");
  std::vector<std::string> names;
  for (const EValue& value : run(module, "__et_training_fqn_forward", {})) {
    if (value.isString()) names.emplace_back(value.toString());
  }

  std::vector<Input> inputs = make_inputs(manifest, module);
  std::vector<EValue> values;
  for (const Input& in : inputs) values.emplace_back(*in.tensor);
  const auto start = std::chrono::steady_clock::now();
  std::vector<EValue> out = run(module, "forward", values);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  const auto n_out = static_cast<std::int64_t>(out.size());
  if (n_out == 0 || !out[0].isTensor() || gradients_at < 1 || gradients_at > parameters_at || parameters_at > n_out) {
    throw edgemole::ArtifactError("forward's outputs do not match the training indices");
  }
  const auto& loss = out[0].toTensor();
  if (loss.scalar_type() != ScalarType::Float || loss.numel() != 1) {
    throw edgemole::ArtifactError("the loss is not one float");
  }
  double grad_sq = 0.0;
  for (std::int64_t i = gradients_at; i < parameters_at; ++i) {
    const auto& g = out[static_cast<std::size_t>(i)].toTensor();
    const float* v = g.const_data_ptr<float>();
    for (std::int64_t k = 0; k < static_cast<std::int64_t>(g.numel()); ++k) grad_sq += double(v[k]) * double(v[k]);
  }
  return json{{"loss", static_cast<double>(loss.const_data_ptr<float>()[0])},
              {"gradients", parameters_at - gradients_at},
              {"parameters", n_out - parameters_at},
              {"gradients_index", gradients_at},
              {"parameters_index", parameters_at},
              {"outputs", n_out},
              {"gradient_sq_sum", grad_sq},
              {"fqn", names},
              {"adapter", manifest.value("adapter", std::string())},
              {"forward_s", seconds}};
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s ARTIFACT_DIR\n", argv[0]);
    return 2;
  }
  try {
    std::printf("%s\n", probe(argv[1]).dump().c_str());
    return 0;
  } catch (const std::exception& exc) {
    std::fprintf(stderr, "error: %s\n", edgemole::first_line(exc.what()).c_str());
    return 1;
  }
}
