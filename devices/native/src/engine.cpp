#include "engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "amole.h"
#include "errors.h"
#include "optimizer.h"

namespace edgemole {

namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

Engine::Engine(const Manifest& manifest, const TaskSpec& task, std::int64_t threads)
    : task_(task),
      program_(std::make_unique<Program>(manifest, threads)),
      wire_(program_->params(), manifest.shape.amole_modules, manifest.shape.slots, task.amole.experts) {}

ProgramInputs Engine::inputs(const EncodedSplit& data, const Rows& rows) const {
  const auto b = static_cast<std::size_t>(shape().batch_size), t = static_cast<std::size_t>(shape().max_length);
  const auto length = static_cast<std::size_t>(data.length);
  if (rows.size() > b || length > t) {
    throw ArtifactError("a batch of " + std::to_string(rows.size()) + " x " + std::to_string(length) +
                        " does not fit the program's " + std::to_string(b) + " x " + std::to_string(t));
  }
  ProgramInputs in;
  in.input_ids.assign(b * t, pad_id_);
  in.attention_mask.assign(b * t, 0);
  in.labels.assign(b, kIgnoreLabel);
  for (std::size_t i = 0; i < rows.size(); ++i) {
    const std::size_t row = rows[i];
    std::copy_n(data.input_ids.begin() + static_cast<std::ptrdiff_t>(row * length), length,
                in.input_ids.begin() + static_cast<std::ptrdiff_t>(i * t));
    std::copy_n(data.attention_mask.begin() + static_cast<std::ptrdiff_t>(row * length), length,
                in.attention_mask.begin() + static_cast<std::ptrdiff_t>(i * t));
    in.labels[i] = data.labels[row];
  }
  in.slot_mask = wire_.slot_mask();
  return in;
}

std::vector<Rows> batches_of(const Rows& rows, std::size_t size) {
  std::vector<Rows> out;
  for (std::size_t start = 0; start < rows.size(); start += size) {
    out.emplace_back(rows.begin() + static_cast<std::ptrdiff_t>(start),
                     rows.begin() + static_cast<std::ptrdiff_t>(std::min(rows.size(), start + size)));
  }
  return out;
}

Rows all_rows(std::size_t n) {
  Rows rows(n);
  for (std::size_t i = 0; i < n; ++i) rows[i] = i;
  return rows;
}

void Engine::predict_chunks(const EncodedSplit& data, const Rows& rows,
                            const std::function<void(const Rows&, const float*)>& each) {
  for (const Rows& chunk : batches_of(rows, static_cast<std::size_t>(shape().batch_size))) {
    each(chunk, program_->predict(inputs(data, chunk)));
  }
}

void Engine::run_chunks(const EncodedSplit& data, const Rows& rows,
                        const std::function<void(const Rows&, const Program::Outputs&)>& each) {
  for (const Rows& chunk : batches_of(rows, static_cast<std::size_t>(shape().batch_size))) {
    each(chunk, program_->run(inputs(data, chunk)));
  }
}

TrainStats Engine::train(const EncodedSplit& data, const BatchStream& batches, std::int64_t steps, double lr,
                         double weight_decay, const std::vector<std::string>& roles,
                         const std::map<std::string, double>& role_lr, const std::function<void()>& after_step) {
  const std::vector<ParamView> params = program_->params();
  std::vector<ParamSlot> slots;
  std::vector<std::size_t> trained;
  for (std::size_t i = 0; i < params.size(); ++i) {
    const std::string& role = params[i].role;
    if (!roles.empty() && std::find(roles.begin(), roles.end(), role) == roles.end()) continue;
    const auto multiplier = role_lr.find(role);
    slots.push_back(
        ParamSlot{params[i].data, params[i].size, lr * (multiplier == role_lr.end() ? 1.0 : multiplier->second)});
    trained.push_back(i);
  }
  std::unique_ptr<Optimizer> optimizer;
  if (task_.train.optimizer == "sgd") {
    optimizer = std::make_unique<Sgd>(slots, weight_decay);
  } else {
    AdamWOptions options;
    options.weight_decay = weight_decay;
    optimizer = std::make_unique<AdamW>(slots, options);
  }
  const auto start = std::chrono::steady_clock::now();
  TrainStats stats;
  for (std::int64_t step = 0; step < steps; ++step) {
    const Rows rows = batches();
    if (rows.size() > static_cast<std::size_t>(shape().batch_size)) {
      throw ArtifactError("training batches of " + std::to_string(rows.size()) + " exceed the program's batch size " +
                          std::to_string(shape().batch_size) + "; export with --batch-size");
    }
    const Program::Outputs out = program_->run(inputs(data, rows));
    std::vector<const float*> grads;
    for (std::size_t i : trained) grads.push_back(program_->gradient(i));
    optimizer->step(grads);
    if (after_step) after_step();
    stats.losses.push_back(out.loss);
    stats.samples += static_cast<std::int64_t>(rows.size());
  }
  stats.steps = steps;
  double sum = 0.0;
  for (float l : stats.losses) sum += static_cast<double>(l);
  stats.loss = steps > 0 ? sum / static_cast<double>(steps) : 0.0;
  stats.seconds = seconds_since(start);
  return stats;
}

EvalStats Engine::evaluate(const EncodedSplit& data, const std::vector<Rows>& batches) {
  const auto start = std::chrono::steady_clock::now();
  const auto k = static_cast<std::size_t>(program_->num_labels());
  double loss_sum = 0.0;
  std::int64_t correct = 0, n = 0;
  for (const Rows& batch : batches) {
    predict_chunks(data, batch, [&](const Rows& chunk, const float* logits) {
      for (std::size_t i = 0; i < chunk.size(); ++i) {
        const float* row = logits + i * k;
        const auto label = static_cast<std::size_t>(data.labels[chunk[i]]);
        std::size_t best = 0;
        double max = row[0];
        for (std::size_t j = 1; j < k; ++j) {
          if (row[j] > row[best]) best = j;
          max = std::max(max, static_cast<double>(row[j]));
        }
        double z = 0.0;
        for (std::size_t j = 0; j < k; ++j) z += std::exp(static_cast<double>(row[j]) - max);
        loss_sum += std::log(z) + max - static_cast<double>(row[label]);
        correct += best == label ? 1 : 0;
        ++n;
      }
    });
  }
  EvalStats stats;
  stats.samples = n;
  if (n > 0) {
    stats.loss = loss_sum / static_cast<double>(n);
    stats.accuracy = static_cast<double>(correct) / static_cast<double>(n);
  }
  stats.seconds = seconds_since(start);
  return stats;
}

TensorMap Engine::embeddings(const EncodedSplit& data, const std::vector<Rows>& batches, const nlohmann::json& body) {
  if (!wire_.experts()) return {};
  const ExpertSets sets = wire_.expert_sets(body);
  RseaSums sums(wire_.modules(), shape().slots, task_.lora.r);
  for (const Rows& batch : batches) {
    run_chunks(data, batch,
               [&](const Rows&, const Program::Outputs& out) { sums.add(out.token_sums, out.slot_sums, out.counts); });
  }
  return sums.finish(sets);
}

std::vector<float> Engine::logits(const EncodedSplit& data, const Rows& rows) {
  const auto k = static_cast<std::size_t>(program_->num_labels());
  std::vector<float> out;
  predict_chunks(data, rows, [&](const Rows& chunk, const float* logits) {
    out.insert(out.end(), logits, logits + chunk.size() * k);
  });
  return out;
}

}  // namespace edgemole
