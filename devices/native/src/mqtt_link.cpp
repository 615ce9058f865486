#include "mqtt_link.h"

#include <MQTTClient.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>
#include <thread>
#include <utility>

#include "errors.h"
#include "log.h"

namespace edgemole {
namespace {

constexpr double kFirstDelayS = 0.25;
constexpr double kMaxDelayS = 5.0;
constexpr int kDisconnectTimeoutMs = 1000;
constexpr int kMaxPollMessages = 1000;
constexpr int kGrantedFailure = 0x80;  // SUBACK return code of a refused subscription

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

void sleep_s(double seconds) {
  if (seconds > 0) std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
}

unsigned long to_ms(double seconds) {
  return seconds <= 0 ? 0UL : static_cast<unsigned long>(std::min(seconds, 86400.0) * 1000.0);
}

// The MQTT 3.1.1 CONNACK refusals (return codes 1 to 5).
const char* refusal(int rc) {
  switch (rc) {
    case 1:
      return "unacceptable protocol version";
    case 2:
      return "identifier rejected";
    case 3:
      return "server unavailable";
    case 4:
      return "bad user name or password";
    case 5:
      return "not authorized";
    default:
      return "refused";
  }
}

std::string describe(int rc) {
  if (rc == MQTTCLIENT_FAILURE || rc == MQTTCLIENT_DISCONNECTED) {
    return "no connection (refused, unreachable, or no CONNACK in time)";
  }
  if (rc >= 1 && rc <= 5) return refusal(rc);
  const char* text = MQTTClient_strerror(rc);
  return text ? text : "error " + std::to_string(rc);
}

bool all_digits(const std::string& text) {
  return !text.empty() && std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
}

}  // namespace

// -- broker URLs ---------------------------------------------------------------------------------------------------

std::string BrokerAddress::url() const {
  const bool v6 = host.find(':') != std::string::npos;
  return std::string(tls ? "mqtts" : "mqtt") + "://" + (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

std::string BrokerAddress::server_uri() const {
  const bool v6 = host.find(':') != std::string::npos;
  return std::string(tls ? "ssl" : "tcp") + "://" + (v6 ? "[" + host + "]" : host) + ":" + std::to_string(port);
}

BrokerAddress parse_broker_url(const std::string& url) {
  const auto invalid = [&url]() {
    return ConfigError("invalid broker URL '" + url + "' (expected mqtt://host:port or mqtts://host:port)");
  };
  std::string rest = url;
  std::string scheme = "mqtt";
  const auto sep = url.find("://");
  if (sep != std::string::npos) {
    scheme = url.substr(0, sep);
    std::transform(scheme.begin(), scheme.end(), scheme.begin(),
                   [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
    rest = url.substr(sep + 3);
  }
  // Schemes and how Paho reaches them: tcp:// plain, ssl:// TLS.
  if (scheme != "mqtt" && scheme != "tcp" && scheme != "mqtts" && scheme != "ssl") throw invalid();
  const bool tls = scheme == "mqtts" || scheme == "ssl";
  std::string username;
  if (const auto at = rest.rfind('@'); at != std::string::npos) {
    username = rest.substr(0, at);
    rest = rest.substr(at + 1);
    if (username.find(':') != std::string::npos) {
      throw ConfigError("the broker URL must not hold a password (use password_file or " + std::string(kPasswordEnv) +
                        ")");
    }
    if (username.empty() || username.find_first_of("/?#@ \t\r\n") != std::string::npos) throw invalid();
  }
  if (!rest.empty() && rest.back() == '/') rest.pop_back();  // "mqtt://host:1883/" is fine, any other path is not
  if (rest.empty() || rest.find_first_of("/?#@ \t\r\n") != std::string::npos) throw invalid();

  BrokerAddress address;
  address.tls = tls;
  address.port = tls ? 8883 : 1883;
  address.username = username;
  std::string port;
  if (rest.front() == '[') {  // an IPv6 literal: [::1]:1883
    const auto close = rest.find(']');
    if (close == std::string::npos || close == 1) throw invalid();
    address.host = rest.substr(1, close - 1);
    const std::string tail = rest.substr(close + 1);
    if (!tail.empty()) {
      if (tail.front() != ':') throw invalid();
      port = tail.substr(1);
    }
  } else {
    const auto colon = rest.find(':');
    address.host = rest.substr(0, colon);
    if (colon != std::string::npos) port = rest.substr(colon + 1);
    if (address.host.empty() || address.host.find_first_of("[]") != std::string::npos) throw invalid();
  }
  if (!port.empty()) {
    if (!all_digits(port) || port.size() > 5 || std::stoi(port) > 65535) throw invalid();
    address.port = std::stoi(port);
  }
  if (address.port == 0) address.port = tls ? 8883 : 1883;  // as Python's `parsed.port or 1883`
  return address;
}

// -- the link --------------------------------------------------------------------------------------------------------

void MqttLink::ClientDeleter::operator()(void* client) const {
  MQTTClient h = client;
  MQTTClient_destroy(&h);
}

MqttLink::MqttLink(const std::string& broker, std::string client_id, LinkOptions options)
    : address_(parse_broker_url(broker)), client_id_(std::move(client_id)), options_(std::move(options)) {
  Credentials& credentials = options_.credentials;
  if (!address_.username.empty()) {
    if (!credentials.username.empty() && credentials.username != address_.username) {
      throw ConfigError("the broker URL's user name '" + address_.username + "' differs from username '" +
                        credentials.username + "'");
    }
    credentials.username = address_.username;
  }
  if (credentials.tls_files() && !address_.tls) {
    throw ConfigError("ca_file, cert_file and key_file need a TLS broker URL (mqtts://host:port), not " +
                      address_.url());
  }
  if (credentials.password && !address_.tls) {
    warn("the password for " + address_.url() + " travels unencrypted (use mqtts:// outside loopback)");
  }
  MQTTClient h = nullptr;
  const int rc =
      MQTTClient_create(&h, address_.server_uri().c_str(), client_id_.c_str(), MQTTCLIENT_PERSISTENCE_NONE, nullptr);
  if (rc != MQTTCLIENT_SUCCESS) {
    throw BrokerError("cannot create an MQTT client for " + address_.url() + " with client id '" + client_id_ +
                      "': " + describe(rc));
  }
  client_.reset(h);
}

MqttLink::~MqttLink() {
  try {
    close();
  } catch (...) {  // a destructor must not throw; the client is destroyed anyway
  }
}

bool MqttLink::connected() const { return client_ && MQTTClient_isConnected(client_.get()) != 0; }

int MqttLink::on_tls_error(const char* text, std::size_t length, void* self) {
  auto* link = static_cast<MqttLink*>(self);
  if (link == nullptr || text == nullptr || !link->tls_error_.empty()) return 0;
  // OpenSSL 3: "<thread>:error:0A000086:SSL routines:<function>:<reason>:<file>:<line>:"; keep the reason.
  std::string line(text, length);
  line = line.substr(0, line.find_first_of("\r\n"));
  std::size_t start = line.find("error:");
  for (int field = 0; field < 4 && start != std::string::npos; ++field) {
    start = line.find(':', start);
    if (start != std::string::npos) ++start;
  }
  if (start != std::string::npos) {
    const std::string reason = line.substr(start, line.find(':', start) - start);
    if (!reason.empty()) line = reason;
  }
  link->tls_error_ = line.empty() ? "handshake failed" : line;
  return 0;
}

void MqttLink::warn(const std::string& line) const {
  if (options_.log) {
    options_.log(line);
  } else {
    log_warning(line);
  }
}

int MqttLink::start_publish(const std::string& topic, const std::vector<std::uint8_t>& payload, bool retain,
                            int* token) {
  MQTTClient_message message = MQTTClient_message_initializer;
  message.payload = const_cast<std::uint8_t*>(payload.data());  // Paho copies it and never writes to it
  message.payloadlen = static_cast<int>(payload.size());
  message.qos = 1;
  message.retained = retain ? 1 : 0;
  MQTTClient_deliveryToken delivery = 0;
  const int rc = MQTTClient_publishMessage(client_.get(), topic.c_str(), &message, &delivery);
  if (token != nullptr) *token = delivery;
  return rc;
}

int MqttLink::attempt(double timeout_s) {
  MQTTClient_connectOptions opts = MQTTClient_connectOptions_initializer;
  opts.keepAliveInterval = options_.keepalive_s;
  opts.cleansession = options_.clean_session ? 1 : 0;
  opts.MQTTVersion = MQTTVERSION_3_1_1;
  opts.connectTimeout = static_cast<int>(std::clamp(std::ceil(timeout_s), 1.0, 60.0));
  MQTTClient_willOptions will = MQTTClient_willOptions_initializer;
  if (options_.will) {
    will.topicName = options_.will->topic.c_str();
    will.message = nullptr;  // the binary payload below
    will.payload.len = static_cast<int>(options_.will->payload.size());
    will.payload.data = options_.will->payload.data();
    will.qos = 1;
    will.retained = 1;
    opts.will = &will;
  }
  const Credentials& credentials = options_.credentials;
  if (!credentials.username.empty()) opts.username = credentials.username.c_str();
  if (credentials.password) opts.password = credentials.password->c_str();
  MQTTClient_SSLOptions ssl = MQTTClient_SSLOptions_initializer;
  if (address_.tls) {
    // No CA file: the system's trust store. The broker's certificate and its host name are always verified.
    ssl.trustStore = credentials.ca_file.empty() ? nullptr : credentials.ca_file.c_str();
    ssl.keyStore = credentials.cert_file.empty() ? nullptr : credentials.cert_file.c_str();
    ssl.privateKey = credentials.key_file.empty() ? nullptr : credentials.key_file.c_str();
    ssl.enableServerCertAuth = 1;
    ssl.verify = 1;
    ssl.ssl_error_cb = &MqttLink::on_tls_error;
    ssl.ssl_error_context = this;
    opts.ssl = &ssl;
  }
  tls_error_.clear();
  const int rc = MQTTClient_connect(client_.get(), &opts);
  if (rc != MQTTCLIENT_SUCCESS) return rc;
  was_connected_ = true;
  down_ = false;
  delay_s_ = kFirstDelayS;

  if (!subscriptions_.empty()) {
    std::vector<char*> topics;
    for (const std::string& topic : subscriptions_) topics.push_back(const_cast<char*>(topic.c_str()));
    std::vector<int> qos(subscriptions_.size(), 1);
    const int sub = MQTTClient_subscribeMany(client_.get(), static_cast<int>(topics.size()), topics.data(), qos.data());
    if (sub != MQTTCLIENT_SUCCESS || std::count(qos.begin(), qos.end(), kGrantedFailure) > 0) {
      warn("resubscribing at " + address_.url() + " failed: " + describe(sub));
    }
  }
  // Over the will the broker may have published when the connection dropped; acknowledged in later calls.
  if (birth_ && connected()) start_publish(birth_->topic, birth_->payload, true, nullptr);
  while (!outbox_.empty() && connected()) {
    const Outgoing& out = outbox_.front();
    if (start_publish(out.topic, out.payload, out.retain, nullptr) != MQTTCLIENT_SUCCESS) break;
    outbox_.pop_front();
  }
  return MQTTCLIENT_SUCCESS;
}

void MqttLink::connect(double timeout_s) {
  if (connected()) return;
  const double deadline = now_s() + timeout_s;
  double delay = kFirstDelayS;
  int attempts = 0;
  while (true) {
    ++attempts;
    const int rc = attempt(std::max(deadline - now_s(), 1.0));
    if (rc == MQTTCLIENT_SUCCESS) return;
    if (rc >= 1 && rc <= 5) {
      throw BrokerError("MQTT broker at " + address_.url() + " refused the connection: " + refusal(rc));
    }
    if (!tls_error_.empty()) {  // a certificate problem: retrying cannot help
      throw BrokerError("TLS with MQTT broker at " + address_.url() + " failed: " + tls_error_);
    }
    if (rc != MQTTCLIENT_FAILURE && rc != MQTTCLIENT_DISCONNECTED) {  // bad options: retrying cannot help
      throw BrokerError("cannot connect to MQTT broker at " + address_.url() + ": " + describe(rc));
    }
    if (now_s() + delay > deadline) {
      // A TLS listener that wants a client certificate closes the connection after the handshake, with no reason
      // that Paho hands on; say so when we have none.
      const bool no_certificate = address_.tls && options_.credentials.cert_file.empty();
      throw BrokerError("cannot reach MQTT broker at " + address_.url() + " after " + std::to_string(attempts) +
                        " attempts: " + describe(rc) +
                        (no_certificate ? "; a listener that requires a client certificate (cert_file) refuses "
                                          "this client too"
                                        : ""));
    }
    sleep_s(delay);
    delay = std::min(delay * 2, kMaxDelayS);
  }
}

void MqttLink::lost() {
  if (!was_connected_ || down_) return;
  down_ = true;
  warn("lost connection to " + address_.url() + "; reconnecting");
  next_attempt_ = now_s();
  delay_s_ = kFirstDelayS;
}

bool MqttLink::reconnect_until(double deadline) {
  while (!connected()) {
    if (!was_connected_) return false;  // never connected, or closed: only connect() connects
    double t = now_s();
    if (t >= next_attempt_) {
      const int rc = attempt(std::max(deadline - t, 1.0));
      if (rc == MQTTCLIENT_SUCCESS) {
        ++reconnects_;
        warn("reconnected to " + address_.url());
        return true;
      }
      if (!tls_error_.empty()) warn("TLS with " + address_.url() + " failed: " + tls_error_);
      next_attempt_ = now_s() + delay_s_;
      delay_s_ = std::min(delay_s_ * 2, kMaxDelayS);
    }
    t = now_s();
    if (t >= deadline) return false;
    sleep_s(std::min(next_attempt_, deadline) - t);
  }
  return true;
}

bool MqttLink::pump(unsigned long timeout_ms) {
  char* topic = nullptr;
  int topic_len = 0;
  MQTTClient_message* message = nullptr;
  MQTTClient_receive(client_.get(), &topic, &topic_len, &message, timeout_ms);
  const bool got = message != nullptr;
  if (got) {
    MqttMessage in;
    if (topic != nullptr) {
      in.topic = topic_len > 0 ? std::string(topic, static_cast<std::size_t>(topic_len)) : std::string(topic);
    }
    const auto* bytes = static_cast<const std::uint8_t*>(message->payload);
    if (message->payloadlen > 0) in.payload.assign(bytes, bytes + message->payloadlen);
    in.retained = message->retained != 0;
    in.qos = message->qos;
    bytes_in_ += in.payload.size();
    inbox_.push_back(std::move(in));
    MQTTClient_freeMessage(&message);
  }
  if (topic != nullptr) MQTTClient_free(topic);
  if (!connected()) lost();
  return got;
}

void MqttLink::subscribe(const std::vector<std::string>& topics) {
  for (const std::string& topic : topics) {
    if (std::find(subscriptions_.begin(), subscriptions_.end(), topic) == subscriptions_.end()) {
      subscriptions_.push_back(topic);
    }
  }
  if (topics.empty() || !connected()) return;  // subscribed on (re)connect
  std::vector<char*> names;
  for (const std::string& topic : topics) names.push_back(const_cast<char*>(topic.c_str()));
  std::vector<int> qos(topics.size(), 1);
  const int rc = MQTTClient_subscribeMany(client_.get(), static_cast<int>(names.size()), names.data(), qos.data());
  if (rc != MQTTCLIENT_SUCCESS) {
    if (!connected()) {  // dropped meanwhile: the reconnect subscribes
      lost();
      return;
    }
    throw BrokerError("subscribing to " + topics.front() + " at " + address_.url() + " failed: " + describe(rc));
  }
  for (std::size_t i = 0; i < topics.size(); ++i) {
    if (qos[i] == kGrantedFailure) throw BrokerError("the broker refused the subscription to " + topics[i]);
  }
}

std::size_t MqttLink::publish(const std::string& topic, const std::vector<std::uint8_t>& payload, bool retain,
                              std::optional<double> wait_s) {
  if (payload.size() > static_cast<std::size_t>(INT_MAX)) {  // Paho's length is an int (MQTT's limit is 256 MiB)
    throw BrokerError("cannot publish " + std::to_string(payload.size()) + " bytes to " + topic + ": too large");
  }
  const double deadline = now_s() + (wait_s ? std::max(*wait_s, 0.0) : 0.0);
  if (!connected()) {
    lost();
    reconnect_until(deadline);
  }
  int token = 0;
  const int rc = connected() ? start_publish(topic, payload, retain, &token) : MQTTCLIENT_DISCONNECTED;
  if (rc == MQTTCLIENT_DISCONNECTED) {
    lost();
    outbox_.push_back({topic, payload, retain});
    warn("not connected to " + address_.url() + ": the message to " + topic + " is sent after reconnecting");
    bytes_out_ += payload.size();
    return payload.size();
  }
  if (rc != MQTTCLIENT_SUCCESS) throw BrokerError("publish to " + topic + " failed: " + describe(rc));
  bytes_out_ += payload.size();
  if (!wait_s) return payload.size();
  // Paho keeps an unacknowledged QoS 1 message across a reconnect (clean session off) and sends it again.
  while (true) {
    const double remaining = deadline - now_s();
    if (remaining <= 0) break;
    const int done = MQTTClient_waitForCompletion(client_.get(), token, to_ms(remaining));
    if (done == MQTTCLIENT_SUCCESS && connected()) return payload.size();
    if (!connected()) {
      lost();
      if (!reconnect_until(deadline)) break;
    } else if (done != MQTTCLIENT_SUCCESS) {
      break;
    }
  }
  warn("publish to " + topic + " was not acknowledged within " + std::to_string(static_cast<int>(*wait_s)) +
       " s; it is sent again after a reconnect");
  return payload.size();
}

std::optional<MqttMessage> MqttLink::receive(double timeout_s) {
  const double deadline = now_s() + std::max(timeout_s, 0.0);
  while (true) {
    if (!inbox_.empty()) {
      MqttMessage in = std::move(inbox_.front());
      inbox_.pop_front();
      return in;
    }
    if (!connected()) {
      lost();
      if (!reconnect_until(deadline)) {
        sleep_s(deadline - now_s());  // closed or never connected: nothing can arrive
        return std::nullopt;
      }
      continue;
    }
    pump(to_ms(deadline - now_s()));
    if (inbox_.empty() && now_s() >= deadline) return std::nullopt;
  }
}

void MqttLink::poll() {
  if (!connected()) {
    lost();
    reconnect_until(now_s());
    return;
  }
  for (int i = 0; i < kMaxPollMessages && pump(0); ++i) {
  }
}

void MqttLink::set_birth(std::string topic, std::vector<std::uint8_t> payload) {
  birth_ = RetainedMessage{std::move(topic), std::move(payload)};
}

void MqttLink::close() {
  if (connected()) MQTTClient_disconnect(client_.get(), kDisconnectTimeoutMs);
  was_connected_ = false;
  down_ = false;
}

}  // namespace edgemole
