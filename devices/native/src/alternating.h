// A LoRA-A2 round (train-A / train-B) on the engine: the C++ twin of edge_client/alternating.py.
//
// A probe from the global weights scores every rank of every adapter; the device keeps its top r_c x N (adapter,
// rank) pairs; training restarts from the global weights with everything else of the active factor put back after
// every optimizer step; the upload is the selected slices with their indices plus the other trained tensors.
#pragma once

#include <string>
#include <vector>

#include "engine.h"
#include "lora_a2.h"

namespace edgemole {

struct AlternatingRound {
  TrainStats stats;
  double probe_s = 0.0;
  Selection selection;
  TensorMap tensors;
  Roles roles;
  std::int64_t ranks() const;
};

// `tick` runs after every optimizer step (the client keeps its connection alive there).
// `batches()` makes the round's batch stream afresh (the probe and the training see the same data).
AlternatingRound train_alternating(Engine& engine, const EncodedSplit& data, const nlohmann::json& body,
                                   const std::string& phase, const std::function<BatchStream()>& batches,
                                   const TaskSpec& task, std::int64_t steps, std::int64_t upload_rank,
                                   const std::vector<std::string>& train_roles,
                                   const std::function<void()>& tick = nullptr);

}  // namespace edgemole
