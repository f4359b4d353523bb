#include "cli/usage.h"

#include <cstdio>

#include "cli/flags.h"
#include "util/text.h"

namespace regdisk::cli {

namespace {

constexpr const char* kChoicesValidator = "one-of";

// "regdisk" or "regdisk pull": the deepest command the parser entered.
const CLI::App* DeepestCommand(const CLI::App& app) {
  const CLI::App* cmd = &app;
  for (;;) {
    auto parsed = cmd->get_subcommands();
    if (parsed.empty()) return cmd;
    cmd = parsed.front();
  }
}

std::string CommandPath(const CLI::App* cmd) {
  std::string path;
  for (const CLI::App* c = cmd; c != nullptr; c = c->get_parent()) {
    path = c->get_name() + (path.empty() ? "" : " " + path);
  }
  return path;
}

// Every long and short flag spelling `cmd` and its parents accept.
std::vector<std::string> FlagNames(const CLI::App* cmd) {
  std::vector<std::string> names;
  for (const CLI::App* c = cmd; c != nullptr; c = c->get_parent()) {
    for (const CLI::Option* o : c->get_options()) {
      for (const auto& l : o->get_lnames()) names.push_back("--" + l);
      for (const auto& s : o->get_snames()) names.push_back("-" + s);
    }
  }
  return names;
}

int Usage(const std::string& message) {
  std::fprintf(stderr, "regdisk: error: %s\n", PrintableLine(message).c_str());
  return 2;
}

// CLI11's message, made to read as a sentence about `path`.
std::string Rephrase(const CLI::ParseError& e, const std::string& path) {
  std::string what = e.what();
  if (what == "A subcommand is required" || what.rfind("A subcommand", 0) == 0) {
    return path + " needs a command; " + path + " --help lists them";
  }
  // "--timeout: 1 required TEXT missing"
  if (dynamic_cast<const CLI::ArgumentMismatch*>(&e) != nullptr && what.find(" missing") != std::string::npos) {
    if (size_t colon = what.find(':'); colon != std::string::npos) {
      return path + ": " + what.substr(0, colon) + " needs a value; " + path + " --help shows its flags";
    }
  }
  // OneOf's "--flag: takes a or b, not ..." reads better without the colon.
  if (size_t at = what.find(": takes "); at != std::string::npos) what.erase(at, 1);
  return path + ": " + what + "; " + path + " --help shows its arguments and flags";
}

}  // namespace

std::vector<const CLI::App*> VisibleCommands(const CLI::App& app) {
  return app.get_subcommands([](const CLI::App* c) { return !c->get_group().empty(); });
}

CLI::Validator OneOf(std::vector<std::string> choices) {
  std::string desc = "{";
  std::string list;
  for (size_t i = 0; i < choices.size(); ++i) {
    desc += (i ? "," : "") + choices[i];
    list += (i == 0 ? "" : i + 1 == choices.size() ? " or " : ", ") + choices[i];
  }
  desc += "}";
  CLI::Validator v(
      [choices, list](std::string& value) -> std::string {
        for (const auto& c : choices) {
          if (value == c) return {};
        }
        return "takes " + list + ", not " + Printable(value, 40);
      },
      desc, kChoicesValidator);
  return v;
}

std::vector<std::string> ChoicesOf(const CLI::Option& opt) {
  std::vector<std::string> out;
  const CLI::Validator* v = nullptr;
  try {
    v = const_cast<CLI::Option&>(opt).get_validator(kChoicesValidator);
  } catch (const CLI::OptionNotFound&) {
    return out;
  }
  std::string desc = v->get_description();
  if (desc.size() < 2 || desc.front() != '{' || desc.back() != '}') return out;
  desc = desc.substr(1, desc.size() - 2);
  size_t start = 0;
  for (;;) {
    size_t comma = desc.find(',', start);
    out.push_back(desc.substr(start, comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

int ReportParseError(CLI::App& app, const CLI::ParseError& e) {
  if (dynamic_cast<const CLI::CallForHelp*>(&e) != nullptr || dynamic_cast<const CLI::CallForAllHelp*>(&e) != nullptr) {
    return app.exit(e);  // help on stdout, exit 0
  }
  const CLI::App* cmd = DeepestCommand(app);
  const std::string path = CommandPath(cmd);
  std::vector<std::string> extras = app.remaining(true);
  if (dynamic_cast<const CLI::ExtrasError*>(&e) != nullptr && !extras.empty()) {
    const std::string& word = extras.front();
    if (word.size() > 1 && word[0] == '-') {
      std::string name = word.substr(0, word.find('='));
      std::string nearest = Nearest(name, FlagNames(cmd));
      return Usage(path + " has no flag " + name + (nearest.empty() ? "" : " (the nearest is " + nearest + ")") + "; " +
                   path + " --help lists its flags");
    }
    if (cmd == &app) {
      std::vector<std::string> names;
      for (const CLI::App* c : VisibleCommands(app)) names.push_back(c->get_name());
      std::string nearest = Nearest(word, names);
      return Usage(Printable(word, 80) + " is not a regdisk command" +
                   (nearest.empty() ? "" : " (the nearest is \"" + nearest + "\")") + "; regdisk --help lists them");
    }
    return Usage(path + " does not take the argument " + Printable(word, 80) + "; " + path + " --help shows its arguments");
  }
  return Usage(Rephrase(e, path));
}

}  // namespace regdisk::cli
