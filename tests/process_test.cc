#include "util/process.h"

#include <fcntl.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <optional>
#include <thread>

#include "util/fs.h"

namespace regdisk {
namespace {

using namespace std::chrono_literals;

TEST(ProcessTest, RunCapturesOutputAndExitCode) {
  auto r = Process::Run({"sh", "-c", "read x; echo out:$x; echo err >&2; exit 3"}, 10s, "hello\n");
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->exit_code, 3);
  EXPECT_EQ(r->out, "out:hello\n");
  EXPECT_EQ(r->err, "err\n");
}

TEST(ProcessTest, ArgvIsNotInterpretedByAShell) {
  auto r = Process::Run({"echo", "$HOME; rm -rf /tmp/nothing"}, 10s);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->out, "$HOME; rm -rf /tmp/nothing\n");
}

TEST(ProcessTest, MissingProgramIsAClearError) {
  auto r = Process::Run({"regdisk-no-such-program"}, 10s);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), ::testing::HasSubstr("was not found on PATH"));
}

TEST(ProcessTest, AChildHoldsAnInheritedLockAndNoOtherDescriptor) {
  auto dir = TempDir::Create("regdisk-test");
  ASSERT_TRUE(dir.ok());
  const auto lock_path = dir->path() / "lock";
  auto lock = FileLock::Acquire(lock_path, FileLock::Mode::kShared);
  ASSERT_TRUE(lock.ok());
  auto opened = OpenFile(dir->path() / "other", O_RDWR | O_CREAT);
  ASSERT_TRUE(opened.ok());
  UniqueFd other(::fcntl(opened->get(), F_DUPFD_CLOEXEC, 100));
  Process::Options opt;
  opt.inherit_fds = {lock->fd()};
  // The child itself (no shell that forks): Spawn returns once it has exec'd.
  auto child = Process::Spawn({"sleep", "30"}, opt);
  ASSERT_TRUE(child.ok()) << child.status().ToString();
  const std::filesystem::path fds = "/proc/" + std::to_string(child->pid()) + "/fd";
  EXPECT_TRUE(std::filesystem::exists(fds / std::to_string(lock->fd())));
  EXPECT_FALSE(std::filesystem::exists(fds / std::to_string(other.get())));
  // Nothing else of ours (the program itself may open files as it starts).
  for (const auto& e : std::filesystem::directory_iterator(fds)) {
    std::error_code ec;
    const auto target = std::filesystem::read_symlink(e.path(), ec);
    if (e.path().filename() != std::to_string(lock->fd())) {
      EXPECT_NE(target.parent_path(), dir->path()) << e.path().filename() << " -> " << target;
    }
  }
  { auto released = std::move(*lock); }  // our own descriptor is closed
  auto taken = FileLock::TryAcquire(lock_path);
  ASSERT_TRUE(taken.ok());
  EXPECT_FALSE(taken->has_value()) << "the child's inherited descriptor should still hold the lock";
  child->Terminate(0ms);
  taken = FileLock::TryAcquire(lock_path);
  ASSERT_TRUE(taken.ok());
  EXPECT_TRUE(taken->has_value());
}

TEST(ProcessTest, AFailedExecIsAnErrorAndLeavesNoChild) {
  auto dir = TempDir::Create("regdisk-test");
  ASSERT_TRUE(dir.ok());
  const auto script = dir->path() / "not-executable";
  ASSERT_TRUE(WriteFileAtomic(script, "#!/bin/sh\n", 0755).ok());
  Process::Options opt;
  opt.cwd = dir->path() / "no-such-dir";
  auto r = Process::Spawn({script.string()}, opt);
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), ::testing::HasSubstr("No such file or directory"));
}

TEST(ProcessTest, TimeoutKillsTheChild) {
  auto start = std::chrono::steady_clock::now();
  auto r = Process::Run({"sleep", "30"}, 300ms);
  EXPECT_EQ(r.status().code(), Code::kDeadlineExceeded);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 10s);
}

TEST(ProcessTest, DestructorKillsAndReaps) {
  pid_t pid;
  {
    Process::Options opt;
    auto p = Process::Spawn({"sleep", "30"}, opt);
    ASSERT_TRUE(p.ok());
    pid = p->pid();
  }
  EXPECT_EQ(::kill(pid, 0), -1);  // gone, and reaped (not a zombie)
}

// The ppid of `pid`, from /proc.
pid_t ParentOf(pid_t pid) {
  auto status = ReadFileCapped("/proc/" + std::to_string(pid) + "/status", 1 << 16);
  if (!status.ok()) return -1;
  const size_t at = status->find("\nPPid:");
  return at == std::string::npos ? -1 : static_cast<pid_t>(std::atoi(status->c_str() + at + 6));
}

