#include "program.h"

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

#include <map>

#include "errors.h"

// The wheel ships the thread pool's library but not its header: the two calls the client makes.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(std::uint32_t num_threads);
  std::size_t get_thread_count() const;
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

namespace edgemole {

namespace et = executorch::extension;
using executorch::aten::ScalarType;
using executorch::runtime::EValue;

namespace {

const char* kMethod = "forward";

std::string error_text(executorch::runtime::Error error) {
  return "runtime error " + std::to_string(static_cast<int>(error));
}

std::vector<EValue> call(et::Module& module, const std::string& method, const std::vector<EValue>& inputs,
                         const std::string& directory) {
  auto result = module.execute(method, inputs);
  if (!result.ok()) {
    throw ArtifactError(directory + ": the ExecuTorch runtime cannot run method '" + method + "' (" +
                        error_text(result.error()) + ")");
  }
  return std::move(result.get());
}

}  // namespace

void set_runtime_threads(std::int64_t threads) {
  auto* pool = et::threadpool::get_threadpool();
  if (pool != nullptr && threads >= 1 && pool->get_thread_count() != static_cast<std::size_t>(threads)) {
    pool->_unsafe_reset_threadpool(static_cast<std::uint32_t>(threads));
  }
}

Program::Program(const Manifest& manifest, std::int64_t threads) : manifest_(manifest) {
  set_runtime_threads(threads);
  const std::string pte = manifest.path(manifest.program.file), ptd = manifest.path(manifest.data.file);
  // Mmap: the frozen base is mapped once from base.ptd for both methods (File mode reads a copy per method).
  module_ = std::make_unique<et::Module>(pte, ptd, et::Module::LoadMode::Mmap);
  const auto loaded = module_->load_method(kMethod);
  if (loaded != executorch::runtime::Error::Ok) {
    throw ArtifactError(manifest.directory + ": the ExecuTorch runtime cannot load the program (" + error_text(loaded) +
                        ")");
  }
  const auto grads = call(*module_, std::string("__et_training_gradients_index_") + kMethod, {}, manifest.directory);
  const auto params = call(*module_, std::string("__et_training_parameters_index_") + kMethod, {}, manifest.directory);
  const auto names = call(*module_, std::string("__et_training_fqn_") + kMethod, {}, manifest.directory);
  if (grads.empty() || !grads[0].isInt() || params.empty() || !params[0].isInt()) {
    throw ArtifactError(manifest.directory + ": the program is not a joint training graph (no training metadata)");
  }
  gradients_start_ = static_cast<std::size_t>(grads[0].toInt());
  parameters_start_ = static_cast<std::size_t>(params[0].toInt());
  std::map<std::string, std::size_t> position;
  for (std::size_t i = 0; i < names.size(); ++i) {
    if (!names[i].isString()) throw ArtifactError(manifest.directory + ": malformed training metadata");
    position[std::string(names[i].toString())] = i;
  }
  if (position.size() != manifest.tensors.size() || parameters_start_ - gradients_start_ != position.size()) {
    throw ArtifactError(manifest.directory + ": the program's trainable tensors differ from its manifest");
  }
  for (const TensorEntry& t : manifest.tensors) {
    const auto it = position.find(t.name);
    if (it == position.end()) {
      throw ArtifactError(manifest.directory + ": the program has no trainable tensor '" + t.name + "'");
    }
    order_.push_back(it->second);
  }
  // A first run with an empty batch hands out the parameter memory.
  ProgramInputs blank;
  const auto b = static_cast<std::size_t>(shape().batch_size), t = static_cast<std::size_t>(shape().max_length);
  blank.input_ids.assign(b * t, 0);
  blank.attention_mask.assign(b * t, 0);
  blank.labels.assign(b, kIgnoreLabel);
  blank.attention_mask[0] = 1;  // one real token, so that no division by zero enters the loss
  blank.labels[0] = 0;
  blank.slot_mask.assign(shape().amole_modules.size() * static_cast<std::size_t>(shape().slots), 1);
  run(blank);
  for (const std::string& name : manifest.predict_inputs) {
    for (std::size_t k = 0; k < manifest.tensors.size(); ++k) {
      if (manifest.tensors[k].name == name) predict_order_.push_back(k);
    }
  }
  if (!manifest.predict_method.empty() &&
      module_->load_method(manifest.predict_method) != executorch::runtime::Error::Ok) {
    throw ArtifactError(manifest.directory + ": the ExecuTorch runtime cannot load method '" + manifest.predict_method +
                        "'");
  }
}

Program::~Program() = default;

namespace {

std::vector<executorch::aten::SizesType> sizes_of(const std::vector<std::int64_t>& shape) {
  std::vector<executorch::aten::SizesType> out;
  for (std::int64_t d : shape) out.push_back(static_cast<executorch::aten::SizesType>(d));
  return out;
}

}  // namespace

// The program's inputs as runtime tensors: token ids, attention mask, the labels (training method only) and, for
// AMoLE, the slot mask; `values` stays valid while this lives.
struct Program::Inputs {
  std::vector<et::TensorPtr> tensors;
  std::vector<std::uint8_t> slot_bytes;  // bool tensors hold one byte of 0 or 1 per element
  std::vector<EValue> values;
};

void Program::make_inputs(const ProgramInputs& in, bool with_labels, Inputs& out) const {
  const auto b = static_cast<executorch::aten::SizesType>(shape().batch_size);
  const auto t = static_cast<executorch::aten::SizesType>(shape().max_length);
  out.tensors.push_back(et::make_tensor_ptr({b, t}, std::vector<std::int64_t>(in.input_ids)));
  out.tensors.push_back(et::make_tensor_ptr({b, t}, std::vector<std::int64_t>(in.attention_mask)));
  if (with_labels) out.tensors.push_back(et::make_tensor_ptr({b}, std::vector<std::int64_t>(in.labels)));
  if (!shape().amole_modules.empty()) {
    const auto l = static_cast<executorch::aten::SizesType>(shape().amole_modules.size());
    const auto m = static_cast<executorch::aten::SizesType>(shape().slots);
    out.slot_bytes = in.slot_mask;
    out.tensors.push_back(et::make_tensor_ptr({l, m}, out.slot_bytes.data(), ScalarType::Bool));
  }
  for (const auto& tensor : out.tensors) out.values.emplace_back(*tensor);
}

const float* Program::predict(const ProgramInputs& in) {
  if (manifest_.predict_method.empty()) return run(in).logits;
  Inputs inputs;
  make_inputs(in, false, inputs);
  for (std::size_t k : predict_order_) {  // views of the training method's parameter memory
    inputs.tensors.push_back(et::make_tensor_ptr(sizes_of(params_[k].shape), params_[k].data, ScalarType::Float));
    inputs.values.emplace_back(*inputs.tensors.back());
  }
  const std::vector<EValue> out = call(*module_, manifest_.predict_method, inputs.values, manifest_.directory);
  const auto& logits = out.at(0).toTensor();
  logits_.assign(logits.const_data_ptr<float>(), logits.const_data_ptr<float>() + logits.numel());
  return logits_.data();
}

Program::Outputs Program::run(const ProgramInputs& in) {
  Inputs inputs;
  make_inputs(in, true, inputs);
  std::vector<EValue> out = call(*module_, kMethod, inputs.values, manifest_.directory);
  if (out.size() != parameters_start_ + order_.size()) {
    throw ArtifactError(manifest_.directory + ": the program returned " + std::to_string(out.size()) + " outputs");
  }
  Outputs result;
  result.loss = out[0].toTensor().const_data_ptr<float>()[0];
  result.logits = out[1].toTensor().const_data_ptr<float>();
  if (!shape().amole_modules.empty()) {
    result.token_sums = out[2].toTensor().const_data_ptr<float>();
    result.slot_sums = out[3].toTensor().const_data_ptr<float>();
    result.counts = out[4].toTensor().const_data_ptr<float>();
  }
  gradients_.clear();
  const bool first = params_.empty();
  for (std::size_t k = 0; k < order_.size(); ++k) {
    gradients_.push_back(out[gradients_start_ + order_[k]].toTensor().const_data_ptr<float>());
    if (first) {
      auto& tensor = out[parameters_start_ + order_[k]].toTensor();
      const TensorEntry& entry = manifest_.tensors[k];
      params_.push_back(ParamView{entry.param, entry.role, entry.shape, tensor.mutable_data_ptr<float>(),
                                  static_cast<std::size_t>(tensor.numel())});
      std::int64_t numel = 1;
      for (std::int64_t d : entry.shape) numel *= d;
      if (numel != tensor.numel()) {
        throw ArtifactError(manifest_.directory + ": tensor '" + entry.name +
                            "' has another shape than the manifest's");
      }
    }
  }
  return result;
}

}  // namespace edgemole
