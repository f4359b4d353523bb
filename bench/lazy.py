#!/usr/bin/python3
"""Lazy boot on a cold node: first console line, bytes before it, background fill.

    bench/lazy.py REGDISK BOOT_SECTOR [--small-mib 64] [--large-gib 8] [--runs 5] [--large-runs 3] [--out DIR]
                  [--baseline OLD_REGDISK]

Two chunked images (`regdisk build --layout chunked`) of the boot-sector
guest, padded with seeded incompressible data that the guest never reads,
are pushed to a docker-registry on 127.0.0.1 (filesystem storage, access
log on). Then, round after round, each with an empty store (a cold node):

  lazy         `regdisk run -f vm.yaml` (lazy boot): time to the guest's first
               console line, registry bytes sent until then, and time until
               the disk is committed to the store (the VM runs until then)
  full+boot    `regdisk run --no-lazy`: time to the first console line
  pull         `regdisk pull`: a plain chunked full pull

The guest runs under TCG (`--accel tcg`), so nothing depends on /dev/kvm.
Registry bytes are the registry process's write count (/proc/PID/io wchar:
every byte it sends, sendfile included) read the moment the line appears;
the access log gives the requests behind them. Checks, which fail the run:
every lazy run printed the line, booted lazily and completed its fill; the
stored disk equals the original (`qemu-img compare`); with
--check-first-line-share, the large image's bytes before the first line
stay within that share of its layer. Results: a table on stdout and
OUT/lazy-results.json. It needs no root: it reads /proc only for its own children.
"""

import argparse
import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # importing run.py must not leave bench/__pycache__ in the source tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import MIB, free_port, log, summary, timed, wait_http  # noqa: E402

GIB = 1 << 30
FIRST_LINE = b"REGDISK-GUEST-BOOTED"


class CheckFailed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise CheckFailed(what)


