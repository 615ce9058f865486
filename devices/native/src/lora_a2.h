// LoRA-A2 on the device (DESIGN.md 5.3; edgemole/adapters/lora/a2.py is the reference): the probe's rank
// scores, the global top r_c x N selection, the masks that hold unselected ranks, and the slices that travel.
// Wire names key everything: an adapter `p` has `p.lora_A` (r, d_in) and `p.lora_B` (d_out, r); "rank i" is
// column i of B and row i of A.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "tensor.h"

namespace edgemole {

inline constexpr const char* kTrainA = "train-A";
inline constexpr const char* kTrainB = "train-B";

using Selection = std::map<std::string, std::vector<std::int64_t>>;  // adapter prefix -> sorted ranks

// "lora_B" in a train-B round, "lora_A" in a train-A round; ProtocolError for any other phase.
std::string active_factor(const std::string& phase);
// Prefixes p with both p.lora_A and p.lora_B among the names, sorted: every LoRA of a wire state.
std::vector<std::string> adapter_prefixes(const TensorMap& state);
// The target module of an adapter prefix (`<m>.expert.<id>` and `<m>.shared` belong to `<m>`).
std::string adapter_module(const std::string& prefix);
// B round: S_i = ||dB[:, i]|| * ||A[i, :]||; A round: S_i = ||B[:, i]|| * ||dA[i, :]||, for every adapter, with
// d = probed - global of the active factor (float32 like PyTorch's).
std::map<std::string, std::vector<float>> rank_scores(const TensorMap& global, const TensorMap& probed,
                                                      const std::vector<std::string>& prefixes,
                                                      const std::string& phase);
// The top `budget` (adapter, rank) pairs over all adapters; ties go to the earlier adapter (name order), then the
// lower rank, exactly as select_ranks in Python.
Selection select_ranks(const std::map<std::string, std::vector<float>>& scores, std::int64_t budget);
// Entries of the active factor outside the selection are put back to `global` (after every optimizer step).
void hold_unselected(TensorMap& current, const TensorMap& global, const Selection& selection, const std::string& phase);
// The upload: `p.<factor>` sliced to the selected ranks and `p.ranks` (I64, increasing); none for empty selections.
TensorMap encode_slices(const TensorMap& state, const Selection& selection, const std::string& phase);

}  // namespace edgemole

namespace edgemole {

// FlexLoRA (edgemole/adapters/lora/flex.py): a device of rank k keeps the server's leading k ranks of every
// adapter (the rest zeroed, inert under training) and sends B[:, :k] and A[:k, :].
TensorMap truncate_ranks(const TensorMap& state, const std::vector<std::string>& prefixes, std::int64_t k);
TensorMap leading_ranks(const TensorMap& state, const std::vector<std::string>& prefixes, std::int64_t k);

}  // namespace edgemole
