#!/usr/bin/python3
"""regdisk against containerd, side by side, in one run on one machine.

    bench/run.py REGDISK BOOT_SECTOR [--size-gib 2] [--runs 5] [--build-runs 3] [--vms 20] [--out DIR]

(./dev.sh bench builds regdisk and calls this.) It generates a disk, makes
registry disks of it with buildah (gzip, the Dockerfile workflow) and with
`regdisk build --compression zstd`, pushes them to a docker-registry on 127.0.0.1, and
then alternates, run after run:

  floor        curl fetches the disk layer blob to /dev/null
  containerd   `ctr images pull --snapshotter native` into a fresh containerd
  regdisk      `regdisk pull` into a fresh node store (gzip and zstd images)

It also times build+push (buildah bud + push vs regdisk build) and the warm
start of N VMs from one stored disk. Results: a table on stdout and
OUT/results.json. Needs root (containerd, buildah) and the Debian packages
that ./dev.sh deps installs.
"""

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

MIB = 1 << 20


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed(argv, env=None, stdout=subprocess.DEVNULL):
    """Runs argv; returns (seconds, peak RSS in KiB).

    The peak comes from GNU time: a child forked from this (large) Python
    process would report Python's own RSS as its peak.
    """
    with tempfile.NamedTemporaryFile("r") as rss:
        t0 = time.monotonic()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *argv], env=env, stdout=stdout,
                           stderr=subprocess.PIPE)
        dt = time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError(f"{argv[0]} {argv[1:4]} failed ({p.returncode}): "
                               f"{p.stderr.decode(errors='replace')[-2000:]}")
        return dt, int(rss.read().split()[-1])


