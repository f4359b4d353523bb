#include "util/byte_source.h"

#include <algorithm>
#include <cstring>

namespace regdisk {

BlockPipe::BlockPipe(size_t block_size, size_t depth) : block_size_(block_size), depth_(std::max<size_t>(depth, 1)) {}

Status BlockPipe::Write(std::string_view data) {
  while (!data.empty()) {
    if (filling_.data.empty()) {
      std::unique_lock lock(mu_);
      if (cancelled_) return Cancelled("the reader stopped");
      if (!free_.empty()) {
        filling_ = std::move(free_.back());
        free_.pop_back();
      }
      lock.unlock();
      if (filling_.data.empty()) filling_.data.resize(block_size_);
      filling_.used = 0;
    }
    size_t n = std::min(data.size(), filling_.data.size() - filling_.used);
    std::memcpy(filling_.data.data() + filling_.used, data.data(), n);
    filling_.used += n;
    data.remove_prefix(n);
    if (filling_.used == filling_.data.size()) RETURN_IF_ERROR(Push(std::move(filling_)));
  }
  return OkStatus();
}

Status BlockPipe::Push(Block block) {
  filling_ = Block{};
  std::unique_lock lock(mu_);
  changed_.wait(lock, [&] { return cancelled_ || full_.size() < depth_; });
  if (cancelled_) return Cancelled("the reader stopped");
  full_.push_back(std::move(block));
  changed_.notify_all();
  return OkStatus();
}

void BlockPipe::Finish(Status status) {
  if (status.ok() && filling_.used > 0) status = Push(std::move(filling_));
  std::lock_guard lock(mu_);
  finished_ = true;
  final_ = std::move(status);
  changed_.notify_all();
}

Result<std::span<const uint8_t>> BlockPipe::Next() {
  std::unique_lock lock(mu_);
  if (!reading_.data.empty()) {
    free_.push_back(std::move(reading_));  // the previous chunk is done with
    reading_ = Block{};
  }
  changed_.wait(lock, [&] { return !full_.empty() || finished_; });
  if (full_.empty()) {
    if (!final_.ok()) return final_;
    return std::span<const uint8_t>();
  }
  reading_ = std::move(full_.front());
  full_.pop_front();
  changed_.notify_all();
  return std::span<const uint8_t>(reading_.data.data(), reading_.used);
}

void BlockPipe::Cancel() {
  std::lock_guard lock(mu_);
  cancelled_ = true;
  full_.clear();
  changed_.notify_all();
}

}  // namespace regdisk
