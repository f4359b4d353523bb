// Turning the flag parser's complaints into regdisk's one-line errors.
//
//   try { app.parse(argc, argv); }
//   catch (const CLI::ParseError& e) { return ReportParseError(app, e); }
//
// --help prints CLI11's help on stdout (exit 0); everything else becomes
// "regdisk: error: ..." on stderr naming the word, the nearest command or
// flag, and `regdisk [COMMAND] --help`, with exit code 2.
#pragma once

#include <string>
#include <vector>

#include <CLI/CLI.hpp>

namespace regdisk::cli {

int ReportParseError(CLI::App& app, const CLI::ParseError& e);

// The visible subcommands of `app` (hidden ones have an empty group).
std::vector<const CLI::App*> VisibleCommands(const CLI::App& app);

// A validator for a flag that takes one of `choices`; its description
// ("{a,b,c}") is what completion offers (cli/docgen.h).
CLI::Validator OneOf(std::vector<std::string> choices);

// The words of a OneOf validator on `opt` (empty when it has none).
std::vector<std::string> ChoicesOf(const CLI::Option& opt);

}  // namespace regdisk::cli
