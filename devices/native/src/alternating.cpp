#include "alternating.h"

#include <set>

namespace edgemole {

std::int64_t AlternatingRound::ranks() const {
  std::int64_t n = 0;
  for (const auto& item : selection) n += static_cast<std::int64_t>(item.second.size());
  return n;
}

AlternatingRound train_alternating(Engine& engine, const EncodedSplit& data, const nlohmann::json& body,
                                   const std::string& phase, const std::function<BatchStream()>& batches,
                                   const TaskSpec& task, std::int64_t steps, std::int64_t upload_rank,
                                   const std::vector<std::string>& train_roles, const std::function<void()>& tick) {
  const std::string factor = active_factor(phase);
  const std::vector<std::string> roles_trained = train_roles.empty() ? std::vector<std::string>{factor} : train_roles;
  const std::map<std::string, double> role_lr{{"lora_B", task.a2.b_lr_multiplier}};
  const double lr = task.train.lr, wd = task.train.weight_decay;

  Roles wire_roles;
  const TensorMap global = engine.get_state(body, &wire_roles);
  const std::vector<std::string> prefixes = adapter_prefixes(global);
  AlternatingRound round;
  const TrainStats probe = engine.train(data, batches(), task.a2.probe_steps > 0 ? task.a2.probe_steps : steps, lr, wd,
                                        roles_trained, role_lr, tick);
  round.probe_s = probe.seconds;
  const TensorMap probed = engine.get_state(body);
  std::set<std::string> modules;
  for (const std::string& p : prefixes) modules.insert(adapter_module(p));
  round.selection = select_ranks(rank_scores(global, probed, prefixes, phase),
                                 upload_rank * static_cast<std::int64_t>(modules.size()));

  engine.set_state(global, body);
  const auto hold = [&] {  // AdamW's decay and momentum must not move what is not uploaded
    TensorMap current = engine.get_state(body);
    hold_unselected(current, global, round.selection, phase);
    engine.set_state(current, body);
    if (tick) tick();
  };
  round.stats = engine.train(data, batches(), steps, lr, wd, roles_trained, role_lr, hold);

  const TensorMap trained = engine.get_state(body);
  std::set<std::string> factors;
  for (const std::string& p : prefixes) {
    factors.insert(p + ".lora_A");
    factors.insert(p + ".lora_B");
  }
  const std::set<std::string> trained_roles(roles_trained.begin(), roles_trained.end());
  for (const auto& item : trained) {
    if (trained_roles.count(wire_roles.at(item.first)) && !factors.count(item.first)) {
      round.tensors[item.first] = item.second;
      round.roles[item.first] = wire_roles.at(item.first);
    }
  }
  for (auto& item : encode_slices(trained, round.selection, phase)) {
    const bool is_ranks = item.first.size() > 6 && item.first.compare(item.first.size() - 6, 6, ".ranks") == 0;
    round.roles[item.first] = is_ranks ? kRanksRole : factor;
    round.tensors[item.first] = std::move(item.second);
  }
  return round;
}

}  // namespace edgemole
