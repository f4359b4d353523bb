// Minimal leveled logging to stderr: "regdisk: LEVEL: message".
//
//   log::SetLevel(log::Level::kInfo);   // --log-level info (-v: debug)
//   log::Info("copied {} blobs", n);
//
// The default level is warn. Quiet mode (-q) is separate from the level:
// it silences progress and informational lines, which their writers check
// with log::Quiet(). Never log a credential, a token or an Authorization
// header. Thread-safe.
#pragma once

#include <fmt/core.h>

#include <optional>
#include <string_view>

namespace regdisk::log {

enum class Level { kDebug, kInfo, kWarn, kError };

void SetLevel(Level level);
bool Enabled(Level level);
void Write(Level level, std::string_view message);
// "error", "warn", "info" or "debug"; nullopt for anything else.
std::optional<Level> ParseLevel(std::string_view name);

// -q: no progress display and no informational lines.
void SetQuiet(bool quiet);
bool Quiet();

template <typename... Args>
void Debug(fmt::format_string<Args...> f, Args&&... args) {
  if (Enabled(Level::kDebug)) Write(Level::kDebug, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void Info(fmt::format_string<Args...> f, Args&&... args) {
  if (Enabled(Level::kInfo)) Write(Level::kInfo, fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void Warn(fmt::format_string<Args...> f, Args&&... args) {
  if (Enabled(Level::kWarn)) Write(Level::kWarn, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace regdisk::log
