// The artifact's joint forward/backward program, run by the ExecuTorch runtime (extension/module).
//
// `forward` returns the user outputs (loss, logits and, for AMoLE, the RSEA sums), then the gradient of every
// trainable tensor, then the trainable tensors themselves; the metadata methods say where each part starts and
// name the tensors. The parameter outputs are the program's own memory: the optimizer writes into them and the
// next forward sees the update (what ExecuTorch's TrainingModule does in Python).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "manifest.h"
#include "wire_state.h"

namespace executorch::extension::module {
class Module;
}

namespace edgemole {

// One batch in the program's fixed shapes: rows beyond the real ones have label -100 and an all-zero mask.
struct ProgramInputs {
  std::vector<std::int64_t> input_ids, attention_mask, labels;  // (B, T), (B, T), (B,)
  std::vector<std::uint8_t> slot_mask;                          // (L, M), AMoLE only
};

inline constexpr std::int64_t kIgnoreLabel = -100;

class Program {
 public:
  // Loads program.pte with base.ptd, runs it once to reach its parameter memory and checks its trainable tensors
  // against the manifest; ArtifactError with one line when the runtime cannot load or run it. `threads` sizes the
  // runtime's thread pool (1: no worker threads).
  Program(const Manifest& manifest, std::int64_t threads);
  ~Program();
  Program(const Program&) = delete;
  Program& operator=(const Program&) = delete;

  const ProgramShape& shape() const { return manifest_.shape; }
  std::int64_t num_labels() const { return manifest_.num_labels; }
  // The trainable tensors, in the manifest's order, as views of the program's memory.
  std::vector<ParamView> params() const { return params_; }

  struct Outputs {
    float loss = 0.0f;
    const float* logits = nullptr;      // (B, K)
    const float* token_sums = nullptr;  // (L, r)      AMoLE only
    const float* slot_sums = nullptr;   // (L, M, r)   AMoLE only
    const float* counts = nullptr;      // (L,)        AMoLE only
  };
  // Run forward and backward on one batch. Outputs and gradients stay valid until the next run.
  Outputs run(const ProgramInputs& inputs);
  // Logits (B, K) of one batch with the current weights, without a backward pass: the inference method, fed the
  // training method's own parameter memory (no copy); the training method's logits for an artifact without one.
  // Valid until the next run or predict.
  const float* predict(const ProgramInputs& inputs);
  // The gradient of params()[index] from the last run.
  const float* gradient(std::size_t index) const { return gradients_.at(index); }

 private:
  struct Inputs;
  void make_inputs(const ProgramInputs& in, bool with_labels, Inputs& out) const;

  Manifest manifest_;
  std::unique_ptr<executorch::extension::module::Module> module_;
  std::size_t gradients_start_ = 0, parameters_start_ = 0;
  std::vector<std::size_t> order_;  // manifest tensor index -> position among the program's trainable tensors
  std::vector<ParamView> params_;
  std::vector<const float*> gradients_;
  std::vector<std::size_t> predict_order_;  // predict input k -> index into params_
  std::vector<float> logits_;               // the last prediction
};

// Set the runtime's thread pool to `threads` threads (1 creates no workers).
void set_runtime_threads(std::int64_t threads);

}  // namespace edgemole
