#include "amole.h"

#include <algorithm>
#include <cmath>

#include "rng.h"

namespace edgemole {

RseaSums::RseaSums(std::vector<std::string> modules, std::int64_t slots, std::int64_t r)
    : modules_(std::move(modules)), slots_(slots), r_(r) {
  token_.assign(modules_.size() * static_cast<std::size_t>(r_), 0.0f);
  slot_.assign(modules_.size() * static_cast<std::size_t>(slots_ * r_), 0.0f);
  count_.assign(modules_.size(), 0.0f);
}

void RseaSums::add(const float* token_sums, const float* slot_sums, const float* counts) {
  for (std::size_t i = 0; i < token_.size(); ++i) token_[i] += token_sums[i];
  for (std::size_t i = 0; i < slot_.size(); ++i) slot_[i] += slot_sums[i];
  for (std::size_t i = 0; i < count_.size(); ++i) count_[i] += counts[i];
}

TensorMap RseaSums::finish(const ExpertSets& experts) const {
  TensorMap out;
  const auto r = static_cast<std::size_t>(r_);
  for (std::size_t k = 0; k < modules_.size(); ++k) {
    const float n = std::max(count_[k], 1.0f);
    std::vector<float> t(r);
    for (std::size_t j = 0; j < r; ++j) t[j] = token_[k * r + j] / n;
    out[WireState::token_embedding_name(modules_[k])] = Tensor::from_f32({r_}, t);
    const std::vector<std::int64_t>& ids = experts.at(modules_[k]);
    for (std::size_t slot = 0; slot < ids.size(); ++slot) {
      std::vector<float> e(r);
      const std::size_t base = (k * static_cast<std::size_t>(slots_) + slot) * r;
      for (std::size_t j = 0; j < r; ++j) e[j] = slot_[base + j] / n;
      out[WireState::expert_embedding_name(modules_[k], ids[slot])] = Tensor::from_f32({r_}, e);
    }
  }
  return out;
}

TensorMap privatize(const TensorMap& embeddings, double eta, std::uint64_t seed) {
  SplitMix64 rng(seed);
  TensorMap out;
  for (const auto& item : embeddings) {  // name order
    const std::vector<float> v = item.second.f32();
    const std::size_t r = v.size();
    std::vector<double> noisy(r);
    double clean = 0.0, now = 0.0;
    for (std::size_t j = 0; j < r; ++j) {
      double gamma = 0.0;
      for (std::size_t k = 0; k < r; ++k) gamma += -std::log1p(-rng.uniform()) / eta;
      const double sign = 2.0 * rng.uniform() - 1.0;
      noisy[j] = static_cast<double>(v[j]) + gamma * sign;
      clean += static_cast<double>(v[j]) * static_cast<double>(v[j]);
      now += noisy[j] * noisy[j];
    }
    clean = std::sqrt(clean);
    now = std::sqrt(now);
    std::vector<float> result(r);
    for (std::size_t j = 0; j < r; ++j) {
      result[j] = static_cast<float>(now > clean && clean > 0 ? noisy[j] * (clean / now) : noisy[j]);
    }
    out[item.first] = Tensor::from_f32(item.second.shape, result);
  }
  return out;
}

}  // namespace edgemole
