#include "sha256.h"

#include <openssl/evp.h>

#include <array>
#include <cstdio>
#include <memory>

#include "errors.h"

namespace edgemole {

FileDigest digest_file(const std::string& path) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) throw ArtifactError(path + ": cannot be read");
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) throw Error("OpenSSL cannot hash");
  std::array<unsigned char, 1 << 16> buffer{};
  FileDigest out;
  for (;;) {
    const std::size_t n = std::fread(buffer.data(), 1, buffer.size(), file.get());
    if (n > 0) {
      EVP_DigestUpdate(ctx.get(), buffer.data(), n);
      out.bytes += n;
    }
    if (n < buffer.size()) {
      if (std::ferror(file.get())) throw ArtifactError(path + ": read error");
      break;
    }
  }
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx.get(), digest.data(), &length);
  static const char* hex = "0123456789abcdef";
  for (unsigned int i = 0; i < length; ++i) {
    out.sha256_hex += hex[digest[i] >> 4];
    out.sha256_hex += hex[digest[i] & 15];
  }
  return out;
}

}  // namespace edgemole
