#include "log.h"

#include <chrono>
#include <cstdio>
#include <ctime>

namespace edgemole {

namespace {

LogLevel threshold = LogLevel::kInfo;

void write(LogLevel level, const char* name, const std::string& text) {
  if (level < threshold) return;
  const std::time_t now = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  localtime_r(&now, &tm);
  char stamp[32];
  std::strftime(stamp, sizeof stamp, "%Y-%m-%d %H:%M:%S", &tm);
  std::fprintf(stderr, "%s %s edgemole.device: %s\n", stamp, name, text.c_str());
  std::fflush(stderr);
}

}  // namespace

void set_log_level(LogLevel level) { threshold = level; }
void log_debug(const std::string& text) { write(LogLevel::kDebug, "DEBUG", text); }
void log_info(const std::string& text) { write(LogLevel::kInfo, "INFO", text); }
void log_warning(const std::string& text) { write(LogLevel::kWarning, "WARNING", text); }

}  // namespace edgemole
