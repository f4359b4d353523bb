#include "util/log.h"

#include <atomic>
#include <cstdio>
#include <mutex>

namespace regdisk::log {

namespace {
std::atomic<Level> g_level{Level::kWarn};
std::mutex g_mu;
}  // namespace

void SetLevel(Level level) { g_level = level; }
bool Enabled(Level level) { return level >= g_level.load(); }

void Write(Level level, std::string_view message) {
  static constexpr const char* kNames[] = {"debug", "info", "warning", "error"};
  std::lock_guard<std::mutex> lock(g_mu);
  std::fprintf(stderr, "regdisk: %s: %.*s\n", kNames[static_cast<int>(level)],
               static_cast<int>(message.size()), message.data());
}

}  // namespace regdisk::log
