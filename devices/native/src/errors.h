// One-line errors of the native client, by what the user (or a peer) got wrong.
#pragma once

#include <stdexcept>
#include <string>

namespace edgemole {

// Base of every error the client reports as one line (`error: <what>`) and a non-zero exit, or on its status topic.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& what);
};

// A malformed or unexpected message from the broker: rejected, logged and counted; the client keeps serving.
class ProtocolError : public Error {
 public:
  using Error::Error;
};

// An artifact folder that is missing, corrupt, from another export or does not fit the fleet's task.
class ArtifactError : public Error {
 public:
  using Error::Error;
};

// A local data file the client cannot read.
class DataError : public Error {
 public:
  using Error::Error;
};

// A bad configuration file or command-line flag.
class ConfigError : public Error {
 public:
  using Error::Error;
};

// The broker cannot be reached, refuses the connection or a publish fails.
class BrokerError : public Error {
 public:
  using Error::Error;
};

// The first line of `text`, for errors raised by libraries with multi-line messages.
std::string first_line(const std::string& text);

}  // namespace edgemole
