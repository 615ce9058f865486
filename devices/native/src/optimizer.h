// The optimizers a device runs over the program's gradients (the runtime ships none to C++): PyTorch's AdamW with
// its defaults (the eager and Python ExecuTorch engines' optimizer) and plain SGD with weight decay (the runtime's
// SGD in Python and on Android), written so that the updates equal PyTorch's to float32 rounding.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace edgemole {

// One parameter tensor the optimizer steps: its memory (the program's own, so the next forward sees the update)
// and its learning rate.
struct ParamSlot {
  float* data = nullptr;
  std::size_t size = 0;
  double lr = 0.0;
};

class Optimizer {
 public:
  virtual ~Optimizer() = default;
  // One step of every slot from its gradient (grads[i] has slots[i].size floats).
  virtual void step(const std::vector<const float*>& grads) = 0;
};

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0.01;
};

// torch.optim.AdamW (decoupled weight decay, bias correction), one fresh state per round as the Python engines do.
class AdamW final : public Optimizer {
 public:
  AdamW(std::vector<ParamSlot> slots, AdamWOptions options);
  void step(const std::vector<const float*>& grads) override;

 private:
  std::vector<ParamSlot> slots_;
  AdamWOptions options_;
  std::vector<std::vector<float>> m_, v_;
  std::int64_t steps_ = 0;
};

// torch.optim.SGD without momentum: g += wd * p; p -= lr * g.
class Sgd final : public Optimizer {
 public:
  Sgd(std::vector<ParamSlot> slots, double weight_decay);
  void step(const std::vector<const float*>& grads) override;

 private:
  std::vector<ParamSlot> slots_;
  double weight_decay_;
};

}  // namespace edgemole
