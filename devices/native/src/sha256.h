// SHA-256 of files, through OpenSSL's libcrypto (never hand-written crypto): the artifact's integrity check.
#pragma once

#include <cstdint>
#include <string>

namespace edgemole {

struct FileDigest {
  std::string sha256_hex;  // lower-case hex
  std::uint64_t bytes = 0;
};

// Hash a file in chunks (the default model's base weights are ~91 MB); throws ArtifactError if it cannot be read.
FileDigest digest_file(const std::string& path);

}  // namespace edgemole
