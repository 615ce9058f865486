#include "client.h"

#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <set>

#include "alternating.h"
#include "amole.h"
#include "data.h"
#include "deployed.h"
#include "errors.h"
#include "log.h"
#include "lora_a2.h"
#include "validate.h"

namespace edgemole {

using nlohmann::json;

namespace {

constexpr std::int64_t kMaxLocalSteps = 1000000;
constexpr const char* kOwnRank = "own_rank";

std::string fixed3(double x) {
  char buffer[32];
  std::snprintf(buffer, sizeof buffer, "%.3f", x);
  return buffer;
}

// What of a round's results is NaN or infinite ("" when all are finite): such a round is never sent.
std::string non_finite(const json& metrics, const TensorMap& tensors) {
  for (const auto& item : metrics.items()) {
    if (item.value().is_number_float() && !std::isfinite(item.value().get<double>())) {
      return "non-finite " + item.key() + " (" + std::to_string(item.value().get<double>()) + ")";
    }
  }
  for (const auto& item : tensors) {
    if (!all_finite(item.second)) return "non-finite values in " + item.first;
  }
  return "";
}

// Appends the texts and labels of the given rows of a table.
void take_rows(const std::vector<std::size_t>& rows, const TextTable& table, std::vector<std::string>& texts,
               std::vector<std::string>& labels) {
  for (std::size_t i : rows) {
    texts.push_back(table.texts[i]);
    labels.push_back(table.labels[i]);
  }
}

}  // namespace

LocalData read_local_data(const DeviceConfig& config) {
  LocalData data;
  const TextTable table = load_table(config.data, config.text_column, config.label_column);
  const bool separate_test = !config.test_data.empty();
  if (separate_test) {
    TextTable test = load_table(config.test_data, config.text_column, config.label_column);
    data.test_texts = std::move(test.texts);
    data.test_labels = std::move(test.labels);
  }
  const RowSplit rows =
      split_rows(table.labels, separate_test, config.test_fraction, config.val_fraction, crc32(config.client_id));
  take_rows(rows.train, table, data.train_texts, data.train_labels);
  take_rows(rows.val, table, data.val_texts, data.val_labels);
  take_rows(rows.test, table, data.test_texts, data.test_labels);  // none with a separate test file
  if (data.train_texts.empty()) throw DataError("data file '" + config.data + "' leaves no training examples");
  return data;
}

namespace {

EncodedSplit encode_split(const std::vector<std::string>& texts, const std::vector<std::string>& labels,
                          const std::map<std::string, std::int64_t>& ids, const Tokenizer& tokenizer,
                          std::int64_t max_length) {
  EncodedSplit out;
  out.length = max_length;
  for (std::size_t i = 0; i < texts.size(); ++i) {
    const Tokenizer::Encoding e = tokenizer.encode(texts[i], static_cast<std::size_t>(max_length));
    out.input_ids.insert(out.input_ids.end(), e.input_ids.begin(), e.input_ids.end());
    out.attention_mask.insert(out.attention_mask.end(), e.attention_mask.begin(), e.attention_mask.end());
    out.labels.push_back(ids.at(labels[i]));
  }
  return out;
}

}  // namespace

void prepare_local_data(LocalData& data, const std::vector<std::string>& labels, const Tokenizer& tokenizer,
                        std::int64_t max_length) {
  std::map<std::string, std::int64_t> ids;
  for (std::size_t i = 0; i < labels.size(); ++i) ids[labels[i]] = static_cast<std::int64_t>(i);
  std::set<std::string> unknown;
  for (const auto* split : {&data.train_labels, &data.test_labels, &data.val_labels}) {
    for (const std::string& label : *split) {
      if (!ids.count(label)) unknown.insert(label);
    }
  }
  if (!unknown.empty()) {
    std::string examples;
    std::size_t shown = 0;
    for (const std::string& label : unknown) {
      if (shown++ == 3) break;
      examples += (examples.empty() ? "" : ", ") + py_repr(std::string_view(label));
    }
    throw DataError("local data has " + std::to_string(unknown.size()) +
                    " label(s) outside the fleet's label set, e.g. [" + examples + "]");
  }
  data.train = encode_split(data.train_texts, data.train_labels, ids, tokenizer, max_length);
  data.test = encode_split(data.test_texts, data.test_labels, ids, tokenizer, max_length);
  data.val = encode_split(data.val_texts, data.val_labels, ids, tokenizer, max_length);
}

DeviceClient::DeviceClient(DeviceConfig config, std::unique_ptr<Link> link)
    : config_(std::move(config)), topics_(config_.fleet, config_.topic_prefix) {
  check_name(config_.client_id, "client id");
  data_ = read_local_data(config_);  // a bad data file fails before connecting
  manifest_ = read_manifest(config_.artifact);
  verify_files(manifest_);
  tokenizer_ = std::make_unique<Tokenizer>(Tokenizer::from_file(config_.artifact + "/tokenizer/tokenizer.json"));
  link_ = link ? std::move(link) : make_mqtt_link(config_, topics_, status_payload("offline", "", true));
}

DeviceClient::~DeviceClient() = default;

std::vector<std::uint8_t> DeviceClient::status_payload(const std::string& state, const std::string& error,
                                                       bool last_will) const {
  json body = {{"state", state},
               {"num_train", data_.num_train()},
               {"num_test", data_.num_test()},
               {"engine", "executorch"},
               {"client", "native"}};
  body["artifact"] = manifest_.digest;
  if (!last_will) {
    const auto now = std::chrono::system_clock::now().time_since_epoch();
    body["time_unix"] = static_cast<double>(std::chrono::duration_cast<std::chrono::milliseconds>(now).count()) / 1000;
  }
  if (!error.empty()) body["error"] = error.substr(0, 500);
  if (!run_id_.empty()) body["run"] = run_id_;
  Message msg;
  msg.kind = kind::kStatus;
  msg.fleet = config_.fleet;
  msg.round = last_round_;
  msg.client = config_.client_id;
  msg.body = body;
  return encode(msg);
}

void DeviceClient::publish_status(const std::string& state, const std::string& error) {
  const std::vector<std::uint8_t> payload = status_payload(state, error);
  link_->set_birth(topics_.status(config_.client_id), payload);
  link_->publish(topics_.status(config_.client_id), payload, true);
}

void DeviceClient::reject(const std::string& what, const std::string& reason) {
  ++rejected_;
  log_warning("rejected " + what + ": " + reason + " (rejected so far: " + std::to_string(rejected_) + ")");
}

int DeviceClient::run(const std::atomic<bool>& stop) {
  start();
  try {
    while (!stop.load() && !done_) {
      std::optional<Inbound> inbound = link_->receive(0.5);
      after_reconnect();
      if (inbound) handle(*inbound);
    }
  } catch (...) {
    finish();
    throw;
  }
  finish();
  return 0;
}

void DeviceClient::start() {
  link_->connect(config_.connect_timeout_s);
  connected_ = true;
  link_->subscribe({topics_.task(), topics_.round(), topics_.assign(config_.client_id)});
  publish_status("online");
  log_info("client " + config_.client_id + " online: " + std::to_string(data_.num_train()) + " train / " +
           std::to_string(data_.num_test()) + " test examples");
}

void DeviceClient::finish() {
  try {
    if (connected_) publish_status("offline");  // never connected (refused): nothing to announce, one error line
  } catch (const Error& exc) {
    log_warning("cannot announce offline: " + std::string(exc.what()));
  }
  link_->close();
}

void DeviceClient::handle(const Inbound& inbound) {
  const std::string task_topic = topics_.task(), round_topic = topics_.round();
  const std::string assign_topic = topics_.assign(config_.client_id);
  if (inbound.payload.empty() ||
      (inbound.topic != task_topic && inbound.topic != round_topic && inbound.topic != assign_topic)) {
    return;  // a cleared retained message, or broker noise
  }
  Message msg;
  try {
    msg = decode(inbound.payload, static_cast<std::size_t>(config_.max_message_bytes));
    if (msg.fleet != config_.fleet) throw ProtocolError("message for fleet " + py_repr(json(msg.fleet)));
  } catch (const ProtocolError& exc) {
    reject("message on " + inbound.topic, exc.what());
    return;
  }
  try {
    if (inbound.topic == task_topic && msg.kind == kind::kTask) {
      on_task(msg);
    } else if (inbound.topic == round_topic && msg.kind == kind::kRound) {
      on_round(msg, inbound.retained);
    } else if (inbound.topic == assign_topic && msg.kind == kind::kAssign) {
      // The assignment of the round we answered, again (the aggregator or the broker restarted): our update may
      // never have arrived. An older round stays stale and is rejected below.
      if (kept_ && msg.round == kept_->round && msg.client == config_.client_id &&
          msg.body.value("run", json()) == kept_->run && kept_->run == run_id_) {
        resend_kept("the assignment of round " + std::to_string(msg.round) + " arrived again");
        return;
      }
      pending_ = msg;
      if (engine_) on_assignment(msg);
    } else {
      reject("message on " + inbound.topic, "unexpected kind " + msg.kind);
    }
  } catch (const Error& exc) {  // e.g. local labels outside the fleet's: reported, then fatal
    publish_status("error", exc.what());
    throw;
  }
}

void DeviceClient::on_round(const Message& msg, bool retained) {
  const json run = msg.body.value("run", json());
  if (kept_ && run == kept_->run && msg.phase != kPhaseDone && msg.round > kept_->round) kept_.reset();
  // A retained "done" ends our run only if we took part in it (a finished run's leftovers stay retained).
  if (run_id_.empty() || run != run_id_ || msg.phase != kPhaseDone || (last_round_ == 0 && retained)) return;
  kept_.reset();
  trained_.reset();
  const json failed = msg.body.value("failed", json());
  const json reason = msg.body.value("reason", json());
  if (failed == true || reason.is_string()) {
    log_warning("run " + run_id_ + " failed after round " + std::to_string(last_round_) + ": " +
                (reason.is_string() ? py_repr(reason) : std::string("no reason given")));
  } else {
    log_info("run " + run_id_ + " finished after round " + std::to_string(last_round_));
  }
  if (config_.keep_serving) {
    run_id_.clear();
    last_round_ = 0;
    publish_status("online");
  } else {
    done_ = true;
  }
}

void DeviceClient::after_reconnect() {
  const std::uint64_t n = link_->reconnects();
  if (n == seen_reconnects_) return;
  seen_reconnects_ = n;
  if (kept_ && kept_->run == run_id_) resend_kept("reconnected to the broker");
}

void DeviceClient::resend_kept(const std::string& why) {
  seen_reconnects_ = link_->reconnects();
  link_->publish(topics_.update(config_.client_id), kept_->payload, false);
  log_info("round " + std::to_string(kept_->round) + ": sent the update again (" + why + ")");
}

void DeviceClient::on_task(const Message& msg) {
  const json run = msg.body.value("run", json());
  TaskSpec task;
  try {
    task = parse_task(msg.body.value("task", json()));
  } catch (const ConfigError& exc) {
    reject("task", exc.what());
    return;
  }
  if (!run.is_string() || run.get<std::string>() == run_id_) return;
  if (!engine_ || !task_ || !(task == *task_)) {
    log_info("building the executorch engine for model " + task.model.name + " with " +
             std::to_string(task.labels.size()) + " labels");
    try {
      check_task_fits(manifest_, task);
      engine_.reset();  // one program in memory at a time
      engine_ = std::make_unique<Engine>(manifest_, task, config_.threads);
      engine_->set_pad_id(tokenizer_->pad_id());
    } catch (const ArtifactError& exc) {
      reject("task", exc.what());
      publish_status("error", std::string("cannot train this task: ") + exc.what());
      return;
    }
    prepare_local_data(data_, task.labels, *tokenizer_, task.model.max_length);
  }
  task_ = task;
  task_json_ = msg.body.value("task", json());
  run_id_ = run.get<std::string>();
  kept_.reset();
  trained_.reset();
  last_round_ = 0;
  publish_status("ready");
  if (pending_) on_assignment(*pending_);
}

std::int64_t DeviceClient::upload_rank() const {
  if (config_.upload_rank > 0) return config_.upload_rank;
  if (task_->a2.upload_rank > 0) return task_->a2.upload_rank;
  return task_->lora.r;
}

BatchStream DeviceClient::batches(std::int64_t round) const {
  auto order = std::make_shared<BatchOrder>(data_.num_train(), static_cast<std::size_t>(task_->train.batch_size),
                                            batch_seed(task_->seed, config_.client_id, round));
  return [order] { return order->next(); };
}

namespace {

struct CheckedAssignment {
  std::int64_t steps = 0;
  std::vector<std::string> train_roles;  // empty: every role
};

}  // namespace

void DeviceClient::on_assignment(const Message& msg) {
  pending_.reset();
  const TaskSpec& task = *task_;
  CheckedAssignment checked;
  try {
    const SpecMap expected = engine_->expected_state(msg.body);
    validate_assignment(msg, config_.fleet, run_id_, config_.client_id, last_round_, expected);
    if (msg.phase != "train" && msg.phase != "eval" && msg.phase != kTrainA && msg.phase != kTrainB) {
      throw ProtocolError("phase " + py_repr(json(msg.phase)) + " is not supported by this client");
    }
    const json steps = msg.body.value("local_steps", json(task.train.local_steps));
    if (!steps.is_number_integer() || steps.get<std::int64_t>() < 1 || steps.get<std::int64_t>() > kMaxLocalSteps) {
      throw ProtocolError("local_steps must be an integer in [1, " + std::to_string(kMaxLocalSteps) + "], got " +
                          py_repr(steps));
    }
    checked.steps = steps.get<std::int64_t>();
    std::set<std::string> known;
    for (const auto& item : expected) known.insert(item.second.role);
    const auto roles = msg.body.find("train_roles");
    if (roles != msg.body.end() && !roles->is_null()) {
      bool ok = roles->is_array() && !roles->empty();
      for (const json& r : ok ? *roles : json::array()) {
        ok = ok && r.is_string() && known.count(r.get<std::string>());
        if (ok) checked.train_roles.push_back(r.get<std::string>());
      }
      if (!ok) {
        std::string list;
        for (const auto& k : known) list += (list.empty() ? "'" : ", '") + k + "'";
        throw ProtocolError("train_roles must be a non-empty list of roles among [" + list + "]");
      }
    }
    if (msg.phase == kTrainA || msg.phase == kTrainB) {
      const std::string factor = active_factor(msg.phase);
      const std::string frozen = factor == "lora_B" ? "lora_A" : "lora_B";
      const auto& r = checked.train_roles;
      const bool has_factor = std::find(r.begin(), r.end(), factor) != r.end();
      const bool has_frozen = std::find(r.begin(), r.end(), frozen) != r.end();
      if (r.empty() || !has_factor || has_frozen) {
        throw ProtocolError("a " + msg.phase + " round must train " + factor + " and not " + frozen);
      }
    }
  } catch (const ProtocolError& exc) {
    reject("assignment for round " + std::to_string(msg.round), exc.what());
    if (msg.round > last_round_) {  // a QoS 1 redelivery of an answered round is no failure to report
      publish_status("error", "round " + std::to_string(msg.round) + ": " + exc.what());
    }
    return;
  }
  kept_.reset();  // a newer round opened: the last update is no longer needed

  // FlexLoRA: a device of rank r_c < r keeps and sends only its leading ranks.
  std::vector<std::string> own_prefixes;
  std::int64_t own_rank = 0;
  if (msg.body.value(kOwnRank, json()) == true && msg.phase == "train") {
    const std::int64_t k = std::min(upload_rank(), task.lora.r);
    if (k < task.lora.r) {
      own_prefixes = adapter_prefixes(msg.tensors);
      own_rank = k;
    }
  }
  json metrics = json::object();
  const bool deploy_trained =
      choose_deployed(own_rank ? truncate_ranks(msg.tensors, own_prefixes, own_rank) : msg.tensors, msg.body, metrics);
  // What `predict` serves until the next assignment: the model whose test accuracy is acc_deployed.
  std::optional<Model> deployed;
  if (!config_.state_dir.empty()) {
    deployed = deploy_trained ? *trained_ : Model{engine_->get_state(msg.body), msg.body};
  }
  const std::vector<Rows> test =
      batches_of(all_rows(data_.num_test()), static_cast<std::size_t>(task.train.eval_batch_size));
  const EvalStats before = engine_->evaluate(data_.test, test);
  metrics["acc_before"] = before.accuracy;
  metrics["loss_before"] = before.loss;
  metrics["num_test"] = before.samples;
  metrics["eval_s"] = metrics["eval_s"].get<double>() + before.seconds;
  metrics["acc_deployed"] = deploy_trained ? metrics["acc_trained"].get<double>() : before.accuracy;
  TensorMap tensors;
  Roles roles;
  std::int64_t num_samples = std::max<std::int64_t>(before.samples, 1);
  last_losses_.clear();
  if (msg.phase != "eval") {
    TrainStats stats;
    if (msg.phase == "train") {
      stats = engine_->train(data_.train, batches(msg.round), checked.steps, task.train.lr, task.train.weight_decay,
                             checked.train_roles, {}, [this] { link_->poll(); });
      Roles all_roles;
      TensorMap state = engine_->get_state(msg.body, &all_roles);
      for (auto& item : state) {
        const std::string& role = all_roles.at(item.first);
        const auto& r = checked.train_roles;
        if (r.empty() || std::find(r.begin(), r.end(), role) != r.end()) {
          tensors[item.first] = std::move(item.second);
          roles[item.first] = role;
        }
      }
      if (own_rank) {
        tensors = leading_ranks(tensors, own_prefixes, own_rank);
        metrics["client_rank"] = own_rank;
      }
    } else {
      const std::int64_t round = msg.round;
      AlternatingRound a2 = train_alternating(
          *engine_, data_.train, msg.body, msg.phase, [this, round] { return batches(round); }, task, checked.steps,
          upload_rank(), checked.train_roles, [this] { link_->poll(); });
      stats = a2.stats;
      tensors = std::move(a2.tensors);
      roles = std::move(a2.roles);
      metrics["probe_s"] = a2.probe_s;
      metrics["ranks_uploaded"] = a2.ranks();
    }
    last_losses_ = stats.losses;
    metrics["train_loss"] = stats.loss;
    metrics["train_s"] = stats.seconds;
    metrics["steps"] = stats.steps;
    trained_ = Model{engine_->get_state(msg.body), msg.body};
    if (config_.eval_after_training) {
      const EvalStats after = engine_->evaluate(data_.test, test);
      metrics["acc_after"] = after.accuracy;
      metrics["loss_after"] = after.loss;
      metrics["eval_s"] = metrics["eval_s"].get<double>() + after.seconds;
    }
    if (task.uses_experts()) {  // RSEA vectors on the aux set with the post-training weights
      const std::vector<Rows> aux = batches_of(
          aux_indices(data_.num_train(), task.amole.aux_fraction, static_cast<std::size_t>(task.amole.aux_max)),
          static_cast<std::size_t>(task.train.eval_batch_size));
      TensorMap embeddings = engine_->embeddings(data_.train, aux, msg.body);
      if (task.amole.dp_eta > 0) {
        embeddings = privatize(embeddings, task.amole.dp_eta, batch_seed(task.seed, config_.client_id, msg.round) + 1);
      }
      for (auto& item : embeddings) {
        roles[item.first] = kEmbeddingRole;
        tensors[item.first] = std::move(item.second);
      }
    }
    num_samples = static_cast<std::int64_t>(data_.num_train());
  }
  if (const std::string bad = non_finite(metrics, tensors); !bad.empty()) {
    last_round_ = msg.round;  // answered, with an error: a redelivery is not trained again
    const std::string error = "round " + std::to_string(msg.round) + ": " + bad + "; no update sent";
    log_warning(error);
    publish_status("error", error);
    return;
  }
  Message update;
  update.kind = kind::kUpdate;
  update.fleet = config_.fleet;
  update.round = msg.round;
  update.phase = msg.phase;
  update.client = config_.client_id;
  update.body = {{"run", run_id_}, {"num_samples", num_samples}, {"metrics", metrics}};
  update.tensors = std::move(tensors);
  update.roles = std::move(roles);
  const std::vector<std::uint8_t> payload = encode(update);
  // A reconnect during the publish (after the broker took it, say) counts: the update is sent again after it.
  seen_reconnects_ = link_->reconnects();
  link_->publish(topics_.update(config_.client_id), payload, false);
  kept_ = KeptUpdate{run_id_, msg.round, payload};
  last_round_ = msg.round;
  if (deployed) save_deployed(config_.state_dir, task_json_, deployed->body, msg.round, run_id_, deployed->state);
  log_info("round " + std::to_string(msg.round) + " " + msg.phase + ": acc " + fixed3(before.accuracy) + " -> " +
           (metrics.contains("acc_after") ? fixed3(metrics["acc_after"].get<double>()) : std::string("-")) + ", sent " +
           std::to_string(payload.size()) + " bytes");
}

bool DeviceClient::choose_deployed(const TensorMap& received, const json& body, json& metrics) {
  metrics["eval_s"] = 0.0;
  if (!trained_ || data_.num_val() == 0) {
    engine_->set_state(received, body);
    return false;
  }
  const auto size = static_cast<std::size_t>(task_->train.eval_batch_size);
  const std::vector<Rows> val = batches_of(all_rows(data_.num_val()), size);
  engine_->set_state(trained_->state, trained_->body);
  const EvalStats val_trained = engine_->evaluate(data_.val, val);
  const EvalStats kept = engine_->evaluate(data_.test, batches_of(all_rows(data_.num_test()), size));
  engine_->set_state(received, body);
  const EvalStats val_received = engine_->evaluate(data_.val, val);
  // The more accurate on validation; a tie deploys the trained model (edge_client.client.deploys_trained).
  const bool use_trained = val_trained.accuracy >= val_received.accuracy;
  metrics["acc_trained"] = kept.accuracy;
  metrics["val_acc_trained"] = val_trained.accuracy;
  metrics["val_acc_received"] = val_received.accuracy;
  metrics["deployed_trained"] = use_trained ? 1.0 : 0.0;
  metrics["eval_s"] = val_trained.seconds + kept.seconds + val_received.seconds;
  return use_trained;
}

}  // namespace edgemole
