#include "util/ipv4.h"

#include <arpa/inet.h>

#include <charconv>

#include "util/text.h"

namespace regdisk {

std::string Ipv4String(uint32_t address) {
  return std::to_string(address >> 24) + "." + std::to_string((address >> 16) & 255) + "." +
         std::to_string((address >> 8) & 255) + "." + std::to_string(address & 255);
}

std::string Ipv4Network::String() const { return Ipv4String(network) + "/" + std::to_string(prefix); }

Result<Ipv4Network> ParseIpv4Cidr(std::string_view text) {
  const std::string shown = Printable(text, 64);
  size_t slash = text.find('/');
  if (slash == std::string_view::npos) {
    return InvalidArgument(shown + " is not an IPv4 network; write it as address/prefix, e.g. 10.0.2.0/24");
  }
  std::string addr(text.substr(0, slash));
  in_addr a{};
  if (::inet_pton(AF_INET, addr.c_str(), &a) != 1) {
    return InvalidArgument(shown + " is not an IPv4 network; write it as address/prefix, e.g. 10.0.2.0/24");
  }
  std::string_view len = text.substr(slash + 1);
  int prefix = -1;
  auto [end, ec] = std::from_chars(len.data(), len.data() + len.size(), prefix);
  if (ec != std::errc() || end != len.data() + len.size() || len.empty() || prefix < 1 || prefix > 32) {
    return InvalidArgument(shown + " has no valid prefix length; write e.g. 10.0.2.0/24");
  }
  if (prefix > 28) {
    return InvalidArgument(shown + " is too small for a VM network (gateway, DNS and DHCP need a /28 or larger)");
  }
  uint32_t ip = ntohl(a.s_addr);
  uint32_t mask = prefix == 0 ? 0 : ~uint32_t{0} << (32 - prefix);
  return Ipv4Network{ip & mask, prefix};
}

}  // namespace regdisk
