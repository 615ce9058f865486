#include "topics.h"

#include "errors.h"
#include "message.h"

namespace edgemole {
namespace {

bool alnum(char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9'); }

}  // namespace

bool valid_name(std::string_view value) {
  if (value.empty() || value.size() > 64 || !alnum(value.front())) return false;
  for (const char c : value) {
    if (!alnum(c) && c != '_' && c != '.' && c != '-') return false;
  }
  return true;
}

void check_name(const std::string& value, const std::string& what) {
  if (!valid_name(value)) {
    throw ConfigError("invalid " + what + " " + py_repr(value) +
                      ": use 1-64 characters from letters, digits, '_', '.', '-' (starting with a letter or digit)");
  }
}

void check_prefix(const std::string& prefix) {
  bool ok = !prefix.empty();
  std::size_t start = 0;
  while (ok) {
    const auto slash = prefix.find('/', start);
    const std::string level = prefix.substr(start, slash == std::string::npos ? std::string::npos : slash - start);
    ok = !level.empty() && level.find_first_of("+#") == std::string::npos;
    if (slash == std::string::npos) break;
    start = slash + 1;
  }
  if (!ok) throw ConfigError("invalid topic prefix " + py_repr(prefix) + ": no empty levels, '+' or '#'");
}

Topics::Topics(std::string fleet, std::string prefix) : fleet_(std::move(fleet)), prefix_(std::move(prefix)) {
  check_name(fleet_, "fleet name");
  check_prefix(prefix_);
}

std::optional<std::pair<std::string, std::string>> Topics::parse_client_topic(const std::string& topic) const {
  const std::string head = base() + "/clients/";
  if (topic.compare(0, head.size(), head) != 0) return std::nullopt;
  const std::string rest = topic.substr(head.size());
  const auto slash = rest.find('/');
  if (slash == std::string::npos || rest.find('/', slash + 1) != std::string::npos) return std::nullopt;
  std::string client = rest.substr(0, slash);
  if (!valid_name(client)) return std::nullopt;
  return std::make_pair(std::move(client), rest.substr(slash + 1));
}

}  // namespace edgemole
