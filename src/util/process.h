// Child processes, started with an argv array (never a shell), every fd but
// stdio (and those named in Options::inherit_fds) closed in the child, and
// killed and reaped when the owner goes away.
//
//   Process::Options opt;
//   opt.stdout_mode = Process::Stdio::kPipe;
//   ASSIGN_OR_RETURN(Process p, Process::Spawn({"skopeo", "inspect", ref}, opt));
//   ASSIGN_OR_RETURN(Process::Output out, p.Communicate(std::chrono::seconds(30)));
#pragma once

#include <sys/types.h>

#include <chrono>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "util/fs.h"
#include "util/status.h"

namespace regdisk {

// Opens /dev/null on whichever of descriptors 0, 1 and 2 is closed, so that
// no file opened later lands on a stdio number (where a child would write
// its output into it). Call first thing in main, before any thread starts.
void EnsureStdioOpen();

class Process {
 public:
  enum class Stdio { kInherit, kNull, kPipe, kFile };

  struct Options {
    Stdio stdin_mode = Stdio::kNull;
    Stdio stdout_mode = Stdio::kInherit;
    Stdio stderr_mode = Stdio::kInherit;
    std::filesystem::path stdout_file;  // with kFile (appended)
    std::filesystem::path stderr_file;  // with kFile (appended)
    // Environment of the child; when unset the parent's is inherited.
    std::optional<std::vector<std::string>> env;
    std::filesystem::path cwd;
    // Put the child in its own process group so that a signal reaches
    // everything it starts.
    bool new_process_group = true;
    // SIGKILL the child when the thread that started it dies, however it
    // dies (PR_SET_PDEATHSIG): a supervised child never outlives its
    // supervisor unnoticed.
    bool die_with_parent = false;
    // The child is handed to init (or the nearest child subreaper) before
    // it runs the program: it is not our child, outlives us, and a
    // parent-death signal the program asks for itself (nbdkit does, even
    // in the foreground) never fires when we go. It leads a new session.
    // Poll, Wait and Terminate then work through a pidfd, and an exit code
    // is not known (-1). Not with die_with_parent.
    bool detach = false;
    // Descriptors the child inherits under the same numbers (say, a lock
    // it must hold for as long as it lives); every other one is closed.
    std::vector<int> inherit_fds;
  };

  struct Output {
    int exit_code = -1;  // 128+signal when killed by a signal
    std::string out;
    std::string err;
  };

  // Looks argv[0] up on PATH when it has no slash.
  static Result<Process> Spawn(const std::vector<std::string>& argv, const Options& options);

  // Spawns, writes `input` to stdin, collects stdout and stderr, and waits;
  // a child still running at the deadline is killed and DeadlineExceeded
  // is returned.
  static Result<Output> Run(const std::vector<std::string>& argv, std::chrono::milliseconds timeout,
                            std::string_view input = {}, const Options* base = nullptr);

  Process(Process&& o) noexcept;
  Process& operator=(Process&& o) noexcept;
  Process(const Process&) = delete;
  Process& operator=(const Process&) = delete;
  // Kills (SIGKILL) and reaps a child that is still running.
  ~Process();

  pid_t pid() const { return pid_; }
  int stdin_fd() const { return in_.get(); }
  int stdout_fd() const { return out_.get(); }
  int stderr_fd() const { return err_.get(); }
  void CloseStdin() { in_.reset(); }

  // Writes input, reads pipes until EOF, then waits for exit.
  Result<Output> Communicate(std::chrono::milliseconds timeout, std::string_view input = {});

  // Non-blocking: the exit code once the child has exited.
  std::optional<int> Poll();
  // Waits up to timeout; nullopt when still running.
  std::optional<int> Wait(std::chrono::milliseconds timeout);
  // Sends sig (to the group when the child leads one).
  void Signal(int sig);
  // SIGTERM, wait up to grace, then SIGKILL; always reaps.
  int Terminate(std::chrono::milliseconds grace);
  // Gives the child up: this object no longer kills or reaps it, and the
  // caller owns what remains (reaping it, for one; a pidfd and waitid(2)
  // do). Returns its pid. For children that must outlive this process,
  // such as the daemon's QEMUs.
  pid_t Release();

 private:
  Process() = default;
  pid_t pid_ = -1;
  bool group_ = false;
  UniqueFd pidfd_;  // detached children only
  std::optional<int> exit_code_;
  UniqueFd in_, out_, err_;
};

// The kernel's start time of `pid` (clock ticks after boot), or nullopt
// when there is no such process: with the pid, it names one process (a
// reused pid has another start time).
std::optional<uint64_t> ProcessStartTicks(pid_t pid);

// Searches PATH for an executable; empty when not found.
std::filesystem::path FindExecutable(std::string_view name);

}  // namespace regdisk
