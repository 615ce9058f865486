// One line per event on stderr, with time and level, like the Python roles' logging format.
#pragma once

#include <string>

namespace edgemole {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarning = 2 };

void set_log_level(LogLevel level);
void log_debug(const std::string& text);
void log_info(const std::string& text);
void log_warning(const std::string& text);

}  // namespace edgemole
