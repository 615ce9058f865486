#include "optimizer.h"

#include <cmath>

namespace edgemole {

AdamW::AdamW(std::vector<ParamSlot> slots, AdamWOptions options) : slots_(std::move(slots)), options_(options) {
  for (const ParamSlot& s : slots_) {
    m_.emplace_back(s.size, 0.0f);
    v_.emplace_back(s.size, 0.0f);
  }
}

// PyTorch's single-tensor AdamW in float32 with its scalar factors in double:
//   p *= 1 - lr * wd;  m = lerp(m, g, 1 - beta1);  v = beta2 v + (1 - beta2) g^2
//   p -= (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
void AdamW::step(const std::vector<const float*>& grads) {
  ++steps_;
  const double t = static_cast<double>(steps_);
  const double bias1 = 1.0 - std::pow(options_.beta1, t);
  const double bias2_sqrt = std::sqrt(1.0 - std::pow(options_.beta2, t));
  const auto w1 = static_cast<float>(1.0 - options_.beta1);
  const auto beta2 = static_cast<float>(options_.beta2);
  const auto w2 = static_cast<float>(1.0 - options_.beta2);
  const auto eps = static_cast<float>(options_.eps);
  for (std::size_t k = 0; k < slots_.size(); ++k) {
    const ParamSlot& s = slots_[k];
    const float* g = grads[k];
    float* p = s.data;
    float* m = m_[k].data();
    float* v = v_[k].data();
    const auto decay = static_cast<float>(1.0 - s.lr * options_.weight_decay);
    const auto step_size = static_cast<float>(s.lr / bias1);
    const auto b2 = static_cast<float>(bias2_sqrt);
    for (std::size_t i = 0; i < s.size; ++i) {
      p[i] *= decay;
      m[i] += w1 * (g[i] - m[i]);
      v[i] = v[i] * beta2 + w2 * g[i] * g[i];
      const float denom = std::sqrt(v[i]) / b2 + eps;
      p[i] -= step_size * (m[i] / denom);
    }
  }
}

Sgd::Sgd(std::vector<ParamSlot> slots, double weight_decay) : slots_(std::move(slots)), weight_decay_(weight_decay) {}

void Sgd::step(const std::vector<const float*>& grads) {
  const auto wd = static_cast<float>(weight_decay_);
  for (std::size_t k = 0; k < slots_.size(); ++k) {
    const ParamSlot& s = slots_[k];
    const auto lr = static_cast<float>(s.lr);
    for (std::size_t i = 0; i < s.size; ++i) {
      const float g = wd != 0.0f ? grads[k][i] + wd * s.data[i] : grads[k][i];
      s.data[i] -= lr * g;
    }
  }
}

}  // namespace edgemole
