// The store's view of lazily-pulled disks that are still filling
// (blockserve::LazyPull): one directory per chunked layer being served,
//
//   ROOT/lazy/<name>/         <name>: the layer digest's first 24 hex digits
//     disk.raw, chunks.map    the disk so far and its bitmap (chunk_bitmap.h)
//     lazy.json               what it is (LazyRecord), written when the
//                             directory is made
//     nbd.sock, control.sock  while an export serves it
//   ROOT/locks/lazy-<name>    held (exclusive) by the one process serving it,
//                             from the first read until its VMs are gone
//   ROOT/locks/lazy-<name>.readers
//                             held (shared) by each process whose VMs read
//                             from an export another process serves; the
//                             owner takes it (exclusive) before it stops
//
// `images` lists these with their fill; prune and rmi never remove one whose
// lock is held, nor a committed disk that such a process still serves.
//
//   RETURN_IF_ERROR(WriteLazyRecord(dir, {.image = src.Name(), .layer = layer.digest, ...}));
//   ASSIGN_OR_RETURN(std::vector<FillingDisk> filling, ListFilling(root));
#pragma once

#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "oci/digest.h"
#include "util/status.h"

namespace regdisk::store {

struct LazyRecord {
  std::string image;       // what it is pulled as ("docker://h/r:t"); data from the user, print with Printable
  oci::Digest layer;       // the chunked layer
  oci::Digest index;       // its chunk index
  std::string image_path;  // "/disk/NAME" inside the image
  uint64_t disk_size = 0;
  uint64_t chunks = 0;
  std::string created;     // RFC 3339, UTC: when the directory was made
};

// The directory name of a layer's filling disk: its digest's first 24 hex
// digits (short, for the unix sockets inside).
std::string LazyName(const oci::Digest& layer);
std::filesystem::path LazyDirPath(const std::filesystem::path& root, const std::string& name);
std::filesystem::path LazyLockPath(const std::filesystem::path& root, const std::string& name);
std::filesystem::path LazyReadersLockPath(const std::filesystem::path& root, const std::string& name);

// Writes DIR/lazy.json (atomically; an existing one is replaced). `created`
// is set to now when empty.
Status WriteLazyRecord(const std::filesystem::path& dir, LazyRecord record);
// NotFound when DIR has none, InvalidArgument when it is not one.
Result<LazyRecord> ReadLazyRecord(const std::filesystem::path& dir);

// True when a process holds locks/lazy-<name> (serves it now) or
// locks/lazy-<name>.readers (its VMs read an export of it). Creates
// nothing: a lock file that does not exist is held by no one.
Result<bool> LazyInUse(const std::filesystem::path& root, const std::string& name);

struct FillingDisk {
  std::string name;                   // the directory's name under lazy/
  std::filesystem::path dir;
  std::optional<LazyRecord> record;   // nullopt: lazy.json missing or unreadable
  uint64_t present = 0, chunks = 0;   // from chunks.map (0, 0 when it has none)
  bool in_use = false;                // its lock is held
  uint64_t bytes = 0;                 // space the directory takes
  // Percent of chunks present, rounded down (100 only when complete).
  int Percent() const;
};

// Every directory under ROOT/lazy/, by name. Reads only.
Result<std::vector<FillingDisk>> ListFilling(const std::filesystem::path& root);

}  // namespace regdisk::store
