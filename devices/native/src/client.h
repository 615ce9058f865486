// The native device client: the protocol state machine of edge_client/client.py over the ExecuTorch engine.
//
// It waits for the fleet's task, builds its model from the artifact, answers every assignment addressed to it with
// one round of local work (evaluate, train, evaluate, RSEA embeddings) and publishes the update. Every inbound
// message is validated before it touches any state; a bad one is logged, counted and (for an assignment of a new
// round) reported on the status topic, and the client keeps serving.
//
// Nothing is lost when the broker or the aggregator restarts: the last update is kept until the next round opens,
// and sent again after a reconnect and when the assignment of that round arrives again (the aggregator drops the
// duplicates). A round whose training gives a non-finite loss, metric or tensor is answered with an error status
// and no update.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "config.h"
#include "engine.h"
#include "manifest.h"
#include "message.h"
#include "tokenizer.h"
#include "topics.h"

namespace edgemole {

struct Inbound {
  std::string topic;
  std::vector<std::uint8_t> payload;
  bool retained = false;
};

// What the client needs from a transport: the MQTT link, or a recording one for one-shot rounds and tests.
class Link {
 public:
  virtual ~Link() = default;
  virtual void connect(double timeout_s) = 0;
  virtual void subscribe(const std::vector<std::string>& topics) = 0;
  virtual void publish(const std::string& topic, const std::vector<std::uint8_t>& payload, bool retain) = 0;
  virtual std::optional<Inbound> receive(double timeout_s) = 0;
  // Keep the connection alive during long local work (called between training steps).
  virtual void poll() = 0;
  // The retained message re-published after every reconnect (the device's latest status, over its last will).
  virtual void set_birth(const std::string& topic, const std::vector<std::uint8_t>& payload) = 0;
  virtual void close() = 0;
  // How often the connection came back after a loss (the client then re-sends its kept update).
  virtual std::uint64_t reconnects() const { return 0; }
};

// The MQTT link of a device (Paho C): client id, clean session off, retained last will "offline". Loads the
// credentials of the config and checks that the client id is their name (ConfigError); with a credential the MQTT
// client id is that name, else "edgemole:<fleet>:device:<id>".
std::unique_ptr<Link> make_mqtt_link(const DeviceConfig& config, const Topics& topics,
                                     const std::vector<std::uint8_t>& will);

// A device's data, read once and tokenised for the fleet's labels when a task arrives. Training rows exclude the
// validation rows: no round trains on those, they choose the deployed model.
struct LocalData {
  std::vector<std::string> train_texts, train_labels, test_texts, test_labels, val_texts, val_labels;
  EncodedSplit train, test, val;
  std::size_t num_train() const { return train_texts.size(); }
  std::size_t num_test() const { return test_texts.size(); }
  std::size_t num_val() const { return val_texts.size(); }
};

// Read the data file (and the optional test file, else hold out test_fraction with the split seed crc32(client)),
// then hold out val_fraction of the training rows with seed crc32(client) + 1 (docs/protocol.md 10.3a).
LocalData read_local_data(const DeviceConfig& config);
// Tokenise the splits for the fleet's label order; DataError for a label outside the task's.
void prepare_local_data(LocalData& data, const std::vector<std::string>& labels, const Tokenizer& tokenizer,
                        std::int64_t max_length);

class DeviceClient {
 public:
  // Reads the data and the artifact's manifest (and checks its files) before connecting, so that a bad data file or
  // artifact is a fatal one-line error at start.
  DeviceClient(DeviceConfig config, std::unique_ptr<Link> link = nullptr);
  ~DeviceClient();

  // Serve until the run ends (or forever with keep_serving) or `stop` becomes true; returns the exit code.
  int run(const std::atomic<bool>& stop);
  // Connect, subscribe, announce online.
  void start();
  // Handle one inbound message (an assignment is a whole round of local work).
  void handle(const Inbound& inbound);
  // Announce offline and disconnect.
  void finish();

  bool done() const { return done_; }
  std::int64_t rejected() const { return rejected_; }
  std::int64_t last_round() const { return last_round_; }
  // Per-step losses of the last round's training (the probe excluded), for parity checks.
  const std::vector<float>& last_losses() const { return last_losses_; }
  const Topics& topics() const { return topics_; }
  Engine* engine() { return engine_.get(); }
  LocalData& data() { return data_; }
  // The status message (docs/protocol.md 4.2); `last_will`: the one the broker publishes when the connection is
  // lost, written at connect time, so without the device's clock (`time_unix`).
  std::vector<std::uint8_t> status_payload(const std::string& state, const std::string& error = "",
                                           bool last_will = false) const;

 private:
  // What was last sent: kept until the next round of the run opens, re-sent when it may have been lost.
  struct KeptUpdate {
    std::string run;
    std::int64_t round = 0;
    std::vector<std::uint8_t> payload;
  };
  // A model under its wire names with the assignment body it belongs to (its expert map).
  struct Model {
    TensorMap state;
    nlohmann::json body;
  };

  void publish_status(const std::string& state, const std::string& error = "");
  void on_round(const Message& msg, bool retained);
  // After the link reconnected (its birth re-published the status): the kept update again.
  void after_reconnect();
  void resend_kept(const std::string& why);
  void reject(const std::string& what, const std::string& reason);
  // Of the received model and the one kept from the last training, the one to deploy (docs/deployed-model.md):
  // true for the kept one when it is at least as accurate on the validation split. Sets eval_s in `metrics`
  // and, with a kept model and a validation split, acc_trained, val_acc_trained, val_acc_received and
  // deployed_trained. Leaves the received model loaded (what the round trains from).
  bool choose_deployed(const TensorMap& received, const nlohmann::json& body, nlohmann::json& metrics);
  void on_task(const Message& msg);
  void on_assignment(const Message& msg);
  std::int64_t upload_rank() const;
  BatchStream batches(std::int64_t round) const;

  DeviceConfig config_;
  Topics topics_;
  Manifest manifest_;
  LocalData data_;
  std::unique_ptr<Link> link_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Engine> engine_;
  std::optional<TaskSpec> task_;
  nlohmann::json task_json_;  // the task as received (kept with the deployed model)
  std::string run_id_;
  std::int64_t last_round_ = 0;
  std::optional<Message> pending_;
  std::int64_t rejected_ = 0;
  bool done_ = false;
  std::vector<float> last_losses_;
  std::optional<KeptUpdate> kept_;
  std::optional<Model> trained_;  // the model this device last trained in this run (none before its first round)
  std::uint64_t seen_reconnects_ = 0;
  bool connected_ = false;  // start() connected once
};

}  // namespace edgemole
