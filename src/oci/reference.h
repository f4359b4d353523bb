// Image references in Docker's grammar, normalised the way Docker does:
//
//   fedora                      -> docker.io/library/fedora:latest
//   127.0.0.1:5000/vm/disk      -> 127.0.0.1:5000/vm/disk:latest
//   localhost/disk@sha256:...   -> digest only, no default tag
//   host/a/b:v1@sha256:...      -> tag and digest; the digest wins when pulling
//
// Docker Hub's API lives at registry-1.docker.io; ApiHost() says where to talk.
#pragma once

#include <optional>
#include <string>
#include <string_view>

#include "oci/digest.h"
#include "util/status.h"

namespace regdisk::oci {

struct Reference {
  std::string registry;    // "docker.io", "127.0.0.1:5000", "[::1]:5000", "localhost"
  std::string repository;  // "library/fedora", "vmdisks/fedora25"
  std::string tag;         // empty when only a digest was given
  std::optional<Digest> digest;

  // Parses and normalises; the error says what is wrong with which part.
  static Result<Reference> Parse(std::string_view text);

  // The host:port that serves the Distribution API.
  std::string ApiHost() const;
  // Host without port, brackets removed for IPv6.
  std::string Hostname() const;
  // True for 127.0.0.0/8, ::1 and localhost: plain HTTP may be tried.
  bool IsLoopback() const;

  // "registry/repository:tag@digest" (tag and digest only when set).
  std::string String() const;
  // What to ask the registry for: the digest when known, else the tag.
  std::string ManifestRef() const { return digest ? digest->str() : tag; }
};

// Validates a tag: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}.
bool IsValidTag(std::string_view tag);

}  // namespace regdisk::oci
