// The client's Link over the Paho MQTT link (kept apart so that the client logic is testable without a broker).
#include "client.h"
#include "credentials.h"
#include "errors.h"
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
  std::uint64_t reconnects() const override { return link_.reconnects(); }

 private:
  MqttLink link_;
};

}  // namespace

std::unique_ptr<Link> make_mqtt_link(const DeviceConfig& config, const Topics& topics,
                                     const std::vector<std::uint8_t>& will) {
  LinkOptions options;
  options.clean_session = false;
  options.will = RetainedMessage{topics.status(config.client_id), will};
  CredentialConfig files{config.ca_file, config.cert_file, config.key_file, config.username, config.password_file};
  const BrokerAddress address = parse_broker_url(config.broker);
  if (!address.username.empty()) {
    if (!files.username.empty() && files.username != address.username) {
      throw ConfigError("the broker URL's user name '" + address.username + "' differs from username '" +
                        files.username + "'");
    }
    files.username = address.username;
  }
  options.credentials = load_credentials(files);
  check_identity(config.client_id, options.credentials);
  // With an identity the broker knows (its ACL patterns use it), the MQTT client id is that name.
  const std::string mqtt_id =
      options.credentials.name.empty() ? topics.device_mqtt_id(config.client_id) : options.credentials.name;
  return std::make_unique<PahoLink>(config.broker, mqtt_id, std::move(options));
}

}  // namespace edgemole
