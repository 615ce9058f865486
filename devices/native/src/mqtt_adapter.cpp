// The client's Link over the Paho MQTT link (kept apart so that the client logic is testable without a broker).
#include "client.h"
#include "mqtt_link.h"

namespace edgemole {

namespace {

class PahoLink final : public Link {
 public:
  PahoLink(const std::string& broker, const std::string& client_id, LinkOptions options)
      : link_(broker, client_id, std::move(options)) {}

  void connect(double timeout_s) override { link_.connect(timeout_s); }
  void subscribe(const std::vector<std::string>& topics) override { link_.subscribe(topics); }
  void publish(const std::string& topic, const std::vector<std::uint8_t>& payload, bool retain) override {
    link_.publish(topic, payload, retain);
  }
  std::optional<Inbound> receive(double timeout_s) override {
    std::optional<MqttMessage> m = link_.receive(timeout_s);
    if (!m) return std::nullopt;
    return Inbound{std::move(m->topic), std::move(m->payload), m->retained};
  }
  void poll() override { link_.poll(); }
  void set_birth(const std::string& topic, const std::vector<std::uint8_t>& payload) override {
    link_.set_birth(topic, payload);
  }
  void close() override { link_.close(); }

 private:
  MqttLink link_;
};

}  // namespace

std::unique_ptr<Link> make_mqtt_link(const DeviceConfig& config, const Topics& topics,
                                     const std::vector<std::uint8_t>& will) {
  LinkOptions options;
  options.clean_session = false;
  options.will = RetainedMessage{topics.status(config.client_id), will};
  return std::make_unique<PahoLink>(config.broker, topics.device_mqtt_id(config.client_id), std::move(options));
}

}  // namespace edgemole
