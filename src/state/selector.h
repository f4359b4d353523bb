// Kubernetes label and field selectors, parsed as the API server parses
// the labelSelector and fieldSelector query parameters.
//
//   ASSIGN_OR_RETURN(LabelSelector sel, LabelSelector::Parse("app=web,tier!=db,env,!canary"));
//   if (sel.Matches(labels)) ...
//
// Label selector grammar (k8s.io/apimachinery/pkg/labels): requirements
// separated by commas, each one of
//   key=value  key==value  key!=value   (!= also matches a missing key)
//   key in (v1,v2)  key notin (v1,v2)   (notin also matches a missing key)
//   key   (exists)      !key   (does not exist)
// Keys are [prefix/]name: name at most 63 characters of [A-Za-z0-9-_.]
// beginning and ending with an alphanumeric; prefix a DNS subdomain of at
// most 253. Values follow the name rule and may be empty. Whitespace around
// tokens is ignored; the empty selector matches everything. Errors are
// InvalidArgument naming the selector and the offending part.
//
// Field selectors: metadata.name and metadata.namespace with =, == or !=;
// any other field is refused (InvalidArgument), as the API server does for
// fields a resource does not index.
//
// Immutable after parsing, so safe to share between threads.
#pragma once

#include <map>
#include <string>
#include <string_view>
#include <vector>

#include "util/status.h"

namespace regdisk::state {

using Labels = std::map<std::string, std::string, std::less<>>;

class LabelSelector {
 public:
  enum class Op { kEquals, kNotEquals, kIn, kNotIn, kExists, kDoesNotExist };
  struct Requirement {
    std::string key;
    Op op;
    std::vector<std::string> values;  // one for (Not)Equals, any for (Not)In
  };

  static Result<LabelSelector> Parse(std::string_view text);

  bool Matches(const Labels& labels) const;
  bool empty() const { return reqs_.empty(); }
  const std::vector<Requirement>& requirements() const { return reqs_; }

 private:
  std::vector<Requirement> reqs_;
};

class FieldSelector {
 public:
  static Result<FieldSelector> Parse(std::string_view text);

  bool Matches(std::string_view ns, std::string_view name) const;
  bool empty() const { return reqs_.empty(); }

 private:
  struct Requirement {
    bool name;    // metadata.name, else metadata.namespace
    bool equals;  // =/==, else !=
    std::string value;
  };
  std::vector<Requirement> reqs_;
};

// A DNS-1123 subdomain: 1 to 253 lower-case letters, digits, '-' and '.',
// beginning and ending with a letter or digit (the rule for most object
// names and for label key prefixes).
bool IsDnsSubdomain(std::string_view s);

// Check a label key or value against the rules above (InvalidArgument
// naming the key or value).
Status ValidateLabelKey(std::string_view key);
Status ValidateLabelValue(std::string_view value);

}  // namespace regdisk::state