def cpu_s(pid):
    """CPU seconds (user + system, every thread) a live process has used."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Registry:
    """docker-registry on 127.0.0.1 with its access log, and a byte counter."""

    def __init__(self, work):
        self.dir = os.path.join(work, "registry")
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.dir, "access.log")
        os.makedirs(self.dir)
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write("version: 0.1\nlog: {level: error, accesslog: {disabled: false}}\n"
                    f"storage: {{filesystem: {{rootdirectory: {self.dir}/data}}}}\n"
                    f"http: {{addr: {self.host}}}\n")
        out = open(self.log_path, "wb")
        self.proc = subprocess.Popen(["docker-registry", "serve", cfg], stdout=out, stderr=out)
        wait_http(f"http://{self.host}/v2/", self.proc)

    def sent(self):
        """Bytes the registry has written so far: responses (sendfile counts) and its log lines."""
        with open(f"/proc/{self.proc.pid}/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
        raise RuntimeError("no wchar in /proc/PID/io")

    def log_size(self):
        return os.path.getsize(self.log_path)

    def requests(self, start, end=None):
        """(method path, status, bytes) of the access log's lines in [start, end)."""
        with open(self.log_path, "rb") as f:
            f.seek(start)
            data = f.read(None if end is None else end - start)
        out = []
        for line in data.decode(errors="replace").splitlines():
            q = line.split('"')
            if len(q) < 3 or " /v2/" not in q[1]:
                continue
            rest = q[2].split()
            try:
                out.append((q[1].rsplit(" ", 1)[0], int(rest[0]), int(rest[1]) if rest[1] != "-" else 0))
            except (IndexError, ValueError):
                continue
        return out

    def layer(self, repo, tag="latest"):
        import urllib.request
        req = urllib.request.Request(f"http://{self.host}/v2/{repo}/manifests/{tag}", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json"})
        with urllib.request.urlopen(req) as r:
            layers = json.load(r)["layers"]
        return max(layers, key=lambda l: l["size"])

    def stop(self):
        self.proc.terminate()
        self.proc.wait()


def make_disk(path, size, boot_sector, seed):
    """The guest's three sectors, zeros to 1 MiB, then seeded AES-CTR output to `size`.

    Sector 2 is not 'P...', so the guest halts after its lines and keeps
    running until it is stopped. openssl makes the random data at a few GB/s.
    """
    with open(boot_sector, "rb") as b:
        head = b.read()
    check(len(head) == 512, f"{boot_sector} is not a 512-byte boot sector")
    head += b"REGDISK-LAZY-BENCH".ljust(512, b"\0") + b"HALT".ljust(512, b"\0")
    key = f"{seed:032x}"
    with open(path, "wb") as f:
        f.write(head.ljust(MIB, b"\0"))
    # openssl encrypts a sparse file of zeros straight into the disk file
    # (appending after the first MiB): no copy through Python.
    zeros = path + ".zeros"
    with open(zeros, "wb") as z:
        z.truncate(size - MIB)
    try:
        with open(zeros, "rb") as src, open(path, "ab") as dst:
            subprocess.run(["openssl", "enc", "-aes-128-ctr", "-nosalt", "-K", key, "-iv", "0" * 32,
                            "-bufsize", str(4 * MIB)],
                           stdin=src, stdout=dst, check=True)
    finally:
        os.unlink(zeros)
    check(os.path.getsize(path) == size, f"{path} is {os.path.getsize(path)} bytes, not {size}")


def vm_spec(path, image):
    with open(path, "w") as f:
        f.write("apiVersion: kubevirt.io/v1alpha1\nkind: VirtualMachine\nmetadata: {name: lazy-bench}\n"
                "spec:\n  domain:\n    resources: {requests: {memory: 64Mi}}\n"
                "    devices: {disks: [{name: d, volumeName: v, disk: {dev: vda}}]}\n"
                f"  volumes: [{{name: v, registryDisk: {{image: {image}}}}}]\n")


class Bench:
    def __init__(self, a):
        self.a = a
        self.regdisk = os.path.abspath(a.regdisk)
        self.work = tempfile.mkdtemp(prefix="regdisk-lazy.", dir=a.work_parent)
        self.store = os.path.join(self.work, "store")
        self.samples = {}  # name -> list of values
        self.images = {}  # label -> figures
        self.traces = {}  # label -> what happened before the first line, first lazy run

    def rd(self, *argv, regdisk=None):
        return [regdisk or self.regdisk, "--root", self.store, "--tls-verify=false", *argv]

    def add(self, name, value):
        self.samples.setdefault(name, []).append(value)
        log(f"{name}: {value:.4g}")

    def cold(self):
        shutil.rmtree(self.store, ignore_errors=True)
        subprocess.run(["sync"])

    def committed(self):
        return bool(glob.glob(os.path.join(self.store, "disks", "*", "meta.json")) or
                    glob.glob(os.path.join(self.store, "disks", "*", "*", "meta.json")))

    def stored_disk(self):
        out = subprocess.run(self.rd("images", "-o", "json"), capture_output=True, check=True)
        images = json.loads(out.stdout)
        check(len(images) == 1, f"the store holds {len(images)} images after the pull, not 1")
        return images[0]["disk"]["file"]

    def boot(self, label, image, lazy, regdisk=None):
        """One cold `regdisk run` (of `regdisk`, default the one measured). Returns its
        figures; stops the VM at the first line (full+boot) or once the disk is committed (lazy)."""
        self.cold()
        spec = os.path.join(self.work, f"vm-{label}.yaml")
        vm_spec(spec, image)
        sent0, log0, reg_cpu0 = self.reg.sent(), self.reg.log_size(), cpu_s(self.reg.proc.pid)
        argv = self.rd("-v", "run", "-f", spec, "--accel", "tcg", "--timeout", "1200", "--grace", "1",
                       regdisk=regdisk)
        if not lazy:
            argv.append("--no-lazy")
        t0 = time.monotonic()
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        seen = threading.Event()
        r = {"stderr": []}

        def watch_out():
            for line in p.stdout:
                if FIRST_LINE in line and not seen.is_set():
                    r["first line s"] = time.monotonic() - t0
                    r["sent"] = self.reg.sent() - sent0
                    r["log end"] = self.reg.log_size()
                    seen.set()

        def watch_err():
            for line in p.stderr:
                r["stderr"].append((round(time.monotonic() - t0, 4), line.decode(errors="replace").rstrip()))

        threads = [threading.Thread(target=watch_out, daemon=True), threading.Thread(target=watch_err, daemon=True)]
        for t in threads:
            t.start()
        try:
            deadline = t0 + self.a.deadline
            while not seen.is_set() and time.monotonic() < deadline and p.poll() is None:
                seen.wait(0.01)
            check(seen.is_set(), f"{label}: no {FIRST_LINE.decode()} line (exit {p.poll()}): "
                  + "; ".join(l for _, l in r["stderr"][-5:]))
            if lazy:
                while not self.committed() and time.monotonic() < deadline and p.poll() is None:
                    time.sleep(0.02)
                check(self.committed(), f"{label}: the background fill did not complete "
                      f"(VM exit {p.poll()}): " + "; ".join(l for _, l in r["stderr"][-5:]))
                r["committed s"] = time.monotonic() - t0
                r["sent at commit"] = self.reg.sent() - sent0
                r["regdisk cpu s"] = cpu_s(p.pid)
                r["registry cpu s"] = cpu_s(self.reg.proc.pid) - reg_cpu0
                r["requests until commit"] = len(self.reg.requests(log0))
        finally:
            if p.poll() is None:
                p.terminate()
            p.wait()
            for t in threads:
                t.join(5)
        r["requests before first line"] = self.reg.requests(log0, r["log end"])
        text = "\n".join(l for _, l in r["stderr"])
        r["lazy"] = "is booting while it is pulled" in text
        # A fill that completes before the run asks for its export (a tiny
        # image on a busy machine) boots from the store: correct, but then
        # this run measured no lazy boot, and says so.
        r["arrived before boot"] = "arrived in full before boot" in text
        if lazy:
            check(r["lazy"] or r["arrived before boot"], f"{label}: run did not boot lazily: {text[-500:]}")
        return r

    def pull(self, image):
        self.cold()
        sent0, log0, reg_cpu0 = self.reg.sent(), self.reg.log_size(), cpu_s(self.reg.proc.pid)
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t, rss = timed(self.rd("pull", image))
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = ru.ru_utime + ru.ru_stime - ru0.ru_utime - ru0.ru_stime  # GNU time's child: regdisk
        return t, self.reg.sent() - sent0, cpu, cpu_s(self.reg.proc.pid) - reg_cpu0, len(self.reg.requests(log0))

    def compare(self, raw):
        stored = self.stored_disk()
        p = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", raw, stored], capture_output=True)
        check(p.returncode == 0, f"the stored disk {stored} differs from {raw} (qemu-img compare exit "
              f"{p.returncode}): {p.stderr.decode(errors='replace')[-300:]}")

    def image(self, label, size, seed):
        raw = os.path.join(self.work, f"{label}.raw")
        t0 = time.monotonic()
        make_disk(raw, size, self.a.boot_sector, seed)
        gen = time.monotonic() - t0
        ref = f"{self.reg.host}/bench/lazy-{label}:latest"
        t, _ = timed(self.rd("build", raw, "-t", "docker://" + ref, "--layout", "chunked", "-q"))
        layer = self.reg.layer(f"bench/lazy-{label}")
        self.images[label] = {"virtual bytes": size, "layer bytes": layer["size"], "generate s": gen,
                              "build+push s": t}
        log(f"image {label}: {size / MIB:.0f} MiB virtual, layer {layer['size'] / MIB:.1f} MiB, "
            f"generated in {gen:.1f} s, built and pushed in {t:.1f} s")
        # The original's pages are not needed until the compare: leave the
        # page cache to the registry's blob and the store.
        fd = os.open(raw, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        return raw, ref

    def measure(self, label, raw, ref, runs, full):
        """Rounds of lazy (and, with `full`, full+boot and pull), order rotating."""
        layer = self.images[label]["layer bytes"]
        steps = [("lazy", lambda: self.boot(label, ref, lazy=True))]
        if self.a.baseline:
            steps.append(("baseline lazy", lambda: self.boot(label, ref, lazy=True,
                                                             regdisk=os.path.abspath(self.a.baseline))))
        if full:
            steps += [("full+boot", lambda: self.boot(label, ref, lazy=False)), ("pull", lambda: self.pull(ref))]
        for i in range(runs):
            order = steps[i % len(steps):] + steps[:i % len(steps)]
            for kind, fn in order:
                r = fn()
                if kind == "lazy":
                    self.add(f"{label}: lazy run, first console line s", r["first line s"])
                    self.add(f"{label}: lazy run, registry bytes before the first line", r["sent"])
                    self.add(f"{label}: lazy run, share of the layer before the first line", r["sent"] / layer)
                    for phase, marker in (("chunk index verified", "filling in the background"),
                                          ("QEMU started", "started (QEMU pid")):
                        at = next((t for t, l in r["stderr"] if marker in l), None)
                        if at is not None:
                            self.add(f"{label}: lazy run, {phase} s", at)
                    self.add(f"{label}: lazy run, fill committed s", r["committed s"])
                    self.add(f"{label}: lazy run, registry bytes until committed", r["sent at commit"])
                    self.add(f"{label}: lazy run, regdisk CPU s until committed", r["regdisk cpu s"])
                    self.add(f"{label}: lazy run, registry CPU s until committed", r["registry cpu s"])
                    self.add(f"{label}: lazy run, registry requests until committed", r["requests until commit"])
                    if label not in self.traces:
                        reqs = r["requests before first line"]
                        self.traces[label] = {
                            "first line s": r["first line s"],
                            "requests before the first line (access log)": len(reqs),
                            "bytes of those requests": sum(b for _, _, b in reqs),
                            "requests": [f"{m} {s} {b}" for m, s, b in reqs][:60],
                            "regdisk -v stderr (s since start)": r["stderr"][:40],
                        }
                    if self.a.compare_every or i == runs - 1:
                        self.compare(raw)
                elif kind == "baseline lazy":
                    self.add(f"{label}: baseline lazy run, first console line s", r["first line s"])
                    for phase, marker in (("chunk index verified", "filling in the background"),
                                          ("QEMU started", "started (QEMU pid")):
                        at = next((t for t, l in r["stderr"] if marker in l), None)
                        if at is not None:
                            self.add(f"{label}: baseline lazy run, {phase} s", at)
                    self.add(f"{label}: baseline lazy run, fill committed s", r["committed s"])
                elif kind == "full+boot":
                    self.add(f"{label}: full pull then boot (--no-lazy), first console line s", r["first line s"])
                else:
                    self.add(f"{label}: regdisk pull (chunked, full) s", r[0])
                    self.add(f"{label}: regdisk pull, registry bytes", r[1])
                    self.add(f"{label}: regdisk pull, regdisk CPU s", r[2])
                    self.add(f"{label}: regdisk pull, registry CPU s", r[3])
                    self.add(f"{label}: regdisk pull, registry requests", r[4])

    def run(self):
        small = self.a.small_mib * MIB
        large = int(self.a.large_gib * GIB) // MIB * MIB
        need = 3 * large + 3 * small + GIB
        free = shutil.disk_usage(self.work).free
        if free < need:
            shutil.rmtree(self.work, ignore_errors=True)
            sys.exit(f"bench: {self.work} has {free / GIB:.1f} GiB free; the images need {need / GIB:.1f} GiB")
        try:
            log(f"work directory {self.work}")
            self.reg = Registry(self.work)
            sraw, sref = self.image("small", small, 1)
            lraw, lref = self.image("large", large, 2)
            if self.a.warmup:
                log("warm-up (not counted)")
                self.boot("small", sref, lazy=True)
                self.pull(sref)
            self.measure("small", sraw, sref, self.a.runs, full=True)
            self.measure("large", lraw, lref, self.a.large_runs, full=True)
            return self.report()
        finally:
            if hasattr(self, "reg"):
                self.reg.stop()
            if not self.a.keep:
                shutil.rmtree(self.work, ignore_errors=True)

    def report(self):
        s = {k: summary(v) for k, v in self.samples.items()}
        med = lambda k: s[k]["median"]
        ratios = {
            "first line: lazy large / lazy small (target <= 1.2)":
                med("large: lazy run, first console line s") / med("small: lazy run, first console line s"),
            "first line: lazy large / full pull then boot large (target <= 0.1)":
                med("large: lazy run, first console line s")
                / med("large: full pull then boot (--no-lazy), first console line s"),
            "bytes before the first line / large layer (target <= 0.02)":
                med("large: lazy run, share of the layer before the first line"),
            "fill committed / regdisk pull, large (target <= 1.2)":
                med("large: lazy run, fill committed s") / med("large: regdisk pull (chunked, full) s"),
            "fill committed / regdisk pull, small":
                med("small: lazy run, fill committed s") / med("small: regdisk pull (chunked, full) s"),
        }
        if self.a.baseline:
            ratios["baseline first line: lazy large / lazy small"] = (
                med("large: baseline lazy run, first console line s") / med("small: baseline lazy run, first console line s"))
        result = {"machine": machine(), "accel": "tcg", "baseline": self.a.baseline, "runs": {"small": self.a.runs, "large": self.a.large_runs},
                  "images": self.images, "timings": s, "ratios": ratios, "before the first line": self.traces}
        os.makedirs(self.a.out, exist_ok=True)
        with open(os.path.join(self.a.out, "lazy-results.json"), "w") as f:
            json.dump(result, f, indent=2)
        print_table(result)
        share = ratios["bytes before the first line / large layer (target <= 0.02)"]
        if self.a.check_first_line_share is not None:
            worst = s["large: lazy run, share of the layer before the first line"]["max"]
            check(worst <= self.a.check_first_line_share,
                  f"registry bytes before the first line: {worst:.3f} of the layer (median {share:.3f}), "
                  f"over the bound {self.a.check_first_line_share}")
        return result


def machine():
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    ver = lambda argv: subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0:1]
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": os.uname().release,
            "qemu": ver(["qemu-system-x86_64", "--version"]), "nbdkit": ver(["nbdkit", "--version"]),
            "date": time.strftime("%Y-%m-%d")}


