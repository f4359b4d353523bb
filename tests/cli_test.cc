// The command line's conventions: one-line errors and exit codes, flag
// values (durations, log levels), version, shell completion, man pages and
// what cmake --install puts where. Runs the real regdisk binary.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "cli/flags.h"
#include "harness/harness.h"
#include "util/text.h"

namespace regdisk::testing {
namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;
namespace fs = std::filesystem;
using json = nlohmann::json;
using std::chrono::milliseconds;

// One line on stderr, "regdisk: error: ...".
void ExpectOneErrorLine(const RunResult& r, const std::string& context) {
  EXPECT_THAT(r.err, StartsWith("regdisk: error: ")) << context;
  ASSERT_FALSE(r.err.empty()) << context;
  EXPECT_EQ(r.err.back(), '\n') << context;
  EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << context << ": " << r.err;
  EXPECT_EQ(r.out, "") << context;
}

TEST(DurationTest, AcceptsGoAndKubectlDurationsAndBareSeconds) {
  const std::pair<const char*, milliseconds> ok[] = {
      {"10s", milliseconds(10000)}, {"5m", milliseconds(300000)},  {"1h", milliseconds(3600000)},
      {"1h30m", milliseconds(5400000)}, {"500ms", milliseconds(500)}, {"1.5h", milliseconds(5400000)},
      {"2m30s", milliseconds(150000)},  {"0", milliseconds(0)},       {"45", milliseconds(45000)},
      {"0.25", milliseconds(250)},
  };
  for (const auto& [text, want] : ok) {
    auto d = cli::ParseDuration("--grace", text);
    ASSERT_OK(d);
    EXPECT_EQ(d->count(), want.count()) << text;
  }
  for (const char* bad : {"", "5x", "-5s", "s", "1h30", "1..5s", "10 s", "1d", "99999999h", "5S"}) {
    auto d = cli::ParseDuration("--timeout", bad);
    EXPECT_FALSE(d.ok()) << bad;
    if (!d.ok()) {
      EXPECT_THAT(d.status().message(), HasSubstr("--timeout takes a duration")) << bad;
    }
  }
}

TEST(NearestTest, PicksTheClosestWord) {
  const std::vector<std::string> commands = {"copy", "inspect", "pull", "images", "rmi", "prune", "run", "login"};
  EXPECT_EQ(cli::Nearest("pul", commands), "pull");
  EXPECT_EQ(cli::Nearest("imgaes", commands), "images");
  EXPECT_EQ(cli::Nearest("logn", commands), "login");
  EXPECT_EQ(cli::Nearest("insp", commands), "inspect");
  EXPECT_EQ(EditDistance("kitten", "sitting"), 3u);
  EXPECT_EQ(cli::Nearest("x", {}), "");
}

class CliTest : public TempDirTest {};

TEST_F(CliTest, BadUsageIsOneLineAndExitCode2) {
  struct Case {
    std::vector<std::string> args;
    std::vector<std::string> says;
  };
  const std::string spec = P("vm.yaml");
  const Case cases[] = {
      // (not "login": that is a command once the login branch is merged)
      {{"logn"}, {"\"logn\" is not a regdisk command", "the nearest is", "regdisk --help"}},
      {{"pul", "docker://x/y"}, {"\"pul\" is not a regdisk command", "the nearest is \"pull\"", "regdisk --help"}},
      {{"--root", P("r"), "imgaes"}, {"the nearest is \"images\""}},
      {{}, {"regdisk needs a command", "regdisk --help"}},
      {{"pull"}, {"regdisk pull", "image is required", "regdisk pull --help"}},
      {{"pull", "--bogus", "x"}, {"regdisk pull has no flag --bogus", "regdisk pull --help"}},
      {{"images", "--rooot", "x"}, {"has no flag --rooot", "the nearest is --root"}},
      {{"validate", "-f", spec, "extra"}, {"does not take the argument \"extra\""}},
      {{"run", "-f", spec, "--timeout"}, {"--timeout needs a value"}},
      {{"run", "-f", spec, "--timeout", "5x"}, {"--timeout takes a duration such as", "not \"5x\""}},
      {{"run", "-f", spec, "--grace", "-1"}, {"--grace takes a duration"}},
      {{"--log-level", "loud", "images"}, {"--log-level takes error, warn, info or debug, not \"loud\""}},
      {{"run", "-f", spec, "--accel", "fast"}, {"--accel takes auto, kvm or tcg"}},
      {{"build", P("d.qcow2"), "-t", "oci:" + P("l"), "--compression", "lz4"}, {"--compression takes gzip, zstd or none"}},
      {{"completion", "tcsh"}, {"takes bash, zsh or fish"}},
      {{"version", "-o", "yaml"}, {"takes text or json"}},
      {{"\x1b[31mred"}, {"\"\\x1b[31mred\" is not a regdisk command"}},  // escaped, not interpreted
  };
  for (const auto& c : cases) {
    std::string context;
    for (const auto& a : c.args) context += a + " ";
    RunResult r = RunRegdisk(c.args);
    EXPECT_EQ(r.exit_code, 2) << context << r.err;
    ExpectOneErrorLine(r, context);
    for (const auto& s : c.says) EXPECT_THAT(r.err, HasSubstr(s)) << context;
  }
}

TEST_F(CliTest, FailuresThatAreNotUsageExit1WithOneLine) {
  RunResult r = RunRegdisk({"--root", P("nowhere"), "fsck"});
  EXPECT_EQ(r.exit_code, 1) << r.err;
  ExpectOneErrorLine(r, "fsck");
  EXPECT_THAT(r.err, HasSubstr("--root"));
}

TEST_F(CliTest, HelpIsCli11sOnStdoutWithExit0) {
  for (const std::vector<std::string>& args : {std::vector<std::string>{"--help"}, {"pull", "--help"}, {"run", "-h"}}) {
    RunResult r = RunRegdisk(args);
    EXPECT_EQ(r.exit_code, 0) << args[0];
    EXPECT_THAT(r.out, HasSubstr("Usage:")) << args[0];
    EXPECT_EQ(r.err, "");
  }
  EXPECT_THAT(RunRegdisk({"run", "--help"}).out, HasSubstr("--grace"));
}

TEST_F(CliTest, DurationsReachTheCommand) {
  // The spec is missing: the error is about the spec, not the durations.
  RunResult r = RunRegdisk({"run", "-f", P("missing.yaml"), "--timeout", "1h30m", "--grace", "500ms"});
  EXPECT_NE(r.exit_code, 0);
  EXPECT_THAT(r.err, HasSubstr("missing.yaml"));
  EXPECT_THAT(r.err, ::testing::Not(HasSubstr("duration")));
  r = RunRegdisk({"run", "-f", P("missing.yaml"), "--grace", "15"});  // bare seconds still work
  EXPECT_THAT(r.err, HasSubstr("missing.yaml"));
}

TEST_F(CliTest, VersionNamesRegdiskTheApisAndQemu) {
  RunResult text = RunRegdisk({"version"});
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_THAT(text.out, StartsWith("regdisk version " REGDISK_VERSION "\n"));
  EXPECT_THAT(text.out, HasSubstr("kubevirt.io/v1, kubevirt.io/v1alpha1"));
  EXPECT_THAT(text.out, HasSubstr("OCI image-spec: "));
  EXPECT_THAT(text.out, HasSubstr("OCI distribution-spec: "));
  RunResult qemu = RunProgram({"qemu-system-x86_64", "--version"});
  ASSERT_EQ(qemu.exit_code, 0);
  const std::string qemu_version = qemu.out.substr(qemu.out.find("version ") + 8, qemu.out.find_first_of(" \n", qemu.out.find("version ") + 8) - qemu.out.find("version ") - 8);
  EXPECT_THAT(text.out, HasSubstr("QEMU: " + qemu_version + " ("));
  EXPECT_EQ(RunRegdisk({"--version"}).out, text.out);

  RunResult js = RunRegdisk({"version", "-o", "json"});
  ASSERT_EQ(js.exit_code, 0) << js.err;
  json j = json::parse(js.out);
  EXPECT_EQ(j["version"], REGDISK_VERSION);
  EXPECT_EQ(j["kubevirtApiVersions"], json::array({"kubevirt.io/v1", "kubevirt.io/v1alpha1"}));
  EXPECT_TRUE(j["oci"]["imageSpec"].is_string());
  EXPECT_EQ(j["qemu"]["version"], qemu_version);

  // No QEMU on PATH: said, not a failure.
  RunResult none = RunProgram({"/usr/bin/env", "PATH=" + tmp().string(), REGDISK_BIN, "version", "-o", "json"});
  ASSERT_EQ(none.exit_code, 0) << none.err;
  j = json::parse(none.out);
  EXPECT_EQ(j["qemu"]["version"], "");
  EXPECT_THAT(j["qemu"]["error"].get<std::string>(), HasSubstr("qemu-system-x86_64 is not on PATH"));
  none = RunProgram({"/usr/bin/env", "PATH=" + tmp().string(), REGDISK_BIN, "--version"});
  EXPECT_EQ(none.exit_code, 0);
  EXPECT_THAT(none.out, HasSubstr("QEMU: unavailable: qemu-system-x86_64 is not on PATH"));
}

TEST_F(CliTest, LogLevelChoosesWhatStderrCarries) {
  ASSERT_EQ(RunProgram({"qemu-img", "create", "-q", "-f", "qcow2", P("d.qcow2"), "1M"}).exit_code, 0);
  auto build = [&](std::vector<std::string> flags, const std::string& dir) {
    flags.insert(flags.end(), {"build", P("d.qcow2"), "-t", "oci:" + P(dir) + ":v1"});
    return RunRegdisk(flags);
  };
  // By default only the progress (its final line, stderr being no terminal).
  RunResult quiet = build({}, "a");
  ASSERT_EQ(quiet.exit_code, 0) << quiet.err;
  EXPECT_EQ(quiet.err, "Writing " + P("d.qcow2") + " done 192.0KiB\n");
  RunResult info = build({"--log-level", "info"}, "b");
  ASSERT_EQ(info.exit_code, 0) << info.err;
  EXPECT_THAT(info.err, HasSubstr("regdisk: info: layer "));
  RunResult debug = build({"-v"}, "c");
  EXPECT_THAT(debug.err, HasSubstr("regdisk: info: layer "));
  RunResult q = build({"-q"}, "d");
  ASSERT_EQ(q.exit_code, 0) << q.err;
  EXPECT_EQ(q.err, "");
  EXPECT_THAT(q.out, StartsWith("sha256:"));  // -q keeps the result
}

// What a file holds, or "" when it cannot be read.
std::string Read(const fs::path& p) { return ReadFileCapped(p, 1 << 20).value_or(""); }

TEST_F(CliTest, InstallPutsBinaryManPagesAndCompletionsInTheirPlaces) {
  const fs::path prefix = tmp() / "prefix";
  RunResult r = RunProgram({"cmake", "--install", REGDISK_BUILD_DIR, "--prefix", prefix.string()});
  ASSERT_EQ(r.exit_code, 0) << r.out << r.err;
  EXPECT_TRUE(fs::exists(prefix / "bin/regdisk"));
  const fs::path man = prefix / "share/man/man1";
  for (const char* page : {"regdisk.1", "regdisk-pull.1", "regdisk-run.1", "regdisk-build.1", "regdisk-version.1",
                           "regdisk-completion.1"}) {
    EXPECT_TRUE(fs::exists(man / page)) << page;
  }
  EXPECT_FALSE(fs::exists(man / "regdisk-generate-docs.1")) << "a hidden command got a page";
  const fs::path bash = prefix / "share/bash-completion/completions/regdisk";
  const fs::path zsh = prefix / "share/zsh/site-functions/_regdisk";
  const fs::path fish = prefix / "share/fish/vendor_completions.d/regdisk.fish";
  // The installed scripts are what the binary prints.
  EXPECT_EQ(Read(bash), RunRegdisk({"completion", "bash"}).out);
  EXPECT_EQ(Read(zsh), RunRegdisk({"completion", "zsh"}).out);
  EXPECT_EQ(Read(fish), RunRegdisk({"completion", "fish"}).out);
  EXPECT_THAT(Read(zsh), StartsWith("#compdef regdisk\n"));

  // Every page renders without a groff warning.
  for (const auto& e : fs::directory_iterator(man)) {
    RunResult g = RunProgram({"groff", "-man", "-ww", "-z", e.path().string()});
    EXPECT_EQ(g.exit_code, 0) << e.path();
    EXPECT_EQ(g.err, "") << e.path();
  }
  if (!FindExecutable("man").empty()) {
    RunResult m = RunProgram({"man", "--warnings", "-l", (man / "regdisk-run.1").string()}, {}, {"MANPAGER=cat", "MANWIDTH=100"});
    EXPECT_EQ(m.exit_code, 0) << m.err;
    EXPECT_EQ(m.err, "");
    EXPECT_THAT(m.out, HasSubstr("--grace"));
  }
  const std::string top = Read(man / "regdisk.1");
  EXPECT_THAT(top, HasSubstr(".SH EXIT STATUS"));
  EXPECT_THAT(top, HasSubstr("regdisk\\-pull"));
  EXPECT_THAT(top, HasSubstr("\\-\\-log\\-level"));
}

TEST_F(CliTest, BashCompletionCompletesCommandsFlagsAndValues) {
  const fs::path script = tmp() / "regdisk.bash";
  ASSERT_OK(WriteFileAtomic(script, RunRegdisk({"completion", "bash"}).out));
  auto complete = [&](const std::string& words, int cword) {
    RunResult r = RunProgram({"bash", "--norc", "-c",
                              "source \"$0\"; COMP_WORDS=(" + words + "); COMP_CWORD=" + std::to_string(cword) +
                                  "; _regdisk; echo \"${COMPREPLY[*]}\"",
                              script.string()});
    EXPECT_EQ(r.err, "") << words;
    return r.out;
  };
  EXPECT_EQ(complete("regdisk pu", 1), "pull\n");
  EXPECT_EQ(complete("regdisk --root /x --log-level debug bu", 5), "build\n");
  EXPECT_EQ(complete("regdisk ver", 1), "version\n");
  EXPECT_EQ(complete("regdisk --log-level ''", 2), "error warn info debug\n");
  EXPECT_EQ(complete("regdisk completion ''", 2), "bash zsh fish\n");
  EXPECT_EQ(complete("regdisk build --compression ''", 3), "gzip zstd none\n");
  EXPECT_EQ(complete("regdisk run --gr", 2), "--grace\n");
  EXPECT_EQ(complete("regdisk pull --ro", 2), "--root\n");  // global flags after the command
  EXPECT_EQ(complete("regdisk gen", 1), "\n") << "hidden commands are not offered";
}

TEST_F(CliTest, ZshAndFishScriptsParse) {
  for (const char* shell : {"zsh", "fish"}) {
    if (FindExecutable(shell).empty()) continue;  // not installed here
    const fs::path script = tmp() / shell;
    ASSERT_OK(WriteFileAtomic(script, RunRegdisk({"completion", shell}).out));
    RunResult r = RunProgram({shell, "-n", script.string()});
    EXPECT_EQ(r.exit_code, 0) << shell << ": " << r.err;
  }
  // Descriptions with quotes and brackets are escaped for each shell.
  const std::string zsh = RunRegdisk({"completion", "zsh"}).out;
  EXPECT_THAT(zsh, HasSubstr("'--platform[OS/ARCH\\[/VARIANT\\] to select from an index]:PLATFORM:_files'"));
  EXPECT_THAT(zsh, HasSubstr("'fsck:verify the node store: blobs"));
  EXPECT_THAT(zsh, HasSubstr("'\\''"));  // an apostrophe inside a single-quoted word
  const std::string fish = RunRegdisk({"completion", "fish"}).out;
  EXPECT_THAT(fish, HasSubstr("complete -c regdisk -n '__fish_seen_subcommand_from build' -l compression -x -a 'gzip zstd none'"));
}

// The zsh script loaded by zsh itself: compinit finds _regdisk on $fpath,
// and a line typed on a pseudo-terminal (zsh's zpty module) is completed
// with Tab. A compadd wrapper appends what would be offered, after zsh's
// own matching against the word, to a file; the line is cleared only once
// that file has something in it (each case here offers something).
TEST_F(CliTest, ZshCompletesCommandsFlagsAndValues) {
  if (FindExecutable("zsh").empty()) GTEST_SKIP() << "zsh is not installed (./dev.sh deps installs it)";
  const fs::path fn = tmp() / "functions";
  ASSERT_OK(MakeDirs(fn));
  ASSERT_OK(WriteFileAtomic(fn / "_regdisk", RunRegdisk({"completion", "zsh"}).out));
  const fs::path driver = tmp() / "complete.zsh";
  // complete.zsh FPATH-DIR OUT LINE. Each command waits for the prompt, as
  // zsh drops what was typed ahead of compinit.
  ASSERT_OK(WriteFileAtomic(driver, R"(zmodload zsh/zpty || exit 3
fn=$1 out=$2 line=$3
zpty z env TERM=dumb zsh -f -i || exit 3
ready() { zpty -r z chunk '*<ready>*' || exit 4; }
zpty -w z "PS1='<ready>'; fpath=(${(q)fn} \$fpath); autoload -Uz compinit; compinit -u -D"
ready
zpty -w z "compadd() { if (( \${@[(I)-[OAD]]} )); then builtin compadd \"\$@\"; return; fi; local -a m; builtin compadd -O m \"\$@\"; print -rl -- \$m >> ${(q)out}; builtin compadd \"\$@\"; }"
ready
zpty -w -n z "$line"$'\t'
# The rest only once the completion has offered something (hang guard:
# 30 s): keys typed ahead of a completion can cut it short.
for i in {1..300}; do [[ -s $out ]] && break; sleep 0.1; done
zpty -w -n z $'\C-u'"exit"$'\n'
while zpty -r z chunk; do :; done
)"));
  int n = 0;
  auto complete = [&](const std::string& line) {
    const fs::path out = tmp() / ("offered-" + std::to_string(++n));
    RunResult r = RunProgram({"zsh", "-f", driver.string(), fn.string(), out.string(), line});
    EXPECT_EQ(r.exit_code, 0) << line << ": " << r.err;
    auto offered = ReadFileCapped(out, 1 << 20);
    return offered.ok() ? *offered : "(nothing offered)";
  };
  EXPECT_EQ(complete("regdisk pu"), "pull\n");
  EXPECT_EQ(complete("regdisk ver"), "version\n");
  EXPECT_EQ(complete("regdisk --log-level "), "error\nwarn\ninfo\ndebug\n");
  EXPECT_EQ(complete("regdisk completion "), "bash\nzsh\nfish\n");
  EXPECT_EQ(complete("regdisk build --compression "), "gzip\nzstd\nnone\n");
  EXPECT_EQ(complete("regdisk run --gr"), "--grace\n");
}

// The fish script loaded by fish, asked what it completes (complete -C).
TEST_F(CliTest, FishCompletesCommandsFlagsAndValues) {
  if (FindExecutable("fish").empty()) GTEST_SKIP() << "fish is not installed (./dev.sh deps installs it)";
  const fs::path script = tmp() / "regdisk.fish";
  ASSERT_OK(WriteFileAtomic(script, RunRegdisk({"completion", "fish"}).out));
  auto complete = [&](const std::string& line) {
    // Candidates only (fish prints "candidate<TAB>description"), sorted by fish.
    RunResult r = RunProgram({"fish", "--no-config", "-c",
                              "source $argv[1]; complete -C $argv[2] | string match -r '^[^\\t]*'",
                              script.string(), line});
    EXPECT_EQ(r.exit_code, 0) << line << ": " << r.err;
    EXPECT_EQ(r.err, "") << line;
    return r.out;
  };
  EXPECT_EQ(complete("regdisk pu"), "pull\n");
  EXPECT_EQ(complete("regdisk ver"), "version\n");
  EXPECT_EQ(complete("regdisk --log-level "), "debug\nerror\ninfo\nwarn\n");
  EXPECT_EQ(complete("regdisk completion "), "bash\nfish\nzsh\n");
  EXPECT_EQ(complete("regdisk build --compression "), "gzip\nnone\nzstd\n");
  EXPECT_EQ(complete("regdisk run --gr"), "--grace\n");
}

}  // namespace
}  // namespace regdisk::testing
