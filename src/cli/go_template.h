// The part of Go's text/template that podman and skopeo users write in
// --format, evaluated against a JSON value (the same object -o json or
// inspect prints):
//
//   {{.Field}}  {{.Labels.key}}  {{index .Labels "key"}}  {{json .}}  {{json .Field}}
//
// and literal text, in which \n and \t stand for a newline and a tab.
// Values print as Go prints them: strings bare, arrays "[a b]", objects
// "map[k:v]" (keys sorted), a missing map key "<no value>", null "<nil>".
//
//   ASSIGN_OR_RETURN(GoTemplate t, GoTemplate::Parse("{{.Digest}}\\n"));
//   ASSIGN_OR_RETURN(std::string line, t.Execute(image_json));
//
// Parse refuses anything else (other functions, pipelines, control
// structures) with InvalidArgument naming what it could not read; Execute
// refuses a field the top-level object does not have, as Go does for a
// struct.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "util/status.h"

namespace regdisk::cli {

class GoTemplate {
 public:
  static Result<GoTemplate> Parse(std::string_view text);
  Result<std::string> Execute(const nlohmann::ordered_json& value) const;

 private:
  struct Part {
    enum class Kind { kText, kField, kJson, kIndex } kind = Kind::kText;
    std::string text;                 // kText
    std::vector<std::string> path;    // kField, kJson, kIndex: .A.B -> {A, B}
    std::string key;                  // kIndex
  };
  std::vector<Part> parts_;
};

}  // namespace regdisk::cli
