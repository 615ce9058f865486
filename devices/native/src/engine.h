// The device's training engine on the ExecuTorch program (the C++ twin of edge_client/engines/executorch.py):
// load an assignment into the program, take optimizer steps on batches of the local data, evaluate, compute the
// RSEA embeddings, hand the trained tensors back under their wire names.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "config.h"
#include "manifest.h"
#include "program.h"
#include "wire_state.h"

namespace edgemole {

// A tokenised split: `rows` examples of `length` ids and mask values each, with label ids.
struct EncodedSplit {
  std::int64_t length = 0;
  std::vector<std::int64_t> input_ids, attention_mask, labels;
  std::size_t rows() const { return labels.size(); }
};

using Rows = std::vector<std::size_t>;  // one batch: row indices into a split
using BatchStream = std::function<Rows()>;

// `rows` cut into consecutive batches of at most `size` (the last one may be smaller).
std::vector<Rows> batches_of(const Rows& rows, std::size_t size);
// 0, 1, ..., n-1.
Rows all_rows(std::size_t n);  // endless batches (a round's training order)

struct TrainStats {
  double loss = 0.0;  // mean over steps
  std::int64_t steps = 0, samples = 0;
  double seconds = 0.0;
  std::vector<float> losses;  // every step's loss, in order
};

struct EvalStats {
  double loss = 0.0, accuracy = 0.0;
  std::int64_t samples = 0;
  double seconds = 0.0;
};

class Engine {
 public:
  Engine(const Manifest& manifest, const TaskSpec& task, std::int64_t threads);

  const WireState& wire() const { return wire_; }
  // The tokenizer's padding id, for the columns a batch is padded with up to the program's sequence length.
  void set_pad_id(std::int64_t pad_id) { pad_id_ = pad_id; }
  const ProgramShape& shape() const { return program_->shape(); }
  SpecMap expected_state(const nlohmann::json& body) const { return wire_.assignment_spec(body); }
  void set_state(const TensorMap& tensors, const nlohmann::json& body) { wire_.load(tensors, body); }
  TensorMap get_state(const nlohmann::json& body, Roles* roles = nullptr) const { return wire_.state(body, roles); }

  // `steps` optimizer steps (a fresh optimizer), changing only tensors whose role is in `roles` (all when empty);
  // `role_lr` multiplies the learning rate of a role; `after_step` runs after every step.
  TrainStats train(const EncodedSplit& data, const BatchStream& batches, std::int64_t steps, double lr,
                   double weight_decay, const std::vector<std::string>& roles = {},
                   const std::map<std::string, double>& role_lr = {},
                   const std::function<void()>& after_step = nullptr);
  // Mean cross-entropy and accuracy over the batches, changing no weight.
  EvalStats evaluate(const EncodedSplit& data, const std::vector<Rows>& batches);
  // RSEA embeddings over the batches with the current weights ({} without experts).
  TensorMap embeddings(const EncodedSplit& data, const std::vector<Rows>& batches, const nlohmann::json& body);
  // Logits (rows x labels) of the given rows with the current weights (prediction).
  std::vector<float> logits(const EncodedSplit& data, const Rows& rows);

 private:
  // The program's inputs for up to batch_size rows of a split (padded up to the program's shapes).
  ProgramInputs inputs(const EncodedSplit& data, const Rows& rows) const;
  // Predicts rows in chunks of the program's batch size; `each(chunk rows, logits)`.
  void predict_chunks(const EncodedSplit& data, const Rows& rows,
                      const std::function<void(const Rows&, const float*)>& each);
  // Runs the program over rows in chunks of its batch size; `each(chunk rows, outputs)`.
  void run_chunks(const EncodedSplit& data, const Rows& rows,
                  const std::function<void(const Rows&, const Program::Outputs&)>& each);

  TaskSpec task_;
  std::unique_ptr<Program> program_;
  WireState wire_;
  std::int64_t pad_id_ = 0;
};

}  // namespace edgemole
