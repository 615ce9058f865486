// The receiver's checks of a decoded message (docs/protocol.md section 7.2), as in edgemole/protocol/validate.py.
// The receiver always knows what it expects (run, round, which tensors of which shapes), so it compares the message
// with that expectation and never lets the sender's header define it.
#pragma once

#include <cstdint>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "message.h"
#include "tensor.h"

namespace edgemole {

// Role of the int64 index tensor "<adapter>.ranks" that says which ranks a LoRA-A2 slice holds.
inline constexpr const char* kRanksRole = "ranks";
// Largest num_samples of an update.
inline constexpr std::int64_t kMaxSamples = 1000000000;

// Expected shape, dtype and role of one named tensor. A nullopt dimension is variable, of size 1..bound (the ranks
// of a rank slice or of a device's own rank); an optional tensor may be absent (an adapter with no selected rank).
// An empty role is not checked.
struct TensorSpec {
  std::vector<std::optional<std::int64_t>> shape;
  DType dtype = DType::F32;
  std::string role;
  bool optional = false;
  std::int64_t bound = 0;
};
using SpecMap = std::map<std::string, TensorSpec>;

// The spec that `tensors` satisfy, e.g. to expect back exactly what was sent.
SpecMap spec_of(const TensorMap& tensors, const std::map<std::string, std::string>& roles = {});

// Exactly the expected names (optional ones may be missing), each with its shape, dtype and role, only finite
// values in floating-point tensors, and sound rank slices (check_rank_slices). Throws ProtocolError.
void check_tensors(const Message& msg, const SpecMap& expected);

// Every rank slice comes with its ".ranks" (as many distinct, increasing indices in [0, bound) as the slice has
// ranks), no index tensor without its slice, and the variable-rank tensors of one adapter agree on their rank.
void check_rank_slices(const TensorMap& tensors, const SpecMap& expected);

// A device accepts only its own assignment of the current run, newer than its last answered round, in a work phase,
// shaped for its model.
void validate_assignment(const Message& msg, const std::string& fleet, const std::string& run,
                         const std::string& client, std::int64_t after_round, const SpecMap& expected);

// The aggregator's check of an update (for tests and tools; devices never receive updates).
void validate_update(const Message& msg, const std::string& fleet, const std::string& run, std::int64_t round,
                     const std::string& phase, const std::string& topic_client, const std::set<std::string>& selected,
                     const SpecMap& expected);

// True for a JSON integer or a finite float; booleans are not numbers here (they are not measurements).
bool finite_number(const nlohmann::json& value);

// True when every element of a floating-point tensor is finite (integer tensors always are).
bool all_finite(const Tensor& tensor);

}  // namespace edgemole
