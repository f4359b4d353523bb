// Where the replica set controller gets the random part of the names it
// gives new VMIs: "<replica set>-<5 characters>".
//
// The daemon uses RandomNameSource seeded once from the system's entropy;
// tests use a source that returns a fixed sequence. The reconciler itself
// never draws randomness, so given the same source it always returns the
// same actions.
//
//   RandomNameSource names(seed_from_random_device);
//   auto actions = ReconcileReplicaSet(rs, vmis, names);
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <string_view>

namespace regdisk::controller {

// The alphabet of Kubernetes' rand.String (k8s.io/apimachinery/pkg/util/rand),
// which metadata.generateName uses: lower-case consonants and digits, with no
// vowels (so no words) and none of 0, 1, 3 (confusable with o, l, e).
inline constexpr std::string_view kNameSuffixAlphabet = "bcdfghjklmnpqrstvwxz2456789";
inline constexpr size_t kNameSuffixLength = 5;

class NameSource {
 public:
  virtual ~NameSource() = default;
  // A suffix for a new name. The reconciler checks it against the names
  // already taken and asks again on a collision, a bounded number of times.
  virtual std::string NextSuffix() = 0;
};

// kNameSuffixLength characters of kNameSuffixAlphabet, from a Mersenne
// Twister seeded by the caller. Not for concurrent use.
class RandomNameSource final : public NameSource {
 public:
  explicit RandomNameSource(uint64_t seed) : engine_(seed) {}
  std::string NextSuffix() override;

 private:
  std::mt19937_64 engine_;
};

// The name a replica set's new VMI gets: `base` (shortened so that the whole
// name stays within the 63 characters of a DNS label, as generateName
// shortens it) + "-" + suffix.
std::string GeneratedName(std::string_view base, std::string_view suffix);

}  // namespace regdisk::controller