def used_bytes(path):
    """Bytes the files under path occupy on disk (allocated blocks, holes excluded)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files + dirs:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def wait_http(url, proc, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited early")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except Exception:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer")


class Registry:
    """docker-registry on 127.0.0.1; restart() empties it.

    With access_log, its access log (one line per request) goes to
    self.log_path (bench/chunked.py counts the bytes a pull fetched from it).
    """

    def __init__(self, work, access_log=False):
        self.dir = os.path.join(work, "registry")
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.proc = None
        self.access_log = access_log
        self.log_path = os.path.join(self.dir, "log")

    def restart(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
        os.makedirs(self.dir)
        cfg = os.path.join(self.dir, "config.yml")
        with open(cfg, "w") as f:
            f.write(f"version: 0.1\nlog: {{level: error, accesslog: {{disabled: {str(not self.access_log).lower()}}}}}\n"
                    f"storage: {{filesystem: {{rootdirectory: {self.dir}/data}}}}\n"
                    f"http: {{addr: {self.host}}}\n")
        with open(self.log_path, "w") as logf:
            self.proc = subprocess.Popen(["docker-registry", "serve", cfg],
                                         stdout=logf if self.access_log else subprocess.DEVNULL, stderr=logf)
        wait_http(f"http://{self.host}/v2/", self.proc)

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None

    def manifest(self, repo, tag):
        req = urllib.request.Request(f"http://{self.host}/v2/{repo}/manifests/{tag}", headers={
            "Accept": "application/vnd.oci.image.manifest.v1+json, "
                      "application/vnd.docker.distribution.manifest.v2+json"})
        with urllib.request.urlopen(req) as r:
            return json.load(r)

    def largest_layer(self, repo, tag):
        layer = max(self.manifest(repo, tag)["layers"], key=lambda l: l["size"])
        return layer["digest"], layer["size"]


class Containerd:
    """A containerd of the benchmark's own (root, state and socket in a temp dir)."""

    def __init__(self, work):
        self.dir = tempfile.mkdtemp(prefix="rdb-ctd-", dir="/tmp")  # short: socket paths are limited
        self.sock = os.path.join(self.dir, "s", "c.sock")
        self.root = os.path.join(self.dir, "root")
        self.proc = None

    def fresh(self):
        self.stop()
        for d in ("root", "s"):
            shutil.rmtree(os.path.join(self.dir, d), ignore_errors=True)
        cfg = os.path.join(self.dir, "config.toml")
        with open(cfg, "w") as f:
            f.write(f'version = 2\nroot = "{self.root}"\nstate = "{self.dir}/s"\n'
                    'disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",'
                    ' "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",'
                    ' "io.containerd.snapshotter.v1.aufs", "io.containerd.internal.v1.opt"]\n'
                    f'[grpc]\n  address = "{self.sock}"\n[ttrpc]\n  address = "{self.sock}.ttrpc"\n')
        self.proc = subprocess.Popen(["containerd", "--config", cfg], stdout=subprocess.DEVNULL,
                                     stderr=open(os.path.join(self.dir, "log"), "a"))
        deadline = time.monotonic() + 30
        while subprocess.run(["ctr", "--address", self.sock, "version"], capture_output=True).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("containerd did not start; see " + os.path.join(self.dir, "log"))
            time.sleep(0.1)

    def peak_rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return 0

    def stop(self):
        if self.proc:
            self.proc.terminate()
            self.proc.wait()
            self.proc = None

    def close(self):
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def make_disk(work, size, boot_sector):
    """A bootable raw disk of `size` virtual bytes and its qcow2 twin.

    Layout: the boot sector (it prints sector 1 and halts), then system files
    from /usr packed 4 KiB aligned (3/8 of the size), a hole, incompressible
    data (3/16), and zeros to the end (written zeros and a hole).
    """
    raw = os.path.join(work, "disk.raw")
    with open(raw, "wb") as f:
        with open(boot_sector, "rb") as b:
            f.write(b.read())
        f.seek(512)
        f.write(b"REGDISK-BENCH-DISK".ljust(512, b"\0"))
        f.write(b"HALT".ljust(512, b"\0"))  # sector 2: the guest halts (stays up)
        pos, limit = MIB, MIB + size * 3 // 8
        f.seek(pos)
        for top in ("/usr/lib", "/usr/share", "/usr/bin"):
            for root, dirs, files in os.walk(top):
                dirs.sort()
                for name in sorted(files):
                    p = os.path.join(root, name)
                    if pos >= limit or os.path.islink(p) or not os.path.isfile(p):
                        continue
                    try:
                        data = open(p, "rb").read(limit - pos)
                    except OSError:
                        continue
                    f.write(data)
                    pos += len(data)
                    pad = -pos % 4096
                    f.write(b"\0" * pad)
                    pos += pad
        rng = random.Random(42)
        f.seek(size // 2)
        for _ in range(size * 3 // 16 // (16 * MIB)):
            f.write(rng.randbytes(16 * MIB))
        f.write(b"\0" * (size // 16))  # explicit zeros
        f.truncate(size)
    qcow2 = os.path.join(work, "disk.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, qcow2], check=True)
    return raw, qcow2


def summary(xs):
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": xs}


class Bench:
    def __init__(self, args):
        self.a = args
        self.regdisk = os.path.abspath(args.regdisk)
        self.work = tempfile.mkdtemp(prefix="regdisk-bench.", dir=args.work_parent)
        self.reg = Registry(self.work)
        self.ctd = Containerd(self.work)
        self.samples = {}  # name -> list of seconds
        self.micro_results = None
        self.extra = {}  # name -> dict of other figures

    def rd(self, *argv, root=None):
        return [self.regdisk, "--root", root or os.path.join(self.work, "store"), "--tls-verify=false", *argv]

    def add(self, name, seconds, **extra):
        self.samples.setdefault(name, []).append(seconds)
        for k, v in extra.items():
            self.extra.setdefault(name, {}).setdefault(k, []).append(v)
        log(f"{name}: {seconds:.2f} s {extra if extra else ''}")

    def buildah(self, *argv):
        b = os.path.join(self.work, "buildah")
        return ["buildah", "--root", b + "/root", "--runroot", b + "/run", "--storage-driver", "vfs", *argv]

    def push_base(self):
        subprocess.run(self.rd("base", "-t", f"docker://{self.reg.host}/bench/base:latest"), check=True,
                       stdout=subprocess.DEVNULL)

    def build_buildah(self, disk, repo):
        ctx = os.path.join(self.work, "ctx-" + repo.replace("/", "-"))
        os.makedirs(ctx, exist_ok=True)
        target = os.path.join(ctx, os.path.basename(disk))
        if not os.path.exists(target):
            os.link(disk, target)
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write(f"FROM {self.reg.host}/bench/base:latest\nADD {os.path.basename(disk)} /disk\n")
        shutil.rmtree(os.path.join(self.work, "buildah"), ignore_errors=True)
        env = dict(os.environ, BUILDAH_ISOLATION="chroot", STORAGE_DRIVER="vfs")
        ref = f"{self.reg.host}/{repo}:latest"
        t1, _ = timed(self.buildah("bud", "--tls-verify=false", "-q", "-t", ref, ctx), env=env)
        t2, _ = timed(self.buildah("push", "--tls-verify=false", "-q", ref, "docker://" + ref), env=env)
        shutil.rmtree(os.path.join(self.work, "buildah"), ignore_errors=True)
        return t1 + t2

    def build_regdisk(self, disk, repo, *flags):
        t, rss = timed(self.rd("build", disk, "-t", f"docker://{self.reg.host}/{repo}:latest", *flags))
        return t, rss

    def builds(self, qcow2, raw):
        for i in range(self.a.build_runs):
            # A registry without the disk each time, so neither tool skips an upload.
            for name in (["buildah", "regdisk-zstd", "regdisk-gzip"] if i % 2 == 0 else
                         ["regdisk-gzip", "regdisk-zstd", "buildah"]):
                self.reg.restart()
                self.push_base()
                subprocess.run(["sync"])
                if name == "buildah":
                    self.add("build+push buildah (gzip)", self.build_buildah(qcow2, "bench/qcow2-gzip"))
                else:
                    comp = name.split("-")[1]
                    t, rss = self.build_regdisk(qcow2, f"bench/qcow2-{comp}", "--compression", comp)
                    self.add(f"build+push regdisk ({comp})", t, peak_rss_mib=rss / 1024)
        # The images the pulls read.
        self.reg.restart()
        self.push_base()
        log("making the images the pulls read")
        self.build_buildah(qcow2, "bench/qcow2-gzip")
        self.build_regdisk(qcow2, "bench/qcow2-zstd", "--compression", "zstd")
        if self.a.raw:
            self.build_buildah(raw, "bench/raw-gzip")
            self.build_regdisk(raw, "bench/raw-zstd", "--compression", "zstd")

    def pull_regdisk(self, repo):
        store = os.path.join(self.work, "store")
        shutil.rmtree(store, ignore_errors=True)
        subprocess.run(["sync"])
        t, rss = timed(self.rd("pull", f"docker://{self.reg.host}/{repo}:latest"))
        self.check_disk_in(os.path.join(store, "disks"), repo, "regdisk's store")
        return t, rss, used_bytes(store)

    def pull_containerd(self, repo):
        self.ctd.fresh()
        subprocess.run(["sync"])
        t, _ = timed(["ctr", "--address", self.ctd.sock, "-n", "bench", "images", "pull", "--plain-http",
                      "--snapshotter", "native", f"{self.reg.host}/{repo}:latest"])
        snapshots = os.path.join(self.ctd.root, "io.containerd.snapshotter.v1.native", "snapshots")
        self.check_disk_in(snapshots, repo, "containerd's snapshots")
        result = t, self.ctd.peak_rss_kib(), used_bytes(self.ctd.root)
        self.ctd.stop()  # its background work (GC) must not run into the next measurement
        return result

    def check_disk_in(self, top, repo, what):
        """The pull left the whole disk on disk (unpacked, not only fetched)."""
        want = os.path.getsize(os.path.join(self.work, "disk." + repo.split("/")[1].split("-")[0]))
        for root, _, files in os.walk(top):
            if any(os.path.getsize(os.path.join(root, n)) == want for n in files if n != "meta.json"):
                return
        raise RuntimeError(f"{what} hold no {want}-byte disk after pulling {repo}")

    def fetch_floor(self, repo):
        digest, _ = self.reg.largest_layer(repo, "latest")
        t, _ = timed(["curl", "-sSf", "-o", "/dev/null", f"http://{self.reg.host}/v2/{repo}/blobs/{digest}"])
        return t

    def blob_file(self, repo):
        digest, _ = self.reg.largest_layer(repo, "latest")
        algo, hexd = digest.split(":")
        return os.path.join(self.reg.dir, "data/docker/registry/v2/blobs", algo, hexd[:2], hexd, "data")

    def profile(self):
        """The single-core cost of each step of a pull, on the same blobs (read from the page cache)."""
        gz, zs = self.blob_file("bench/qcow2-gzip"), self.blob_file("bench/qcow2-zstd")
        steps = [
            ("step: SHA-256 of the gzip blob (openssl)", ["openssl", "dgst", "-sha256", gz]),
            ("step: inflate the gzip blob (igzip -dc)", ["sh", "-c", 'exec igzip -dc < "$0" > /dev/null', gz]),
            ("step: inflate the gzip blob (zlib: gzip -dc)", ["sh", "-c", 'exec gzip -dc < "$0" > /dev/null', gz]),
            ("step: decompress the zstd blob (zstd -dc)", ["sh", "-c", 'exec zstd -qdc < "$0" > /dev/null', zs]),
        ]
        for i in range(3):
            for name, argv in steps:
                self.add(name, timed(argv)[0])

    def pulls(self, disk_bytes):
        variants = ["qcow2"] + (["raw"] if self.a.raw else [])
        steps = []
        for v in variants:
            steps += [
                (f"fetch floor ({v}, gzip blob)", lambda v=v: (self.fetch_floor(f"bench/{v}-gzip"),)),
                (f"fetch floor ({v}, zstd blob)", lambda v=v: (self.fetch_floor(f"bench/{v}-zstd"),)),
                (f"pull containerd ({v}, gzip)", lambda v=v: self.pull_containerd(f"bench/{v}-gzip")),
                (f"pull regdisk ({v}, gzip)", lambda v=v: self.pull_regdisk(f"bench/{v}-gzip")),
                (f"pull regdisk ({v}, zstd)", lambda v=v: self.pull_regdisk(f"bench/{v}-zstd")),
            ]
        log("warm-up round (not counted)")
        for _, fn in steps:
            fn()
        for i in range(self.a.runs):
            order = steps[i % len(steps):] + steps[:i % len(steps)]  # rotate, so no one always goes first
            for name, fn in order:
                r = fn()
                if len(r) == 1:
                    self.add(name, r[0])
                else:
                    v = name.split("(")[1].split(",")[0]
                    self.add(name, r[0], peak_rss_mib=r[1] / 1024, disk_usage_ratio=r[2] / disk_bytes[v])
        self.ctd.stop()

    def warm_start(self, accel):
        """N VMs at once from the disk the last pull stored."""
        store = os.path.join(self.work, "store")
        subprocess.run(self.rd("pull", f"docker://{self.reg.host}/bench/qcow2-gzip:latest"), check=True,
                       stdout=subprocess.DEVNULL)
        procs, booted, created = [], {}, {}
        t0 = time.monotonic()
        for i in range(self.a.vms):
            spec = os.path.join(self.work, f"vm{i}.yaml")
            with open(spec, "w") as f:
                f.write(f"apiVersion: kubevirt.io/v1alpha1\nkind: VirtualMachine\nmetadata: {{name: bench-{i}}}\n"
                        "spec:\n  domain:\n    resources: {requests: {memory: 64Mi}}\n"
                        "    devices: {disks: [{name: d, volumeName: v, disk: {dev: vda}}]}\n"
                        f"  volumes: [{{name: v, registryDisk: {{image: {self.reg.host}/bench/qcow2-gzip:latest}}}}]\n")
            p = subprocess.Popen(self.rd("-v", "run", "-f", spec, "--timeout", "300", "--grace", "2", "--accel", accel),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(p)

            def watch(i=i, p=p):
                for line in p.stdout:
                    if b"REGDISK-GUEST-BOOTED" in line and i not in booted:
                        booted[i] = time.monotonic() - t0

            def watch_err(i=i, p=p):
                for line in p.stderr:
                    if b"ephemeral disk" in line and b" ms" in line:
                        created.setdefault(i, float(line.split(b" in ")[-1].split(b" ms")[0]))

            threading.Thread(target=watch, daemon=True).start()
            threading.Thread(target=watch_err, daemon=True).start()
        deadline = time.monotonic() + 300
        while len(booted) < self.a.vms and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise RuntimeError("a VM exited before booting")
            time.sleep(0.05)
        all_booted = time.monotonic() - t0
        time.sleep(1)  # let every VM settle before measuring
        overlay = used_bytes(os.path.join(store, "run"))
        def pss(pid):
            for line in open(f"/proc/{pid}/smaps_rollup"):
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
            return 0

        qemu_pss = 0
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read()
                if b"qemu-system" in cmd and store.encode() in cmd:
                    qemu_pss += pss(pid)
            except OSError:
                pass
        sup_pss = sum(pss(p.pid) for p in procs)
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait()
        n = self.a.vms
        self.extra[f"warm start ({accel})"] = {
            "vms": n,
            "all booted s": all_booted,
            "ephemeral disk create ms (median)": statistics.median(created.values()) if created else None,
            "ephemeral disk create ms (max)": max(created.values()) if created else None,
            "disk bytes per VM (overlay after the guest writes, logs)": overlay / n,
            "QEMU PSS MiB per VM": qemu_pss / n / MIB,
            "regdisk supervisor PSS MiB per VM": sup_pss / n / MIB,
        }
        log(f"warm start ({accel}): {self.extra[f'warm start ({accel})']}")

    def check_bootable(self, qcow2):
        """What regdisk stored from each image equals the original disk (outside the timed runs)."""
        store = os.path.join(self.work, "store")
        for repo in ("bench/qcow2-gzip", "bench/qcow2-zstd"):
            shutil.rmtree(store, ignore_errors=True)
            subprocess.run(self.rd("pull", f"docker://{self.reg.host}/{repo}:latest"), capture_output=True, check=True)
            out = subprocess.run(self.rd("images", "-o", "json"), capture_output=True, check=True)
            stored = json.loads(out.stdout)[0]["disk"]["file"]
            subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2", qcow2, stored], check=True)

    def micro(self):
        """The Google Benchmark micro-benchmarks, beside their anchors."""
        if not self.a.micro:
            return None
        out = subprocess.run([self.a.micro, "--benchmark_format=json",
                              f"--benchmark_min_time={self.a.micro_min_time}"],
                             capture_output=True, check=True, text=True)
        results = {}
        for b in json.loads(out.stdout)["benchmarks"]:
            results[b["name"]] = {"real_time": b["real_time"], "cpu_time": b["cpu_time"], "unit": b["time_unit"],
                                  "bytes_per_second": b.get("bytes_per_second")}
            log(f"micro: {b['name']}: {b['real_time']:.1f} {b['time_unit']}")
        return results

    def run(self):
        try:
            log(f"work directory {self.work}")
            size = int(self.a.size_gib * (1 << 30)) // MIB * MIB
            raw, qcow2 = make_disk(self.work, size, self.a.boot_sector)
            disk_bytes = {"qcow2": os.path.getsize(qcow2), "raw": size}
            log(f"disk: {size / MIB:.0f} MiB virtual, qcow2 file {disk_bytes['qcow2'] / MIB:.0f} MiB")
            self.reg.restart()
            self.builds(qcow2, raw)
            self.pulls(disk_bytes)
            self.profile()
            self.check_bootable(qcow2)
            self.micro_results = self.micro()
            if self.a.vms > 0:
                for accel in (["kvm"] if os.access("/dev/kvm", os.R_OK | os.W_OK) else []) + ["tcg"]:
                    self.warm_start(accel)
            return self.report(size, disk_bytes)
        finally:
            self.reg.stop()
            self.ctd.close()
            if not self.a.keep:
                shutil.rmtree(self.work, ignore_errors=True)

    def report(self, size, disk_bytes):
        s = {k: summary(v) for k, v in self.samples.items()}
        for k, extra in self.extra.items():
            if k in s:
                s[k].update({f"{e} (median)": statistics.median(vals) for e, vals in extra.items()})
        ratios = compute_ratios(s)
        result = {
            "machine": machine(),
            "disk": {"virtual bytes": size, "qcow2 bytes": disk_bytes["qcow2"],
                     "gzip layer bytes": self.reg.largest_layer("bench/qcow2-gzip", "latest")[1],
                     "zstd layer bytes": self.reg.largest_layer("bench/qcow2-zstd", "latest")[1]},
            "timings": s,
            "ratios": ratios,
            "warm start": {k: v for k, v in self.extra.items() if k.startswith("warm start")},
            "micro": self.micro_results,
        }
        if self.micro_results:
            ratios.update(micro_ratios(self.micro_results))
        os.makedirs(self.a.out, exist_ok=True)
        with open(os.path.join(self.a.out, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
        print_table(result)
        plot(result, os.path.join(self.a.out, "ratios.png"))
        return result


def machine():
    cpu = ""
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = open("/proc/meminfo").readline().split()[1]
    ver = lambda argv: subprocess.run(argv, capture_output=True, text=True).stdout.splitlines()[0:1]
    return {"cpu": cpu, "cores": os.cpu_count(), "memory GiB": round(int(mem) / (1 << 20)),
            "kernel": platform.release(), "containerd": ver(["containerd", "--version"]),
            "buildah": ver(["buildah", "--version"]), "date": time.strftime("%Y-%m-%d")}


def compute_ratios(s):
    """Ratios of the medians in `s` (timings by name) to their anchors."""
    med = lambda k: s[k]["median"] if k in s else None
    ratios = {}
    for v in ("qcow2", "raw"):
        c, g, z = med(f"pull containerd ({v}, gzip)"), med(f"pull regdisk ({v}, gzip)"), med(f"pull regdisk ({v}, zstd)")
        if not (c and g and z):
            continue
        ratios[f"pull {v} gzip: regdisk / containerd (target <= 0.25)"] = g / c
        ratios[f"pull {v} gzip: regdisk / fetch floor (target <= 1.5)"] = g / med(f"fetch floor ({v}, gzip blob)")
        ratios[f"pull {v}: regdisk zstd / containerd"] = z / c
        ratios[f"pull {v} zstd: regdisk / fetch floor"] = z / med(f"fetch floor ({v}, zstd blob)")
    # How close a pull comes to the cost of decompressing alone, on one core.
    inflate, unzstd = med("step: inflate the gzip blob (igzip -dc)"), med("step: decompress the zstd blob (zstd -dc)")
    if inflate and unzstd and med("pull regdisk (qcow2, gzip)"):
        ratios["pull qcow2 gzip: regdisk / igzip -dc alone"] = med("pull regdisk (qcow2, gzip)") / inflate
        ratios["pull qcow2 zstd: regdisk / zstd -dc alone"] = med("pull regdisk (qcow2, zstd)") / unzstd
    b = med("build+push buildah (gzip)")
    for comp in ("zstd", "gzip") if b else ():
        ratios[f"build+push: regdisk {comp} / buildah (target <= 0.3)"] = med(f"build+push regdisk ({comp})") / b
    return ratios


def micro_ratios(m):
    ours, anchor = m.get("BM_CreateOverlay"), m.get("BM_QemuImgCreate")
    if not ours or not anchor:
        return {}
    return {"ephemeral disk: regdisk CreateOverlay / qemu-img create": ours["real_time"] / anchor["real_time"]}


def plot(r, path):
    """A bar chart of the ratios against their targets, when matplotlib is there."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no plot: apt-get install python3-matplotlib for one")
        return
    items = list(r["ratios"].items())
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(items) + 1.2))
    names = [k.replace(" (target", "\n(target") for k, _ in items]
    values = [v for _, v in items]
    colors = []
    for k, v in items:
        target = float(k.split("<= ")[1].rstrip(")")) if "<=" in k else None
        colors.append("tab:gray" if target is None else ("tab:green" if v <= target else "tab:red"))
    ax.barh(names, values, color=colors)
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.2f}" if v >= 0.01 else f" {v:.1e}", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.set_xlabel("ratio (log scale; green: target met, red: missed, gray: no target)")
    ax.set_title(f"regdisk vs anchors, {r['machine']['cores']} cores, {r['disk']['virtual bytes'] >> 30} GiB disk")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot: {path}")


def print_table(r):
    print(f"\nmachine: {r['machine']}")
    d = r["disk"]
    print(f"disk: {d['virtual bytes'] / MIB:.0f} MiB virtual, qcow2 {d['qcow2 bytes'] / MIB:.0f} MiB, "
          f"gzip layer {d['gzip layer bytes'] / MIB:.0f} MiB, zstd layer {d['zstd layer bytes'] / MIB:.0f} MiB\n")
    print(f"| {'measurement':50} | median s | min s | max s | peak RSS MiB | disk use / disk |")
    print(f"|{'-' * 52}|----------|-------|-------|--------------|-----------------|")
    for k, v in r["timings"].items():
        rss = v.get("peak_rss_mib (median)")
        use = v.get("disk_usage_ratio (median)")
        print(f"| {k:50} | {v['median']:8.2f} | {v['min']:5.2f} | {v['max']:5.2f} | "
              f"{'' if rss is None else f'{rss:.0f}':>12} | {'' if use is None else f'{use:.2f}':>15} |")
    print()
    for k, v in r["ratios"].items():
        print(f"| {k:60} | {v:5.2f} |" if v >= 0.01 else f"| {k:60} | {v:.1e} |")
    for k, v in (r.get("micro") or {}).items():
        bps = f", {v['bytes_per_second'] / 1e9:.2f} GB/s" if v.get("bytes_per_second") else ""
        print(f"| micro: {k:43} | {v['real_time']:.1f} {v['unit']}{bps} |")
    for name, figures in r["warm start"].items():
        print()
        for k, v in figures.items():
            print(f"| {name}: {k:40} | {v if v is None or isinstance(v, int) else round(v, 3)} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("regdisk", nargs="?")
    ap.add_argument("boot_sector", nargs="?")
    ap.add_argument("--size-gib", type=float, default=2.0, help="virtual size of the generated disk")
    ap.add_argument("--runs", type=int, default=5, help="pull runs of each kind")
    ap.add_argument("--build-runs", type=int, default=3)
    ap.add_argument("--vms", type=int, default=20, help="VMs started at once for the warm start (0: skip)")
    ap.add_argument("--raw", action="store_true", help="also pull a raw variant of the disk")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--work-parent", default="/var/tmp", help="where the work directory goes (not a tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--micro", help="the regdisk_micro binary (Google Benchmark) to run as well")
    ap.add_argument("--micro-min-time", type=float, default=0.5, help="seconds per micro-benchmark")
    ap.add_argument("--replot", metavar="RESULTS_JSON", help="only redraw the table and plot of saved results")
    a = ap.parse_args()
    if a.replot:
        with open(a.replot) as f:
            r = json.load(f)
        r["ratios"] = compute_ratios(r["timings"])
        if r.get("micro"):
            r["ratios"].update(micro_ratios(r["micro"]))
        with open(a.replot, "w") as f:
            json.dump(r, f, indent=2)
        print_table(r)
        plot(r, os.path.join(os.path.dirname(a.replot) or ".", "ratios.png"))
        return
    if not a.regdisk or not a.boot_sector:
        ap.error("give the regdisk binary and the guest boot sector (./dev.sh bench does)")
    if os.geteuid() != 0:
        print("bench: run as root (containerd and buildah need it)", file=sys.stderr)
        sys.exit(77)
    Bench(a).run()


if __name__ == "__main__":
    main()
