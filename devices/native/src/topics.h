// MQTT topic names of one fleet, all under "<prefix>/<fleet>/" (docs/protocol.md sections 1.3 and 1.4), and the
// name rule that keeps fleet and client ids from breaking the topic structure (no '/', '+', '#', ':').
// Same as edgemole/protocol/topics.py.
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace edgemole {

// True for 1-64 characters from letters, digits, '_', '.', '-', starting with a letter or digit.
bool valid_name(std::string_view value);

// Throws ConfigError("invalid <what> '<value>': use 1-64 characters ...") unless valid_name(value).
void check_name(const std::string& value, const std::string& what);

// Throws ConfigError unless `prefix` is one or more '/'-separated non-empty levels without '+' or '#'.
void check_prefix(const std::string& prefix);

class Topics {
 public:
  // Checks the fleet name and the prefix (ConfigError).
  explicit Topics(std::string fleet = "default", std::string prefix = "edgemole");

  const std::string& fleet() const { return fleet_; }
  const std::string& prefix() const { return prefix_; }
  std::string base() const { return prefix_ + "/" + fleet_; }

  std::string task() const { return base() + "/task"; }        // retained: the fleet's task
  std::string round() const { return base() + "/round"; }      // retained: the current round announcement
  std::string metrics() const { return base() + "/metrics"; }  // per-round results, for observers
  std::string assign(const std::string& client) const { return base() + "/clients/" + client + "/assign"; }
  std::string update(const std::string& client) const { return base() + "/clients/" + client + "/update"; }
  // Retained device status; the broker publishes the client's last will here when it vanishes.
  std::string status(const std::string& client) const { return base() + "/clients/" + client + "/status"; }
  std::string all_updates() const { return base() + "/clients/+/update"; }
  std::string all_status() const { return base() + "/clients/+/status"; }

  // MQTT session id of a role in this fleet: "edgemole:<fleet>:<role>"; ':' cannot occur in names, so no two
  // roles or fleets collide.
  std::string mqtt_client_id(const std::string& role) const { return "edgemole:" + fleet_ + ":" + role; }
  std::string device_mqtt_id(const std::string& client) const { return mqtt_client_id("device:" + client); }

  // (client id, kind) of a "clients/<id>/<kind>" topic of this fleet with a valid id, else nothing.
  std::optional<std::pair<std::string, std::string>> parse_client_topic(const std::string& topic) const;

 private:
  std::string fleet_;
  std::string prefix_;
};

}  // namespace edgemole
