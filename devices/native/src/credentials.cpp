#include "credentials.h"

#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <memory>

#include "errors.h"

namespace edgemole {
namespace {

struct FileCloser {
  void operator()(std::FILE* f) const { std::fclose(f); }
};
struct X509Deleter {
  void operator()(X509* x) const { X509_free(x); }
};
struct KeyDeleter {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using File = std::unique_ptr<std::FILE, FileCloser>;

File open_readable(const std::string& key, const std::string& path) {
  File file(std::fopen(path.c_str(), "rb"));
  if (!file) throw ConfigError(key + " '" + path + "' does not exist or cannot be read");
  return file;
}

std::unique_ptr<X509, X509Deleter> read_certificate(const std::string& key, const std::string& path) {
  File file = open_readable(key, path);
  std::unique_ptr<X509, X509Deleter> cert(PEM_read_X509(file.get(), nullptr, nullptr, nullptr));
  ERR_clear_error();  // the reason is ours, one line; nothing left for Paho to print later
  if (!cert) throw ConfigError(key + " '" + path + "' is not a PEM certificate");
  return cert;
}

std::string read_password_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("password_file '" + path + "' does not exist or cannot be read");
  std::string text{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
  if (!text.empty() && text.back() == '\n') text.pop_back();
  if (!text.empty() && text.back() == '\r') text.pop_back();
  if (text.empty()) throw ConfigError("password_file '" + path + "' is empty");
  if (text.find_first_of("\r\n") != std::string::npos) {
    throw ConfigError("password_file '" + path + "' must hold one line (the password)");
  }
  return text;
}

}  // namespace

std::string certificate_common_name(const std::string& path) {
  const auto cert = read_certificate("cert_file", path);
  const X509_NAME* subject = X509_get_subject_name(cert.get());
  const int index = subject ? X509_NAME_get_index_by_NID(subject, NID_commonName, -1) : -1;
  const X509_NAME_ENTRY* entry = index >= 0 ? X509_NAME_get_entry(subject, index) : nullptr;
  const ASN1_STRING* data = entry ? X509_NAME_ENTRY_get_data(entry) : nullptr;
  unsigned char* utf8 = nullptr;
  const int length = data ? ASN1_STRING_to_UTF8(&utf8, data) : -1;
  if (length <= 0) {
    OPENSSL_free(utf8);
    throw ConfigError("cert_file '" + path + "' has no subject common name (CN) to use as the device's identity");
  }
  std::string name(reinterpret_cast<const char*>(utf8), static_cast<std::size_t>(length));
  OPENSSL_free(utf8);
  return name;
}

Credentials load_credentials(const CredentialConfig& config) {
  Credentials out;
  out.ca_file = config.ca_file;
  out.cert_file = config.cert_file;
  out.key_file = config.key_file;
  out.username = config.username;
  if (!config.ca_file.empty()) read_certificate("ca_file", config.ca_file);
  if (config.cert_file.empty() != config.key_file.empty()) {
    throw ConfigError("cert_file and key_file go together (the client certificate and its private key)");
  }
  if (!config.cert_file.empty()) {
    const auto cert = read_certificate("cert_file", config.cert_file);
    File file = open_readable("key_file", config.key_file);
    std::unique_ptr<EVP_PKEY, KeyDeleter> key(PEM_read_PrivateKey(file.get(), nullptr, nullptr, nullptr));
    const bool matches = key && X509_check_private_key(cert.get(), key.get()) == 1;
    ERR_clear_error();
    if (!key) throw ConfigError("key_file '" + config.key_file + "' is not an unencrypted PEM private key");
    if (!matches) {
      throw ConfigError("key_file '" + config.key_file + "' is not the key of cert_file '" + config.cert_file + "'");
    }
  }
  if (!config.password_file.empty()) {
    if (config.username.empty()) throw ConfigError("password_file needs a username");
    out.password = read_password_file(config.password_file);
  } else if (!config.username.empty()) {
    if (const char* env = std::getenv(kPasswordEnv); env != nullptr && *env != '\0') out.password = std::string(env);
  }
  out.name = !config.username.empty()    ? config.username
             : !config.cert_file.empty() ? certificate_common_name(config.cert_file)
                                         : std::string();
  return out;
}

void check_identity(const std::string& client_id, const Credentials& credentials) {
  if (credentials.name.empty() || credentials.name == client_id) return;
  const std::string source = credentials.username.empty() ? "the CN of cert_file" : "username";
  throw ConfigError("client id '" + client_id + "' differs from its credential's name '" + credentials.name + "' (" +
                    source + "): a device connects only as itself");
}

}  // namespace edgemole
