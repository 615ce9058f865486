#include "validate.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "errors.h"

namespace edgemole {
namespace {

// Python's repr of a list of strings, at most the first three (as validate.py shows them).
std::string first_three(const std::vector<std::string>& names) {
  nlohmann::json list = nlohmann::json::array();
  for (std::size_t i = 0; i < names.size() && i < 3; ++i) list.push_back(names[i]);
  return py_repr(list);
}

// Python's repr of a shape tuple: (), (2,), (2, 3).
std::string show_shape(const std::vector<std::int64_t>& shape) {
  std::string out = "(";
  for (std::size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

// validate.py's _show: "(2, 1..8)", and "(3)" for one dimension.
std::string show_spec(const TensorSpec& spec) {
  std::string out = "(";
  for (std::size_t i = 0; i < spec.shape.size(); ++i) {
    if (i) out += ", ";
    out += spec.shape[i] ? std::to_string(*spec.shape[i]) : "1.." + std::to_string(spec.bound);
  }
  return out + ")";
}

bool shape_fits(const std::vector<std::int64_t>& shape, const TensorSpec& spec) {
  if (shape.size() != spec.shape.size()) return false;
  for (std::size_t i = 0; i < shape.size(); ++i) {
    if (spec.shape[i] ? shape[i] != *spec.shape[i] : shape[i] < 1 || shape[i] > spec.bound) return false;
  }
  return true;
}

// "a.b.c" -> "a.b" (Python's name.rsplit(".", 1)[0]: the whole name when it has no dot).
std::string prefix_of(const std::string& name) {
  const auto dot = name.rfind('.');
  return dot == std::string::npos ? name : name.substr(0, dot);
}

// Index of the variable dimension of a spec, or -1.
int variable_dim(const TensorSpec& spec) {
  for (std::size_t i = 0; i < spec.shape.size(); ++i) {
    if (!spec.shape[i]) return static_cast<int>(i);
  }
  return -1;
}

// The size of the variable dimension of `tensor` (shapes were checked against the spec by check_tensors).
std::int64_t variable_size(const std::string& name, const Tensor& tensor, const TensorSpec& spec) {
  const int dim = variable_dim(spec);
  if (dim < 0 || static_cast<std::size_t>(dim) >= tensor.shape.size()) {
    throw ProtocolError("tensor '" + name + "' has shape " + show_shape(tensor.shape) + ", expected " +
                        show_spec(spec));
  }
  return tensor.shape[static_cast<std::size_t>(dim)];
}

void check_header(const Message& msg, const char* kind, const std::string& fleet) {
  if (msg.kind != kind) throw ProtocolError(std::string("expected a ") + kind + " message, got " + msg.kind);
  if (msg.fleet != fleet) {
    throw ProtocolError("message is for fleet " + py_repr(msg.fleet) + ", not " + py_repr(fleet));
  }
}

void check_run(const Message& msg, const std::string& run) {
  const auto it = msg.body.find("run");
  if (it == msg.body.end() || !it->is_string() || it->get_ref<const std::string&>() != run) {
    throw ProtocolError("message belongs to run " + (it == msg.body.end() ? std::string("None") : py_repr(*it)) +
                        ", not the current run " + py_repr(run));
  }
}

}  // namespace

bool finite_number(const nlohmann::json& value) {
  if (value.is_number_integer()) return true;  // signed and unsigned; never a boolean
  return value.is_number_float() && std::isfinite(value.get<double>());
}

bool all_finite(const Tensor& tensor) {
  const std::size_t n = tensor.bytes.size();
  const std::uint8_t* p = tensor.bytes.data();
  switch (tensor.dtype) {
    case DType::F32:
      for (std::size_t i = 0; i + 4 <= n; i += 4) {
        std::uint32_t bits = 0;
        std::memcpy(&bits, p + i, 4);
        if ((bits & 0x7f800000u) == 0x7f800000u) return false;
      }
      return true;
    case DType::F16:
    case DType::BF16: {
      const std::uint16_t exponent = tensor.dtype == DType::F16 ? 0x7c00u : 0x7f80u;
      for (std::size_t i = 0; i + 2 <= n; i += 2) {
        std::uint16_t bits = 0;
        std::memcpy(&bits, p + i, 2);
        if ((bits & exponent) == exponent) return false;
      }
      return true;
    }
    default:
      return true;
  }
}

SpecMap spec_of(const TensorMap& tensors, const std::map<std::string, std::string>& roles) {
  SpecMap specs;
  for (const auto& [name, tensor] : tensors) {
    TensorSpec spec;
    spec.shape.assign(tensor.shape.begin(), tensor.shape.end());
    spec.dtype = tensor.dtype;
    const auto role = roles.find(name);
    if (role != roles.end()) spec.role = role->second;
    specs.emplace(name, std::move(spec));
  }
  return specs;
}

void check_tensors(const Message& msg, const SpecMap& expected) {
  std::vector<std::string> missing, extra;
  for (const auto& [name, spec] : expected) {
    if (!spec.optional && msg.tensors.find(name) == msg.tensors.end()) missing.push_back(name);
  }
  for (const auto& [name, tensor] : msg.tensors) {
    if (expected.find(name) == expected.end()) extra.push_back(name);
  }
  if (!missing.empty() || !extra.empty()) {
    throw ProtocolError("tensor names differ from expected: missing " + first_three(missing) + ", unexpected " +
                        first_three(extra));
  }
  for (const auto& [name, spec] : expected) {
    const auto it = msg.tensors.find(name);
    if (it == msg.tensors.end()) continue;
    const Tensor& tensor = it->second;
    if (!shape_fits(tensor.shape, spec)) {
      throw ProtocolError("tensor " + py_repr(name) + " has shape " + show_shape(tensor.shape) + ", expected " +
                          show_spec(spec));
    }
    if (tensor.dtype != spec.dtype) {
      throw ProtocolError("tensor " + py_repr(name) + " has dtype " + dtype_name(tensor.dtype) + ", expected " +
                          dtype_name(spec.dtype));
    }
    if (!spec.role.empty()) {
      const auto role = msg.roles.find(name);
      if (role == msg.roles.end() || role->second != spec.role) {
        throw ProtocolError("tensor " + py_repr(name) + " has role " +
                            (role == msg.roles.end() ? std::string("None") : py_repr(role->second)) + ", expected " +
                            py_repr(spec.role));
      }
    }
    if (!all_finite(tensor)) throw ProtocolError("tensor " + py_repr(name) + " contains NaN or Inf");
  }
  check_rank_slices(msg.tensors, expected);
}

void check_rank_slices(const TensorMap& tensors, const SpecMap& expected) {
  // Variable-rank tensors of one adapter (FlexLoRA's B and A of a device's own rank) must agree on the rank.
  std::map<std::string, std::set<std::int64_t>> counts;
  std::map<std::string, std::string> sliced;  // adapter prefix -> its variable-rank tensor (not the ranks)
  for (const auto& [name, spec] : expected) {
    if (variable_dim(spec) < 0 || spec.role == kRanksRole) continue;
    sliced[prefix_of(name)] = name;
    const auto it = tensors.find(name);
    if (it != tensors.end()) counts[prefix_of(name)].insert(variable_size(name, it->second, spec));
  }
  for (const auto& [prefix, ks] : counts) {
    if (ks.size() > 1) {
      nlohmann::json list(ks);
      throw ProtocolError(py_repr(prefix) + ": the factors of one adapter must have the same rank, got " +
                          py_repr(list));
    }
  }
  for (const auto& [name, spec] : expected) {
    if (spec.role != kRanksRole) continue;
    const std::string prefix = prefix_of(name);
    const auto slice = sliced.find(prefix);
    const bool has_ranks = tensors.find(name) != tensors.end();
    const bool has_slice = slice != sliced.end() && tensors.find(slice->second) != tensors.end();
    if (has_ranks != has_slice) {
      throw ProtocolError(py_repr(prefix) + ": a rank slice and its '.ranks' must be sent together");
    }
    if (!has_ranks) continue;
    const Tensor& ranks = tensors.at(name);
    const std::int64_t k = variable_size(slice->second, tensors.at(slice->second), expected.at(slice->second));
    bool ok = ranks.numel() == k && (ranks.dtype == DType::I64 || ranks.dtype == DType::I32);
    if (ok) {
      const std::vector<std::int64_t> values = ranks.i64();
      for (std::size_t i = 0; i < values.size(); ++i) {
        ok = ok && values[i] >= 0 && values[i] < spec.bound && (i == 0 || values[i] > values[i - 1]);
      }
    }
    if (!ok) {
      throw ProtocolError(py_repr(name) + " must hold " + std::to_string(k) + " increasing rank indices in [0, " +
                          std::to_string(spec.bound) + ")");
    }
  }
}

void validate_assignment(const Message& msg, const std::string& fleet, const std::string& run,
                         const std::string& client, std::int64_t after_round, const SpecMap& expected) {
  check_header(msg, kind::kAssign, fleet);
  check_run(msg, run);
  if (msg.client != client) {
    throw ProtocolError("assignment is addressed to " + py_repr(msg.client) + ", not " + py_repr(client));
  }
  if (msg.round <= after_round) {
    throw ProtocolError("stale assignment for round " + std::to_string(msg.round) + " (already past round " +
                        std::to_string(after_round) + ")");
  }
  if (!is_work_phase(msg.phase)) throw ProtocolError("unknown phase " + py_repr(msg.phase) + " in assignment");
  check_tensors(msg, expected);
}

void validate_update(const Message& msg, const std::string& fleet, const std::string& run, std::int64_t round,
                     const std::string& phase, const std::string& topic_client, const std::set<std::string>& selected,
                     const SpecMap& expected) {
  check_header(msg, kind::kUpdate, fleet);
  check_run(msg, run);
  if (msg.client != topic_client) {
    throw ProtocolError("client field " + py_repr(msg.client) + " does not match topic client " +
                        py_repr(topic_client));
  }
  if (selected.find(msg.client) == selected.end()) {
    throw ProtocolError("client " + py_repr(msg.client) + " is not selected for round " + std::to_string(round));
  }
  if (msg.round != round) {
    throw ProtocolError("stale or future round " + std::to_string(msg.round) + " (open round is " +
                        std::to_string(round) + ")");
  }
  if (msg.phase != phase) {
    throw ProtocolError("phase " + py_repr(msg.phase) + " does not match the open phase " + py_repr(phase));
  }
  const auto n = msg.body.find("num_samples");
  bool n_ok = false;  // an integer (not a boolean, not 2.0) in [1, kMaxSamples]
  if (n != msg.body.end() && n->is_number_unsigned()) {
    n_ok = n->get<std::uint64_t>() >= 1 && n->get<std::uint64_t>() <= static_cast<std::uint64_t>(kMaxSamples);
  } else if (n != msg.body.end() && n->is_number_integer()) {
    n_ok = n->get<std::int64_t>() >= 1 && n->get<std::int64_t>() <= kMaxSamples;
  }
  if (!n_ok) {
    throw ProtocolError("num_samples must be an integer in [1, " + std::to_string(kMaxSamples) + "], got " +
                        (n == msg.body.end() ? std::string("None") : py_repr(*n)));
  }
  const auto metrics = msg.body.find("metrics");
  if (metrics != msg.body.end()) {
    bool ok = metrics->is_object();
    if (ok) {
      for (const auto& item : *metrics) ok = ok && finite_number(item);
    }
    if (!ok) throw ProtocolError("metrics must be an object of finite numbers");
  }
  check_tensors(msg, expected);
}

}  // namespace edgemole
