// Broker URLs (plain and TLS, a user name, never a password) and the device's credential checks that need no
// certificate (tests/test_native_tls.py runs the certificate ones against the generated fleet files).
#include <doctest/doctest.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include "credentials.h"
#include "errors.h"
#include "mqtt_link.h"

using namespace edgemole;

namespace {

std::string config_error(const std::string& url) {
  try {
    parse_broker_url(url);
  } catch (const ConfigError& exc) {
    return exc.what();
  }
  return "";
}

std::string credential_error(const CredentialConfig& config) {
  try {
    load_credentials(config);
  } catch (const ConfigError& exc) {
    return exc.what();
  }
  return "";
}

}  // namespace

TEST_CASE("broker URLs: schemes, default ports, a user name") {
  BrokerAddress a = parse_broker_url("mqtts://broker.local");
  CHECK(a.tls);
  CHECK(a.port == 8883);
  CHECK(a.server_uri() == "ssl://broker.local:8883");
  CHECK(a.url() == "mqtts://broker.local:8883");
  a = parse_broker_url("SSL://[::1]:9000/");
  CHECK(a.tls);
  CHECK(a.host == "::1");
  CHECK(a.server_uri() == "ssl://[::1]:9000");
  a = parse_broker_url("mqtt://pi-01@10.0.0.2");
  CHECK(!a.tls);
  CHECK(a.port == 1883);
  CHECK(a.username == "pi-01");
  CHECK(a.url() == "mqtt://10.0.0.2:1883");  // no user name in what is logged
  CHECK(parse_broker_url("tcp://h:0").port == 1883);
  CHECK(parse_broker_url("mqtts://h:0").port == 8883);
  CHECK(parse_broker_url("h:1884").server_uri() == "tcp://h:1884");
}

TEST_CASE("broker URLs that are refused") {
  for (const char* url : {"http://h:1883", "mqtts://", "mqtts://h:65536", "mqtt://@h", "mqtt://h/x", "wss://h"}) {
    CAPTURE(url);
    CHECK(config_error(url) ==
          "invalid broker URL '" + std::string(url) + "' (expected mqtt://host:port or mqtts://host:port)");
  }
  const std::string error = config_error("mqtts://pi-01:secret@h:8883");
  CHECK(error == "the broker URL must not hold a password (use password_file or EDGEMOLE_MQTT_PASSWORD)");
  CHECK(error.find("secret") == std::string::npos);
}

TEST_CASE("credentials: files, the password and the identity") {
  CHECK(load_credentials({}).name.empty());
  CHECK(credential_error({"/nonexistent/ca.crt", "", "", "", ""}) ==
        "ca_file '/nonexistent/ca.crt' does not exist or cannot be read");
  CHECK(credential_error({"", "/x/client.crt", "", "", ""}) ==
        "cert_file and key_file go together (the client certificate and its private key)");
  CHECK(credential_error({"", "", "", "", "/x/password"}) == "password_file needs a username");
  {
    std::ofstream("edgemole-test-not-a-cert.pem") << "not a certificate\n";
    CHECK(credential_error({"edgemole-test-not-a-cert.pem", "", "", "", ""}) ==
          "ca_file 'edgemole-test-not-a-cert.pem' is not a PEM certificate");
  }
  std::ofstream("edgemole-test-password") << "s3cret\n";
  Credentials c = load_credentials({"", "", "", "pi-01", "edgemole-test-password"});
  CHECK(c.name == "pi-01");
  REQUIRE(c.password.has_value());
  CHECK(*c.password == "s3cret");  // one trailing newline dropped
  std::ofstream("edgemole-test-password") << "";
  CHECK(credential_error({"", "", "", "pi-01", "edgemole-test-password"}) ==
        "password_file 'edgemole-test-password' is empty");
  // no file: the environment; no user name: no password at all
  ::setenv(kPasswordEnv, "from-env", 1);
  CHECK(load_credentials({"", "", "", "pi-01", ""}).password.value_or("") == "from-env");
  CHECK(!load_credentials({}).password.has_value());
  ::unsetenv(kPasswordEnv);
  CHECK(!load_credentials({"", "", "", "pi-01", ""}).password.has_value());

  CHECK_NOTHROW(check_identity("pi-01", c));
  CHECK_NOTHROW(check_identity("anyone", Credentials{}));
  try {
    check_identity("pi-02", c);
    FAIL("a client id that is not the credential's name must be refused");
  } catch (const ConfigError& exc) {
    CHECK(std::string(exc.what()) ==
          "client id 'pi-02' differs from its credential's name 'pi-01' (username): a device connects only as itself");
  }
  std::remove("edgemole-test-password");
  std::remove("edgemole-test-not-a-cert.pem");
}
