// FedAMoLE on the device: the RSEA embeddings (t_c = mean W_t x and e_ic = mean A_i x per held expert over the
// aux set's real tokens, from the program's per-batch sums) and their optional differential-privacy noise.
// References: edgemole/adapters/amole/layer.py (accumulate/finish) and rsea.py (privatize).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tensor.h"
#include "wire_state.h"

namespace edgemole {

class RseaSums {
 public:
  RseaSums(std::vector<std::string> modules, std::int64_t slots, std::int64_t r);
  // One batch's program outputs: token sums (L, r), slot sums (L, M, r), token counts (L,).
  void add(const float* token_sums, const float* slot_sums, const float* counts);
  // The embeddings under their wire names (token per module, one per held expert in slot order).
  TensorMap finish(const ExpertSets& experts) const;

 private:
  std::vector<std::string> modules_;
  std::int64_t slots_, r_;
  std::vector<float> token_, slot_, count_;
};

// Gamma(shape r, rate eta)-scaled uniform noise per coordinate, then rescaled to at most the clean norm; the
// embeddings are noised in name order from one generator seeded with `seed` (docs/protocol.md section 10).
TensorMap privatize(const TensorMap& embeddings, double eta, std::uint64_t seed);

}  // namespace edgemole
