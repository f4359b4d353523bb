#include "state/selector.h"

#include <algorithm>
#include <cctype>

namespace regdisk::state {
namespace {

bool IsAlnum(char c) { return std::isalnum(static_cast<unsigned char>(c)) != 0; }
bool IsSpace(char c) { return c == ' ' || c == '\t'; }
// Characters that end a key or value token.
bool IsDelimiter(char c) { return IsSpace(c) || c == '=' || c == '!' || c == ',' || c == '(' || c == ')'; }

// A qualified name part: at most 63 of [A-Za-z0-9-_.], alphanumeric at
// both ends.
bool IsQualifiedName(std::string_view s) {
  if (s.empty() || s.size() > 63) return false;
  if (!IsAlnum(s.front()) || !IsAlnum(s.back())) return false;
  return std::all_of(s.begin(), s.end(), [](char c) { return IsAlnum(c) || c == '-' || c == '_' || c == '.'; });
}

class Parser {
 public:
  explicit Parser(std::string_view text) : text_(text) {}

  Result<std::vector<LabelSelector::Requirement>> Run() {
    std::vector<LabelSelector::Requirement> reqs;
    SkipSpace();
    if (AtEnd()) return reqs;
    for (;;) {
      ASSIGN_OR_RETURN(auto req, Requirement());
      reqs.push_back(std::move(req));
      SkipSpace();
      if (AtEnd()) return reqs;
      if (Peek() != ',') return Error("expected ',' or the end after a requirement");
      ++pos_;
    }
  }

 private:
  using Op = LabelSelector::Op;

  Result<LabelSelector::Requirement> Requirement() {
    SkipSpace();
    bool negated = false;
    if (!AtEnd() && Peek() == '!') {
      negated = true;
      ++pos_;
      SkipSpace();
    }
    std::string key = Token();
    if (key.empty()) return Error("expected a label key");
    RETURN_IF_ERROR(Check(ValidateLabelKey(key)));
    SkipSpace();
    if (negated) {
      if (!AtEnd() && Peek() != ',') return Error("'!" + key + "' takes no operator or value");
      return LabelSelector::Requirement{key, Op::kDoesNotExist, {}};
    }
    if (AtEnd() || Peek() == ',') return LabelSelector::Requirement{key, Op::kExists, {}};
    if (Peek() == '=' || Peek() == '!') {
      Op op = Op::kEquals;
      if (Peek() == '!') {
        op = Op::kNotEquals;
        ++pos_;
        if (AtEnd() || Peek() != '=') return Error("expected '=' after '!' following " + key);
      }
      ++pos_;
      if (op == Op::kEquals && !AtEnd() && Peek() == '=') ++pos_;
      SkipSpace();
      std::string value = Token();
      if (!AtEnd() && !IsSpace(Peek()) && Peek() != ',') return Error("unexpected '" + std::string(1, Peek()) + "' in the value of " + key);
      RETURN_IF_ERROR(Check(ValidateLabelValue(value)));
      return LabelSelector::Requirement{key, op, {value}};
    }
    std::string word = Token();
    Op op;
    if (word == "in") {
      op = Op::kIn;
    } else if (word == "notin") {
      op = Op::kNotIn;
    } else {
      return Error("expected =, ==, !=, in or notin after " + key);
    }
    SkipSpace();
    if (AtEnd() || Peek() != '(') return Error("expected '(' after " + word);
    ++pos_;
    std::vector<std::string> values;
    for (;;) {
      SkipSpace();
      std::string value = Token();
      RETURN_IF_ERROR(Check(ValidateLabelValue(value)));
      values.push_back(std::move(value));
      SkipSpace();
      if (AtEnd()) return Error("missing ')' after the values of " + key);
      if (Peek() == ')') break;
      if (Peek() != ',') return Error("expected ',' or ')' in the values of " + key);
      ++pos_;
    }
    ++pos_;
    if (values.size() == 1 && values[0].empty()) return Error("'" + word + "' needs at least one value");
    return LabelSelector::Requirement{key, op, std::move(values)};
  }

  std::string Token() {
    size_t start = pos_;
    while (!AtEnd() && !IsDelimiter(Peek())) ++pos_;
    return std::string(text_.substr(start, pos_ - start));
  }
  void SkipSpace() {
    while (!AtEnd() && IsSpace(Peek())) ++pos_;
  }
  bool AtEnd() const { return pos_ >= text_.size(); }
  char Peek() const { return text_[pos_]; }

  Status Error(std::string what) const {
    return InvalidArgument("label selector \"" + std::string(text_) + "\": " + what + " (at character " +
                           std::to_string(pos_ + 1) + ")");
  }
  Status Check(Status st) const {
    if (st.ok()) return st;
    return InvalidArgument("label selector \"" + std::string(text_) + "\": " + st.message());
  }

