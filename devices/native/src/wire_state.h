// What of the program's trainable tensors travels on the wire, and how (edgemole/model.py WireState and
// edgemole/adapters/amole/model.py): one LoRA per module under the parameter names, or, for AMoLE, a device's
// held experts under their fleet-wide ids, the shared expert and the router of every module, plus the head.
//
// It works on views of the program's own memory, so loading an assignment writes straight into the weights the
// next forward uses; it needs no runtime and is tested on plain buffers.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "manifest.h"
#include "tensor.h"
#include "validate.h"

namespace edgemole {

inline constexpr const char* kHeadRole = "head";
inline constexpr const char* kRouterRole = "router";
inline constexpr const char* kEmbeddingRole = "embedding";

// One trainable tensor of the program: its model parameter name, role, shape and memory.
struct ParamView {
  std::string param;
  std::string role;
  std::vector<std::int64_t> shape;
  float* data = nullptr;
  std::size_t size = 0;
};

using ExpertSets = std::map<std::string, std::vector<std::int64_t>>;  // module -> sorted expert ids
using Roles = std::map<std::string, std::string>;

class WireState {
 public:
  // `params` in the program's order; `modules` the AMoLE modules (empty for plain LoRA), `slots` per module.
  WireState(std::vector<ParamView> params, std::vector<std::string> modules, std::int64_t slots,
            std::int64_t num_experts);

  bool experts() const { return !modules_.empty(); }
  const std::vector<ParamView>& params() const { return params_; }
  const std::vector<std::string>& modules() const { return modules_; }
  // (modules x slots) bool mask of held slots: the program's slot_mask input.
  const std::vector<std::uint8_t>& slot_mask() const { return slot_mask_; }

  // The assignment body's `experts` map checked against the modules and slots; ProtocolError on any fault.
  ExpertSets expert_sets(const nlohmann::json& body) const;
  // The tensors an assignment with this body must carry.
  SpecMap assignment_spec(const nlohmann::json& body) const;
  // Copy a validated assignment into the program (experts into the first slots in id order, the rest zeroed and
  // masked off).
  void load(const TensorMap& tensors, const nlohmann::json& body);
  // The current trainable tensors under their wire names, with their roles.
  TensorMap state(const nlohmann::json& body, Roles* roles = nullptr) const;
  // The role of every parameter (to train only some roles).
  const std::string& role_of(std::size_t param_index) const { return params_[param_index].role; }

  // Wire names of AMoLE tensors (docs/protocol.md section 5).
  static std::string expert_name(const std::string& module, std::int64_t expert, const std::string& factor);
  static std::string token_embedding_name(const std::string& module);
  static std::string expert_embedding_name(const std::string& module, std::int64_t expert);

 private:
  const ParamView& param(const std::string& name) const;
  ParamView& param(const std::string& name);

  std::vector<ParamView> params_;
  std::vector<std::string> modules_;
  std::int64_t slots_ = 0, num_experts_ = 0;
  std::vector<std::uint8_t> slot_mask_;
};

}  // namespace edgemole
