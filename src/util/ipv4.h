// IPv4 networks in CIDR notation ("10.0.2.0/24"), for the VM networks
// regdisk hands to QEMU's user-mode network.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "util/status.h"

namespace regdisk {

struct Ipv4Network {
  uint32_t network = 0;  // host byte order, host bits cleared
  int prefix = 0;        // 1-28
  // The address `n` hosts into the network (1 is the first host).
  uint32_t Host(uint32_t n) const { return network + n; }
  std::string String() const;  // "10.0.2.0/24"
};

std::string Ipv4String(uint32_t address);  // dotted quad

// Parses "A.B.C.D/N". Host bits are cleared (10.0.2.7/24 is 10.0.2.0/24).
// The prefix is at most 28: the network needs room for the gateway, DNS
// and a DHCP range.
Result<Ipv4Network> ParseIpv4Cidr(std::string_view text);

}  // namespace regdisk