  std::string_view text_;
  size_t pos_ = 0;
};

}  // namespace

bool IsDnsSubdomain(std::string_view s) {
  if (s.empty() || s.size() > 253) return false;
  auto lower_alnum = [](char c) { return (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'); };
  if (!lower_alnum(s.front()) || !lower_alnum(s.back())) return false;
  return std::all_of(s.begin(), s.end(), [&](char c) { return lower_alnum(c) || c == '-' || c == '.'; });
}

Status ValidateLabelKey(std::string_view key) {
  std::string_view name = key;
  if (auto slash = key.find('/'); slash != std::string_view::npos) {
    std::string_view prefix = key.substr(0, slash);
    name = key.substr(slash + 1);
    if (!IsDnsSubdomain(prefix)) {
      return InvalidArgument("label key \"" + std::string(key) +
                             "\": the prefix must be a DNS subdomain (lower-case letters, digits, '-' and '.', "
                             "at most 253 characters)");
    }
  }
  if (!IsQualifiedName(name)) {
    return InvalidArgument("label key \"" + std::string(key) +
                           "\": the name must be 1 to 63 characters of letters, digits, '-', '_' and '.', "
                           "beginning and ending with a letter or digit");
  }
  return OkStatus();
}

Status ValidateLabelValue(std::string_view value) {
  if (value.empty() || IsQualifiedName(value)) return OkStatus();
  return InvalidArgument("label value \"" + std::string(value) +
                         "\": must be empty or at most 63 characters of letters, digits, '-', '_' and '.', "
                         "beginning and ending with a letter or digit");
}

Result<LabelSelector> LabelSelector::Parse(std::string_view text) {
  LabelSelector sel;
  ASSIGN_OR_RETURN(sel.reqs_, Parser(text).Run());
  return sel;
}

bool LabelSelector::Matches(const Labels& labels) const {
  for (const Requirement& r : reqs_) {
    auto it = labels.find(r.key);
    bool has = it != labels.end();
    bool in = has && std::find(r.values.begin(), r.values.end(), it->second) != r.values.end();
    bool ok = false;
    switch (r.op) {
      case Op::kEquals:
      case Op::kIn: ok = in; break;
      case Op::kNotEquals:
      case Op::kNotIn: ok = !in; break;
      case Op::kExists: ok = has; break;
      case Op::kDoesNotExist: ok = !has; break;
    }
    if (!ok) return false;
  }
  return true;
}

Result<FieldSelector> FieldSelector::Parse(std::string_view text) {
  FieldSelector sel;
  auto trim = [](std::string_view s) {
    while (!s.empty() && IsSpace(s.front())) s.remove_prefix(1);
    while (!s.empty() && IsSpace(s.back())) s.remove_suffix(1);
    return s;
  };
  text = trim(text);
  if (text.empty()) return sel;
  auto error = [&](std::string what) {
    return InvalidArgument("field selector \"" + std::string(text) + "\": " + what);
  };
  size_t start = 0;
  for (;;) {
    size_t comma = text.find(',', start);
    std::string_view part = trim(text.substr(start, comma == std::string_view::npos ? std::string_view::npos
                                                                                     : comma - start));
    size_t op_at = part.find_first_of("!=");
    if (op_at == std::string_view::npos) return error("\"" + std::string(part) + "\" has no =, == or !=");
    std::string_view field = trim(part.substr(0, op_at));
    std::string_view rest = part.substr(op_at);
    bool equals = true;
    if (rest.starts_with("!=")) {
      equals = false;
      rest.remove_prefix(2);
    } else if (rest.starts_with("==")) {
      rest.remove_prefix(2);
    } else if (rest.starts_with("=")) {
      rest.remove_prefix(1);
    } else {
      return error("\"" + std::string(part) + "\" has no =, == or !=");
    }
    Requirement req;
    if (field == "metadata.name") {
      req.name = true;
    } else if (field == "metadata.namespace") {
      req.name = false;
    } else {
      return error("field \"" + std::string(field) +
                   "\" is not supported; only metadata.name and metadata.namespace can be selected");
    }
    req.equals = equals;
    req.value = std::string(trim(rest));
    sel.reqs_.push_back(std::move(req));
    if (comma == std::string_view::npos) return sel;
    start = comma + 1;
  }
}

bool FieldSelector::Matches(std::string_view ns, std::string_view name) const {
  for (const Requirement& r : reqs_) {
    bool same = (r.name ? name : ns) == r.value;
    if (same != r.equals) return false;
  }
  return true;
}

}  // namespace regdisk::state
