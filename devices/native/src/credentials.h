// The device's MQTT identity: the CA that signs the broker's certificate, its own client certificate and key (mutual
// TLS) and/or a user name with a password read from a file or EDGEMOLE_MQTT_PASSWORD (never from the command line,
// never logged). The broker's ACL gives each identity its own topics, so a device must connect as itself: its client
// id must equal its credential's name (the user name, else the certificate's subject CN), which the broker also uses
// as the MQTT client id (use_username_as_clientid / use_identity_as_username).
#pragma once

#include <optional>
#include <string>

namespace edgemole {

// Environment variable with the password when no password_file is given.
inline constexpr const char* kPasswordEnv = "EDGEMOLE_MQTT_PASSWORD";

// What the device config names (paths, not contents).
struct CredentialConfig {
  std::string ca_file, cert_file, key_file, username, password_file;
};

// Checked credentials, ready for the link. The password is only held, never printed.
struct Credentials {
  std::string ca_file, cert_file, key_file, username;
  std::optional<std::string> password;
  std::string name;  // the identity: username, else the certificate's CN; "" with no credential

  bool tls_files() const { return !ca_file.empty() || !cert_file.empty() || !key_file.empty(); }
};

// Reads and checks what `config` names: every file exists and is readable, the certificate and key parse and belong
// together, the password comes from password_file (one line; a trailing newline is dropped) or the environment.
// ConfigError with one line that names the key and the path, never the password.
Credentials load_credentials(const CredentialConfig& config);

// The subject CN of a PEM certificate (OpenSSL's X509 API); ConfigError when it cannot be read or has none.
std::string certificate_common_name(const std::string& path);

// ConfigError unless the client id equals the credential's name (no credential: nothing to check).
void check_identity(const std::string& client_id, const Credentials& credentials);

}  // namespace edgemole
