#include "wire_state.h"

#include <algorithm>
#include <cstring>
#include <set>

#include "errors.h"

namespace edgemole {

using nlohmann::json;

namespace {

bool starts_with(const std::string& text, const std::string& prefix) {
  return text.compare(0, prefix.size(), prefix) == 0;
}

TensorSpec spec(std::vector<std::int64_t> shape, const std::string& role) {
  TensorSpec s;
  for (std::int64_t d : shape) s.shape.emplace_back(d);
  s.dtype = DType::F32;
  s.role = role;
  return s;
}

}  // namespace

WireState::WireState(std::vector<ParamView> params, std::vector<std::string> modules, std::int64_t slots,
                     std::int64_t num_experts)
    : params_(std::move(params)), modules_(std::move(modules)), slots_(slots), num_experts_(num_experts) {
  slot_mask_.assign(modules_.size() * static_cast<std::size_t>(std::max<std::int64_t>(slots_, 0)), 1);
  for (const std::string& m : modules_) {
    for (const char* attr : {"experts_A", "experts_B", "shared_A", "shared_B", "router"}) param(m + "." + attr);
  }
}

const ParamView& WireState::param(const std::string& name) const {
  for (const ParamView& p : params_) {
    if (p.param == name) return p;
  }
  throw ArtifactError("the program has no trainable tensor '" + name + "'");
}

ParamView& WireState::param(const std::string& name) {
  return const_cast<ParamView&>(static_cast<const WireState*>(this)->param(name));
}

std::string WireState::expert_name(const std::string& module, std::int64_t expert, const std::string& factor) {
  return module + ".expert." + std::to_string(expert) + "." + factor;
}
std::string WireState::token_embedding_name(const std::string& module) { return module + ".embed.token"; }
std::string WireState::expert_embedding_name(const std::string& module, std::int64_t expert) {
  return module + ".embed.expert." + std::to_string(expert);
}

ExpertSets WireState::expert_sets(const json& body) const {
  if (!experts()) return {};
  const auto it = body.find("experts");
  bool same_modules = it != body.end() && it->is_object() && it->size() == modules_.size();
  if (same_modules) {
    for (const std::string& m : modules_) same_modules = same_modules && it->contains(m);
  }
  if (!same_modules) {
    throw ProtocolError("assignment 'experts' must map exactly this model's AMoLE modules to expert ids");
  }
  ExpertSets sets;
  for (const std::string& m : modules_) {
    const json& ids = it->at(m);
    bool ok = ids.is_array() && !ids.empty() && static_cast<std::int64_t>(ids.size()) <= slots_;
    std::set<std::int64_t> seen;
    std::vector<std::int64_t> out;
    if (ok) {
      for (const json& id : ids) {
        if (!id.is_number_integer()) {
          ok = false;
          break;
        }
        const auto value = id.get<std::int64_t>();
        ok = ok && value >= 0 && value < num_experts_ && seen.insert(value).second;
        out.push_back(value);
      }
    }
    if (!ok) {
      std::string text = "experts of " + m + " must be 1 to " + std::to_string(slots_) + " distinct ids in [0, " +
                         std::to_string(num_experts_) + "), got " +
                         ids.dump(-1, ' ', false, json::error_handler_t::replace);
      throw ProtocolError(text.substr(0, 300));
    }
    std::sort(out.begin(), out.end());
    sets[m] = out;
  }
  return sets;
}

SpecMap WireState::assignment_spec(const json& body) const {
  SpecMap specs;
  if (!experts()) {
    for (const ParamView& p : params_) specs[p.param] = spec(p.shape, p.role);
    return specs;
  }
  const ExpertSets sets = expert_sets(body);
  for (const std::string& m : modules_) {
    const ParamView& shared_a = param(m + ".shared_A");
    const ParamView& shared_b = param(m + ".shared_B");
    for (std::int64_t id : sets.at(m)) {
      specs[expert_name(m, id, "lora_A")] = spec(shared_a.shape, "lora_A");
      specs[expert_name(m, id, "lora_B")] = spec(shared_b.shape, "lora_B");
    }
    specs[m + ".shared.lora_A"] = spec(shared_a.shape, "lora_A");
    specs[m + ".shared.lora_B"] = spec(shared_b.shape, "lora_B");
    specs[m + ".router"] = spec(param(m + ".router").shape, kRouterRole);
  }
  for (const ParamView& p : params_) {
    if (starts_with(p.param, "head.")) specs[p.param] = spec(p.shape, kHeadRole);
  }
  return specs;
}

namespace {

void copy_in(const Tensor& from, float* to, std::size_t size) {
  const std::vector<float> values = from.f32();
  if (values.size() != size) throw ProtocolError("tensor size does not fit the program");
  std::memcpy(to, values.data(), size * sizeof(float));
}

Tensor copy_out(const std::vector<std::int64_t>& shape, const float* from) { return Tensor::from_f32(shape, from); }

}  // namespace

void WireState::load(const TensorMap& tensors, const json& body) {
  if (!experts()) {
    for (ParamView& p : params_) copy_in(tensors.at(p.param), p.data, p.size);
    return;
  }
  const ExpertSets sets = expert_sets(body);
  for (std::size_t k = 0; k < modules_.size(); ++k) {
    const std::string& m = modules_[k];
    ParamView& ea = param(m + ".experts_A");
    ParamView& eb = param(m + ".experts_B");
    const std::size_t slot_a = ea.size / static_cast<std::size_t>(slots_);
    const std::size_t slot_b = eb.size / static_cast<std::size_t>(slots_);
    const std::vector<std::int64_t>& ids = sets.at(m);
    for (std::size_t slot = 0; slot < static_cast<std::size_t>(slots_); ++slot) {
      const bool held = slot < ids.size();
      if (held) {
        copy_in(tensors.at(expert_name(m, ids[slot], "lora_A")), ea.data + slot * slot_a, slot_a);
        copy_in(tensors.at(expert_name(m, ids[slot], "lora_B")), eb.data + slot * slot_b, slot_b);
      } else {
        std::fill_n(ea.data + slot * slot_a, slot_a, 0.0f);
        std::fill_n(eb.data + slot * slot_b, slot_b, 0.0f);
      }
      slot_mask_[k * static_cast<std::size_t>(slots_) + slot] = held ? 1 : 0;
    }
    ParamView& sa = param(m + ".shared_A");
    ParamView& sb = param(m + ".shared_B");
    ParamView& router = param(m + ".router");
    copy_in(tensors.at(m + ".shared.lora_A"), sa.data, sa.size);
    copy_in(tensors.at(m + ".shared.lora_B"), sb.data, sb.size);
    copy_in(tensors.at(m + ".router"), router.data, router.size);
  }
  for (ParamView& p : params_) {
    if (starts_with(p.param, "head.")) copy_in(tensors.at(p.param), p.data, p.size);
  }
}

TensorMap WireState::state(const json& body, Roles* roles) const {
  TensorMap out;
  auto put = [&](const std::string& name, Tensor t, const std::string& role) {
    out[name] = std::move(t);
    if (roles) (*roles)[name] = role;
  };
  if (!experts()) {
    for (const ParamView& p : params_) put(p.param, copy_out(p.shape, p.data), p.role);
    return out;
  }
  const ExpertSets sets = expert_sets(body);
  for (const std::string& m : modules_) {
    const ParamView& ea = param(m + ".experts_A");
    const ParamView& eb = param(m + ".experts_B");
    const std::size_t slot_a = ea.size / static_cast<std::size_t>(slots_);
    const std::size_t slot_b = eb.size / static_cast<std::size_t>(slots_);
    const std::vector<std::int64_t> shape_a(ea.shape.begin() + 1, ea.shape.end());
    const std::vector<std::int64_t> shape_b(eb.shape.begin() + 1, eb.shape.end());
    const std::vector<std::int64_t>& ids = sets.at(m);
    for (std::size_t slot = 0; slot < ids.size(); ++slot) {
      put(expert_name(m, ids[slot], "lora_A"), copy_out(shape_a, ea.data + slot * slot_a), "lora_A");
      put(expert_name(m, ids[slot], "lora_B"), copy_out(shape_b, eb.data + slot * slot_b), "lora_B");
    }
    const ParamView& sa = param(m + ".shared_A");
    const ParamView& sb = param(m + ".shared_B");
    const ParamView& router = param(m + ".router");
    put(m + ".shared.lora_A", copy_out(sa.shape, sa.data), "lora_A");
    put(m + ".shared.lora_B", copy_out(sb.shape, sb.data), "lora_B");
    put(m + ".router", copy_out(router.shape, router.data), kRouterRole);
  }
  for (const ParamView& p : params_) {
    if (starts_with(p.param, "head.")) put(p.param, copy_out(p.shape, p.data), kHeadRole);
  }
  return out;
}

}  // namespace edgemole
