// Progress of blob transfers (pull, copy), as typed events for whoever
// shows them (the CLI draws podman-style bars or prints one line per blob).
//
//   options.on_progress = [](const ProgressEvent& e) { ... };
//
// A build reports the disk it reads into a new layer the same way, with
// `label` instead of a digest (the digest is known only at the end).
//
// For each blob: kStart (done = bytes already held, e.g. a resumed
// partial download), kBytes as bytes arrive (at most every few MiB),
// then kDone (done == total) or kFailed; or kSkipped alone when the
// destination already has it. A pull reports its layers' kDone only once
// the disk is verified and committed (so a refused image shows no "done"). Events of one blob come from one thread, in order;
// blobs are transferred one after another.
#pragma once

#include <cstdint>
#include <functional>
#include <string>

#include "oci/digest.h"

namespace regdisk::image {

struct ProgressEvent {
  enum class Kind { kStart, kBytes, kDone, kFailed, kSkipped };
  Kind kind = Kind::kBytes;
  oci::Digest blob;   // empty while a blob is being made (build): see label
  uint64_t done = 0;
  uint64_t total = 0;
  std::string label;  // with an empty blob: what is being written (the disk's file)
};

using ProgressFn = std::function<void(const ProgressEvent&)>;

}  // namespace regdisk::image
