#include "cli/go_template.h"

#include <algorithm>
#include <cctype>

#include "util/text.h"

namespace regdisk::cli {

using ojson = nlohmann::ordered_json;

namespace {

std::string_view Trim(std::string_view s) {
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.front()))) s.remove_prefix(1);
  while (!s.empty() && std::isspace(static_cast<unsigned char>(s.back()))) s.remove_suffix(1);
  return s;
}

Status Bad(std::string_view action, const std::string& why) {
  return InvalidArgument("--format: cannot read {{" + Printable(action, 60) + "}}: " + why +
                         "; use {{.Field}}, {{index .Labels \"key\"}}, {{json .}} or {{json .Field}}");
}

// ".", ".A", ".A.B" -> {}, {A}, {A, B}.
Result<std::vector<std::string>> ParsePath(std::string_view s, std::string_view action) {
  if (s.empty() || s[0] != '.') return Bad(action, "\"" + std::string(s) + "\" is not a field such as .Name");
  std::vector<std::string> path;
  if (s == ".") return path;
  size_t i = 0;
  while (i < s.size()) {
    if (s[i] != '.') return Bad(action, "unexpected \"" + std::string(s.substr(i)) + "\"");
    size_t j = i + 1;
    while (j < s.size() && (std::isalnum(static_cast<unsigned char>(s[j])) || s[j] == '_')) ++j;
    if (j == i + 1) return Bad(action, "a field name is missing after \".\"");
    path.emplace_back(s.substr(i + 1, j - i - 1));
    i = j;
  }
  return path;
}

// Literal text with \n and \t as podman reads them.
std::string Unescape(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 1 < s.size() && (s[i + 1] == 'n' || s[i + 1] == 't')) {
      out += s[i + 1] == 'n' ? '\n' : '\t';
      ++i;
    } else {
      out += s[i];
    }
  }
  return out;
}

// Go's %v of a decoded JSON value.
std::string Show(const ojson& v) {
  switch (v.type()) {
    case ojson::value_t::string: return PrintableLine(v.get<std::string>(), 1 << 20);  // data: no terminal escapes
    case ojson::value_t::null: return "<nil>";
    case ojson::value_t::array: {
      std::string out = "[";
      for (size_t i = 0; i < v.size(); ++i) out += (i ? " " : "") + Show(v[i]);
      return out + "]";
    }
    case ojson::value_t::object: {
      std::vector<std::string> keys;
      for (const auto& [k, _] : v.items()) keys.push_back(k);
      std::sort(keys.begin(), keys.end());
      std::string out = "map[";
      for (size_t i = 0; i < keys.size(); ++i) out += (i ? " " : "") + keys[i] + ":" + Show(v[keys[i]]);
      return out + "]";
    }
    default: return v.dump();
  }
}

}  // namespace

Result<GoTemplate> GoTemplate::Parse(std::string_view text) {
  GoTemplate t;
  size_t pos = 0;
  while (pos < text.size()) {
    size_t open = text.find("{{", pos);
    if (open == std::string_view::npos) open = text.size();
    if (open > pos) t.parts_.push_back({Part::Kind::kText, Unescape(text.substr(pos, open - pos)), {}, ""});
    if (open == text.size()) break;
    size_t close = text.find("}}", open + 2);
    if (close == std::string_view::npos) {
      return InvalidArgument("--format: " + Printable(text.substr(open, 40), 40) + " has no closing }}");
    }
    std::string_view action = Trim(text.substr(open + 2, close - open - 2));
    pos = close + 2;
    Part p;
    if (action.rfind("json", 0) == 0 && action.size() > 4 && std::isspace(static_cast<unsigned char>(action[4]))) {
      p.kind = Part::Kind::kJson;
      ASSIGN_OR_RETURN(p.path, ParsePath(Trim(action.substr(4)), action));
    } else if (action.rfind("index", 0) == 0 && action.size() > 5 && std::isspace(static_cast<unsigned char>(action[5]))) {
      p.kind = Part::Kind::kIndex;
      std::string_view rest = Trim(action.substr(5));
      size_t space = rest.find_first_of(" \t");
      if (space == std::string_view::npos) return Bad(action, "index takes a field and a quoted key");
      ASSIGN_OR_RETURN(p.path, ParsePath(rest.substr(0, space), action));
      std::string_view key = Trim(rest.substr(space));
      if (key.size() < 2 || key.front() != '"' || key.back() != '"' ||
          key.substr(1, key.size() - 2).find('"') != std::string_view::npos) {
        return Bad(action, "index takes a key in double quotes");
      }
      p.key = std::string(key.substr(1, key.size() - 2));
    } else if (!action.empty() && action[0] == '.') {
      p.kind = Part::Kind::kField;
      ASSIGN_OR_RETURN(p.path, ParsePath(action, action));
    } else {
      return Bad(action, action.empty() ? "it is empty" : "regdisk knows only fields, index and json");
    }
    t.parts_.push_back(std::move(p));
  }
  return t;
}

Result<std::string> GoTemplate::Execute(const ojson& value) const {
  std::string out;
  for (const Part& p : parts_) {
    if (p.kind == Part::Kind::kText) {
      out += p.text;
      continue;
    }
    const ojson* v = &value;
    bool missing = false;
    for (size_t i = 0; i < p.path.size() && !missing; ++i) {
      if (!v->is_object()) {
        return InvalidArgument("--format: ." + p.path[i] + " is not a field of a " + std::string(v->type_name()));
      }
      auto it = v->find(p.path[i]);
      if (it == v->end()) {
        // The top level is a struct in Go: an unknown field is an error.
        // Below it (Labels) a missing key is "<no value>".
        if (i == 0) {
          return InvalidArgument("--format: there is no field ." + p.path[i] + "; {{json .}} shows the fields");
        }
        missing = true;
        break;
      }
      v = &*it;
    }
    if (p.kind == Part::Kind::kIndex && !missing) {
      if (!v->is_object() && !v->is_null()) return InvalidArgument("--format: index needs a map, not a " + std::string(v->type_name()));
      auto it = v->is_object() ? v->find(p.key) : v->end();
      if (!v->is_object() || it == v->end()) {
        missing = true;
      } else {
        v = &*it;
      }
    }
    if (missing && p.kind == Part::Kind::kIndex) {
      // index of a map[string]string gives the zero value, as in Go.
    } else if (missing) {
      out += p.kind == Part::Kind::kJson ? "null" : "<no value>";
    } else {
      out += p.kind == Part::Kind::kJson ? v->dump() : Show(*v);
    }
  }
  return out;
}

}  // namespace regdisk::cli