def print_table(r):
    print(f"\nmachine: {r['machine']}")
    for label, im in r["images"].items():
        print(f"image {label}: {im['virtual bytes'] / MIB:.0f} MiB virtual, layer {im['layer bytes'] / MIB:.1f} MiB")
    print(f"\n| {'measurement (TCG)':75} | median | min | max | runs |")
    print(f"|{'-' * 77}|--------|-----|-----|------|")
    for k, v in r["timings"].items():
        f = ((lambda x: f"{x / MIB:.1f} MiB") if "bytes" in k else
             (lambda x: f"{x:.0f}") if "requests" in k else (lambda x: f"{x:.3f}"))
        print(f"| {k:75} | {f(v['median'])} | {f(v['min'])} | {f(v['max'])} | {len(v['runs'])} |")
    print()
    for k, v in r["ratios"].items():
        print(f"| {k:70} | {v:.3f} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("regdisk")
    ap.add_argument("boot_sector")
    ap.add_argument("--small-mib", type=int, default=64, help="virtual size of the small image")
    ap.add_argument("--large-gib", type=float, default=8.0, help="virtual size of the large image")
    ap.add_argument("--runs", type=int, default=5, help="rounds on the small image")
    ap.add_argument("--large-runs", type=int, default=3, help="rounds on the large image")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the uncounted warm-up round")
    ap.add_argument("--compare-every", action="store_true",
                    help="qemu-img compare after every lazy run (default: after the last of each image)")
    ap.add_argument("--check-first-line-share", type=float,
                    help="fail when the large image's registry bytes before the first line exceed this share "
                         "of its layer in any run")
    ap.add_argument("--deadline", type=float, default=600, help="seconds a run may take before it fails")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--work-parent", default="/var/tmp", help="where the work directory goes (not a tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--baseline", metavar="REGDISK",
                    help="another regdisk binary (an older build) whose lazy run is measured beside each lazy run, "
                         "in the same rounds (its nbdkit plugin must be beside it)")
    a = ap.parse_args()
    try:
        Bench(a).run()
    except CheckFailed as e:
        print(f"bench: check failed: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
