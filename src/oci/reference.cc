#include "oci/reference.h"

#include <arpa/inet.h>

#include <cctype>

namespace regdisk::oci {

namespace {

constexpr size_t kMaxNameLength = 255;

bool IsLowerAlnum(char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); }

// One path component: lowercase alphanumerics separated by ".", "_", "__"
// or runs of "-".
bool IsValidComponent(std::string_view c) {
  if (c.empty() || !IsLowerAlnum(c.front()) || !IsLowerAlnum(c.back())) return false;
  for (size_t i = 0; i < c.size();) {
    if (IsLowerAlnum(c[i])) {
      ++i;
      continue;
    }
    // A separator run.
    size_t j = i;
    while (j < c.size() && !IsLowerAlnum(c[j])) ++j;
    std::string_view sep = c.substr(i, j - i);
    bool dashes = sep.find_first_not_of('-') == std::string_view::npos;
    if (!(sep == "." || sep == "_" || sep == "__" || dashes)) return false;
    i = j;
  }
  return true;
}

bool IsValidHostLabelChar(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '.'; }

// host[:port] where host is a DNS name, IPv4, or [IPv6].
bool IsValidDomain(std::string_view d) {
  std::string_view host = d;
  std::string_view port;
  if (!d.empty() && d.front() == '[') {
    size_t close = d.find(']');
    if (close == std::string_view::npos) return false;
    std::string inner(d.substr(1, close - 1));
    in6_addr a6;
    if (inet_pton(AF_INET6, inner.c_str(), &a6) != 1) return false;
    host = d.substr(0, close + 1);
    std::string_view rest = d.substr(close + 1);
    if (!rest.empty()) {
      if (rest.front() != ':') return false;
      port = rest.substr(1);
      if (port.empty()) return false;
    }
  } else {
    size_t colon = d.rfind(':');
    if (colon != std::string_view::npos) {
      host = d.substr(0, colon);
      port = d.substr(colon + 1);
      if (port.empty()) return false;
    }
    if (host.empty() || host.front() == '-' || host.front() == '.' || host.back() == '.') return false;
    for (char c : host) {
      if (!IsValidHostLabelChar(c)) return false;
    }
  }
  for (char c : port) {
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  }
  if (!port.empty() && (port.size() > 5 || std::stoi(std::string(port)) > 65535)) return false;
  return true;
}

}  // namespace

bool IsValidTag(std::string_view tag) {
  if (tag.empty() || tag.size() > 128) return false;
  auto word = [](char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; };
  if (!word(tag.front())) return false;
  for (char c : tag) {
    if (!word(c) && c != '.' && c != '-') return false;
  }
  return true;
}

Result<Reference> Reference::Parse(std::string_view text) {
  const std::string quoted = "image reference \"" + std::string(text) + "\"";
  if (text.empty()) return InvalidArgument("the image reference is empty; give one such as registry.example.org/vmdisks/fedora:latest");
  if (text.find("://") != std::string_view::npos) {
    return InvalidArgument(quoted + " has an unknown transport; use docker://HOST/REPO[:TAG] or oci:DIR[:TAG]");
  }
  for (char c : text) {
    if (std::isspace(static_cast<unsigned char>(c)) || std::iscntrl(static_cast<unsigned char>(c))) {
      return InvalidArgument(quoted + " contains white space or control characters; remove them");
    }
  }

  Reference ref;
  std::string_view rest = text;

  // Digest: everything after '@'.
  if (size_t at = rest.find('@'); at != std::string_view::npos) {
    auto d = Digest::Parse(rest.substr(at + 1));
    if (!d.ok()) return std::move(d).status().Annotate(quoted);
    ref.digest = *d;
    rest = rest.substr(0, at);
  }

  // Tag: after the last ':' that follows the last '/'.
  size_t slash = rest.rfind('/');
  size_t colon = rest.rfind(':');
  if (colon != std::string_view::npos && (slash == std::string_view::npos || colon > slash)) {
    std::string_view tag = rest.substr(colon + 1);
    if (!IsValidTag(tag)) {
      return InvalidArgument(quoted + " has an invalid tag \"" + std::string(tag) +
                             "\"; tags are up to 128 letters, digits, '_', '.' and '-', not starting with '.' or '-'");
    }
    ref.tag = std::string(tag);
    rest = rest.substr(0, colon);
  }

  // Domain: the first component when it looks like a host.
  std::string_view name = rest;
  size_t first_slash = name.find('/');
  if (first_slash != std::string_view::npos) {
    std::string_view first = name.substr(0, first_slash);
    bool has_upper = false;
    for (char c : first) has_upper |= std::isupper(static_cast<unsigned char>(c)) != 0;
    if (first.find_first_of(".:[") != std::string_view::npos || first == "localhost" || has_upper) {
      if (!IsValidDomain(first)) {
        return InvalidArgument(quoted + " has an invalid registry host \"" + std::string(first) + "\"");
      }
      ref.registry = std::string(first);
      name = name.substr(first_slash + 1);
    }
  }
  if (ref.registry.empty()) ref.registry = "docker.io";
  if (ref.registry == "index.docker.io" || ref.registry == "registry-1.docker.io") ref.registry = "docker.io";

  if (name.empty()) return InvalidArgument(quoted + " has no repository name");
  if (name.size() > kMaxNameLength) {
    return InvalidArgument(quoted + " has a repository name longer than 255 characters");
  }
  size_t start = 0;
  while (start <= name.size()) {
    size_t end = name.find('/', start);
    std::string_view comp = name.substr(start, end == std::string_view::npos ? std::string_view::npos : end - start);
    if (!IsValidComponent(comp)) {
      bool upper = false;
      for (char c : comp) upper |= std::isupper(static_cast<unsigned char>(c)) != 0;
      return InvalidArgument(quoted + " has an invalid repository component \"" + std::string(comp) + "\"" +
                             (upper ? "; repository names must be lowercase"
                                    : "; use lowercase letters and digits separated by '.', '_', '__' or '-'"));
    }
    if (end == std::string_view::npos) break;
    start = end + 1;
  }
  ref.repository = std::string(name);
  if (ref.registry == "docker.io" && ref.repository.find('/') == std::string::npos) {
    ref.repository = "library/" + ref.repository;
    // Checked again once normalised, so that String() always parses again.
    if (ref.repository.size() > kMaxNameLength) {
      return InvalidArgument(quoted + " has a repository name longer than 255 characters with Docker Hub's library/");
    }
  }
  if (ref.tag.empty() && !ref.digest) ref.tag = "latest";
  return ref;
}

std::string Reference::ApiHost() const {
  if (registry == "docker.io") return "registry-1.docker.io";
  return registry;
}

std::string Reference::Hostname() const {
  std::string_view r = registry;
  if (!r.empty() && r.front() == '[') return std::string(r.substr(1, r.find(']') - 1));
  size_t colon = r.rfind(':');
  return std::string(colon == std::string_view::npos ? r : r.substr(0, colon));
}

bool Reference::IsLoopback() const {
  std::string h = Hostname();
  if (h == "localhost" || h == "::1") return true;
  in_addr a4;
  if (inet_pton(AF_INET, h.c_str(), &a4) == 1) return (ntohl(a4.s_addr) >> 24) == 127;
  return false;
}

std::string Reference::String() const {
  std::string s = registry + "/" + repository;
  if (!tag.empty()) s += ":" + tag;
  if (digest) s += "@" + digest->str();
  return s;
}

}  // namespace regdisk::oci
