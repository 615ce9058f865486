#include "errors.h"

namespace edgemole {

Error::Error(const std::string& what) : std::runtime_error(first_line(what)) {}

std::string first_line(const std::string& text) {
  const auto end = text.find_first_of("\r\n");
  return end == std::string::npos ? text : text.substr(0, end);
}

}  // namespace edgemole
