// Shell completion scripts and man pages, generated from the CLI11
// definitions main.cc makes, so that they never drift from the parser.
//
//   std::string bash = CompletionScript(app, "bash");   // or "zsh", "fish"
//   std::string page = ManPage(app, nullptr);           // regdisk(1)
//   std::string pull = ManPage(app, pull_command);      // regdisk-pull(1)
//
// Hidden commands (an empty CLI11 group) appear in neither.
#pragma once

#include <filesystem>
#include <string>

#include <CLI/CLI.hpp>

#include "util/status.h"

namespace regdisk::cli {

// The completion script for `shell` (bash, zsh or fish); empty for any
// other shell.
std::string CompletionScript(const CLI::App& app, const std::string& shell);

// The man page of `command` (a subcommand of app), or of regdisk itself
// when it is null, in man(7) roff. `version` goes into the footer.
std::string ManPage(const CLI::App& app, const CLI::App* command, const std::string& version);

// Writes DIR/man1/regdisk.1, DIR/man1/regdisk-COMMAND.1 and
// DIR/completions/{regdisk.bash,_regdisk,regdisk.fish} (what
// `cmake --install` installs).
Status WriteDocs(const CLI::App& app, const std::filesystem::path& dir, const std::string& version);

}  // namespace regdisk::cli
