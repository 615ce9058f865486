// One MQTT connection of the device (docs/protocol.md section 1), as edgemole/mqtt.py's MqttLink: QoS 1 both ways,
// a persistent session (clean session off), a retained last will, a "birth" status re-published after every
// (re)connect, resubscription and reconnection with back-off, and byte counters of the payloads.
//
// It uses Paho C's synchronous MQTTClient API with no callbacks set, so the link creates no thread at all: all
// network work happens inside receive(), poll() and publish() on the caller's thread (needed under qemu-aarch64,
// /work/shared/DESIGN.md section 6a, and it keeps every state change on the client's one thread). Inbound messages
// that arrive while publishing or polling are queued, in order, for receive().
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "credentials.h"

namespace edgemole {

// A parsed broker URL: mqtt://host:port, tcp://host:port or host:port (port 1883 when absent), or with TLS
// mqtts://host:port or ssl://host:port (port 8883 when absent). A user name may precede the host (mqtt://pi-01@host);
// a password may not (it would show in process listings and logs).
struct BrokerAddress {
  std::string host;  // without the brackets of an IPv6 literal
  int port = 1883;
  bool tls = false;      // MqttLink passes Paho its SSL options (server certificate and host name verified)
  std::string username;  // from the URL's user@ part; "" when none

  std::string url() const;         // mqtt://host:port or mqtts://host:port, as messages show it (no user name)
  std::string server_uri() const;  // what Paho connects to: tcp://host:port or ssl://host:port
};

// Throws ConfigError("invalid broker URL '<url>' (expected mqtt://host:port or mqtts://host:port)") for anything
// else (another scheme, a path, a port that is not 0..65535), and a ConfigError that says why for a password in it.
BrokerAddress parse_broker_url(const std::string& url);

// A message as received (named apart from client.h's transport-neutral Inbound, which the adapter fills from it).
struct MqttMessage {
  std::string topic;
  std::vector<std::uint8_t> payload;
  bool retained = false;
  int qos = 0;  // as delivered by the broker: the lower of the publisher's and the subscription's QoS
};

// A retained message set on the link: the last will, or the birth status.
struct RetainedMessage {
  std::string topic;
  std::vector<std::uint8_t> payload;
};

struct LinkOptions {
  bool clean_session = false;
  std::optional<RetainedMessage> will;  // published by the broker (QoS 1, retained) when the link vanishes
  int keepalive_s = 30;
  // CA, client certificate and key (TLS URLs only), user name and password. The caller checks them first
  // (load_credentials); the password is never logged.
  Credentials credentials;
  // Warnings (lost connection, reconnected, a publish not acknowledged in time); log_warning() when empty.
  std::function<void(const std::string&)> log;
};

class MqttLink {
 public:
  // Checks the URL (ConfigError) and creates the Paho client (BrokerError); connects nothing yet.
  MqttLink(const std::string& broker, std::string client_id, LinkOptions options = {});
  ~MqttLink();  // disconnects (the broker then drops the will) and destroys the client
  MqttLink(const MqttLink&) = delete;
  MqttLink& operator=(const MqttLink&) = delete;

  // Connects, retrying with exponential back-off (0.25 s doubling to 5 s) while the broker cannot be reached.
  // BrokerError, one line: "cannot reach MQTT broker at <url> after <n> attempts: <why>" when time runs out,
  // "MQTT broker at <url> refused the connection: <reason>" at once when the broker answers with a refusal,
  // "TLS with MQTT broker at <url> failed: <OpenSSL's reason>" at once when the handshake fails (a certificate that
  // does not verify against ca_file, a client certificate the broker refuses).
  void connect(double timeout_s = 30.0);

  // Subscribes at QoS 1 now (when connected) and again after every reconnect.
  void subscribe(const std::vector<std::string>& topics);

  // Publishes at QoS 1 and, with a wait, returns once the broker acknowledged it (reconnecting meanwhile if
  // needed). When the broker stays away or does not acknowledge within wait_s, the message is kept (by the link
  // or by Paho) and sent after the next reconnect, as the Python link does; a warning is logged. Returns the
  // payload's size, which is added to bytes_out(). BrokerError only for a publish the broker can never take.
  std::size_t publish(const std::string& topic, const std::vector<std::uint8_t>& payload, bool retain = false,
                      std::optional<double> wait_s = 30.0);

  // The next inbound message, or nothing after timeout_s. Meanwhile it answers keep-alives and, when the
  // connection dropped, reconnects with back-off (resubscribing and re-publishing the birth status).
  std::optional<MqttMessage> receive(double timeout_s);

  // Keeps the connection alive between training steps without blocking: handles keep-alive and acknowledgements,
  // queues any inbound message for receive(), and makes a reconnect attempt when one is due.
  void poll();

  // The retained status re-published after every (re)connect, over the last will the broker may have published
  // when the connection dropped. Only stored: publish it yourself now (as edge_client does).
  void set_birth(std::string topic, std::vector<std::uint8_t> payload);

  bool connected() const;
  // Disconnects cleanly (no will); reconnects only on a later connect(). Safe to call twice.
  void close();

  const BrokerAddress& address() const { return address_; }
  const std::string& client_id() const { return client_id_; }
  std::uint64_t bytes_in() const { return bytes_in_; }    // payload bytes received
  std::uint64_t bytes_out() const { return bytes_out_; }  // payload bytes published
  std::uint64_t reconnects() const { return reconnects_; }
  std::size_t queued() const { return inbox_.size(); }  // received, not yet returned by receive()

 private:
  struct Outgoing {
    std::string topic;
    std::vector<std::uint8_t> payload;
    bool retain = false;
  };
  struct ClientDeleter {
    void operator()(void* client) const;
  };

  // One connection attempt of at most timeout_s; on success resubscribes, re-publishes the birth status and sends
  // what waited. Returns 0 or Paho's return code (1..5: the broker's refusal).
  int attempt(double timeout_s);
  // Reconnects with back-off until `deadline` (a steady-clock time in seconds); true when connected.
  bool reconnect_until(double deadline);
  // One MQTTClient_receive of at most timeout_ms; queues a message; notices a lost connection.
  bool pump(unsigned long timeout_ms);
  void lost();
  void warn(const std::string& line) const;
  // Paho's ssl_error_cb: keeps OpenSSL's first reason of the current attempt (Paho would print it to stderr).
  static int on_tls_error(const char* text, std::size_t length, void* self);
  int start_publish(const std::string& topic, const std::vector<std::uint8_t>& payload, bool retain, int* token);

  BrokerAddress address_;
  std::string client_id_;
  LinkOptions options_;
  std::unique_ptr<void, ClientDeleter> client_;
  std::vector<std::string> subscriptions_;
  std::optional<RetainedMessage> birth_;
  std::string tls_error_;  // OpenSSL's reason for the last failed attempt, "" when none
  std::deque<MqttMessage> inbox_;
  std::deque<Outgoing> outbox_;  // published while disconnected: sent after the next reconnect
  bool was_connected_ = false;   // connected at least once and not closed: a drop means "reconnect"
  bool down_ = false;            // the drop was noticed (and logged); reconnecting
  double next_attempt_ = 0;      // steady-clock seconds of the next reconnect attempt
  double delay_s_ = 0.25;        // the back-off, doubling to 5 s
  std::uint64_t bytes_in_ = 0, bytes_out_ = 0, reconnects_ = 0;
};

}  // namespace edgemole