TEST(ProcessTest, ADetachedChildIsNotOursAndOutlivesTheThreadThatStartedIt) {
  // setpriv asks for a parent-death signal, as nbdkit does; the thread that
  // starts it then exits. A detached child was handed to init before it
  // ran, so that signal refers to init and never comes.
  std::optional<Process> p;
  Status started;
  std::thread([&] {
    Process::Options o;
    o.detach = true;
    auto r = Process::Spawn({"setpriv", "--pdeathsig", "TERM", "--", "sleep", "60"}, o);
    started = r.status();
    if (r.ok()) p.emplace(std::move(*r));
  }).join();
  ASSERT_TRUE(started.ok()) << started.ToString();
  ASSERT_GT(p->pid(), 0);
  EXPECT_NE(ParentOf(p->pid()), ::getpid());
  EXPECT_NE(ParentOf(p->pid()), -1) << "the detached child is gone";
  EXPECT_EQ(p->Poll(), std::nullopt);
  EXPECT_EQ(p->Wait(20ms), std::nullopt);
  // Terminate works through the pidfd, and the child is gone afterwards.
  const pid_t pid = p->pid();
  EXPECT_EQ(p->Terminate(5s), -1);
  EXPECT_EQ(p->Poll(), -1);
  // Exited: gone, or a zombie until init reaps it.
  auto state = ReadFileCapped("/proc/" + std::to_string(pid) + "/status", 1 << 16);
  EXPECT_TRUE(!state.ok() || state->find("\nState:\tZ") != std::string::npos) << *state;
}

TEST(ProcessTest, ADetachedChildThatCannotStartIsAnError) {
  Process::Options o;
  o.detach = true;
  auto r = Process::Spawn({"/nonexistent/program"}, o);
  EXPECT_FALSE(r.ok());
  o.die_with_parent = true;
  r = Process::Spawn({"true"}, o);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Code::kInvalidArgument);
}

TEST(ProcessTest, ChildInheritsNoDescriptors) {
  // A descriptor opened here without O_CLOEXEC must still not leak.
  int leaky = ::open("/dev/null", O_RDONLY);
  ASSERT_GE(leaky, 0);
  auto r = Process::Run({"ls", "/proc/self/fd"}, 10s);
  ::close(leaky);
  ASSERT_TRUE(r.ok());
  // ls itself holds 0, 1, 2 and the directory it reads.
  std::string out = r->out;
  int count = 0;
  for (char c : out) count += c == '\n';
  EXPECT_LE(count, 4) << out;
}

// regdisk started with stdout closed (say, `regdisk run ... >&-`): the file
// a child should write to lands on descriptor 1 itself, and must still be
// the child's stdout after exec.
TEST(ProcessTest, AChildGetsItsStdioWhenOursWasClosed) {
  char dir_template[] = "/tmp/regdisk-proc.XXXXXX";
  ASSERT_NE(::mkdtemp(dir_template), nullptr);
  const std::string out_file = std::string(dir_template) + "/out";
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(1);
    Process::Options opt;
    opt.stdin_mode = Process::Stdio::kInherit;  // so that the file is the first thing opened
    opt.stdout_mode = Process::Stdio::kFile;
    opt.stdout_file = out_file;
    opt.stderr_mode = Process::Stdio::kNull;
    auto p = Process::Spawn({"echo", "hi"}, opt);
    ::_exit(p.ok() && p->Wait(10s) == 0 ? 0 : 3);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0);
  auto text = ReadFileCapped(out_file, 100);
  ASSERT_TRUE(text.ok());
  EXPECT_EQ(*text, "hi\n");
  std::filesystem::remove_all(dir_template);
}

TEST(ProcessTest, EnsureStdioOpenFillsClosedDescriptorsWithDevNull) {
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::close(0);
    ::close(2);
    EnsureStdioOpen();
    struct stat st {};
    bool ok = ::fstat(0, &st) == 0 && S_ISCHR(st.st_mode) && ::fstat(2, &st) == 0 && S_ISCHR(st.st_mode);
    int next = ::open("/dev/null", O_RDONLY | O_CLOEXEC);  // the first free number is now above stdio
    ::_exit(ok && next > 2 ? 0 : 3);
  }
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

TEST(FsTest, AtomicWriteLeavesNoTempOnSuccessAndOldFileOnFailure) {
  auto dir = TempDir::Create("regdisk-fs");
  ASSERT_TRUE(dir.ok());
  auto p = dir->path() / "f";
  ASSERT_TRUE(WriteFileAtomic(p, "one").ok());
  ASSERT_TRUE(WriteFileAtomic(p, "two").ok());
  EXPECT_EQ(*ReadFileCapped(p, 100), "two");
  int n = 0;
  for (auto& e : std::filesystem::directory_iterator(dir->path())) n += e.is_regular_file();
  EXPECT_EQ(n, 1);
  {
    auto pending = PendingFile::Create(p);
    ASSERT_TRUE(pending.ok());
    ASSERT_TRUE(WriteAll(pending->fd(), "partial").ok());
    // dropped without Commit
  }
  EXPECT_EQ(*ReadFileCapped(p, 100), "two");
  EXPECT_FALSE(ReadFileCapped(p, 2).ok());
}

}  // namespace
}  // namespace regdisk
