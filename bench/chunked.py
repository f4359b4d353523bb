#!/usr/bin/python3
"""Chunked disk layers (issue 14), measured in one run on one machine.

    bench/chunked.py REGDISK BOOT_SECTOR [--size-gib 2] [--runs 3] [--build-runs 2]
                     [--chunk-sizes 64K,256K,1M,4M] [--ext4-mb 500] [--out DIR]

On the disk bench/run.py builds (make_disk), and on an ext4 image of real
files, for every chunk size:

  full pull    `regdisk pull` of the chunked image against regdisk's
               single-stream zstd pull of the same disk, containerd's pull of
               the chunked image (ctr, native snapshotter), and the machine
               floor: the larger of (SHA-256 + zstd -dc CPU-seconds of the
               blob) / cores and `dd conv=fsync` of the disk's allocated bytes
  delta        v2 of the disk (1% of its chunks rewritten; 1% of its bytes
               rewritten as 64 KiB extents at random offsets; an ext4 image
               with ~1% of its file bytes replaced through debugfs) pulled
               with v1 in the store: bytes fetched (the registry's access
               log) against the frames v2 has and v1 lacks, plus the index
  node disk    allocated bytes of the store after a chunked pull / qcow2 size
  end to end   build + push + pull, chunked against zstd single stream

Every input is generated from fixed seeds. The script checks what it can
check at any size and exits 1 when a check fails (after writing the
results): every pulled disk equals its source (qemu-img compare), and a
delta pull fetches at most 1.2 x what the indexes say it must. Results: a
table on stdout and OUT/chunked-results.json. containerd needs root; without
root its pulls are skipped.
"""

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as common  # noqa: E402  (bench/run.py: registry, containerd, the disk)

MIB = common.MIB
KIB = 1 << 10
SEED = 14  # every random choice below derives from it

# The bounds (docs/benchmarks.md, "Chunked layers").
DELTA_BYTES_BOUND = 1.2      # fetched <= 1.2 x (changed frames + index + tar header frame); checked
PULL_VS_ZSTD_TARGET = 0.6    # full pull <= 0.6 x regdisk's single-stream zstd pull ...
PULL_VS_FLOOR_TARGET = 1.2   # ... or <= 1.2 x the machine floor
CHUNK_DELTA_OF_DISK = 0.03   # 1%-of-chunks delta: at most 3% of the disk
EXT4_DELTA_OF_USED = 0.05    # ext4 update: at most 5% of the image's used data
NODE_DISK_TARGET = 1.0       # raw disk with holes <= 1.0 x the qcow2


def log(msg):
    common.log(msg)


def size_name(n):
    return f"{n // MIB}M" if n >= MIB else f"{n // KIB}K"


def parse_size(text):
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = {"K": KIB, "M": MIB}.get(t[-1:], 1)
    return int(t[:-1] if t[-1:] in "KM" else t) * mult


def cpu_timed(argv):
    """Runs argv (no shell); returns (wall seconds, CPU seconds of it and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def allocated(path):
    return os.stat(path).st_blocks * 512


def sparse_copy(src, dst):
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)


# --- the chunk index (docs/chunked-format.md, "The chunk index") -------------

def read_index(blob_path, annotations):
    """The layer's chunk index: {chunk_size, disk_size, header_frame, length, chunks: [(offset, len, zero, sha)]}."""
    off = int(annotations["io.regdisk.chunked.index.offset"])
    length = int(annotations["io.regdisk.chunked.index.length"])
    with open(blob_path, "rb") as f:
        f.seek(off)
        raw = f.read(length)
    if "sha256:" + hashlib.sha256(raw).hexdigest() != annotations["io.regdisk.chunked.index.digest"]:
        raise RuntimeError("chunk index does not match its annotated digest")
    magic, size = struct.unpack_from("<II", raw, 0)
    p = raw[8:]
    if magic != 0x184D2A5B or size != len(p) or p[:4] != b"RDCI":
        raise RuntimeError("not a chunk index")
    _, shift, _, disk, _, n = struct.unpack_from("<HBBQQQ", p, 4)
    chunks = []
    for k in range(n):
        foff, flen, flags = struct.unpack_from("<QII", p, 32 + 48 * k)
        sha = p[32 + 48 * k + 16:32 + 48 * k + 48]
        chunks.append((foff, flen, bool(flags & 1), sha))
    return {"chunk_size": 1 << shift, "disk_size": disk, "length": length,
            "header_frame": chunks[0][0] if chunks else 0, "chunks": chunks}


def delta_expectation(v1, v2):
    """What a pull of v2 must fetch with v1 in the store: the frames of v2's
    non-zero chunks whose digest v1 lacks, the index and the tar header frame.
    Returns (changed chunks, their compressed bytes, bytes expected)."""
    have = {c[3] for c in v1["chunks"] if not c[2]}
    changed = [c for c in v2["chunks"] if not c[2] and c[3] not in have]
    frames = sum(c[1] for c in changed)
    return len(changed), frames, frames + v2["length"] + v2["header_frame"]


# --- the inputs -------------------------------------------------------------

def rewrite_chunks(v1_raw, out, chunk, fraction, seed):
    """v2: `fraction` of the disk's chunks (at least one), spread over the
    disk by a seeded sample, overwritten with new seeded random bytes."""
    size = os.path.getsize(v1_raw)
    n = -(-size // chunk)
    rng = random.Random(seed)
    picks = sorted(rng.sample(range(n), max(1, round(n * fraction))))
    sparse_copy(v1_raw, out)
    with open(out, "r+b") as f:
        for k in picks:
            f.seek(k * chunk)
            f.write(rng.randbytes(min(chunk, size - k * chunk)))
    return len(picks)


def rewrite_scattered(v1_raw, out, fraction, seed, extent=64 * KIB):
    """v2: `fraction` of the disk's bytes rewritten as `extent`-byte runs of
    new random data at seeded random 4 KiB-aligned offsets."""
    size = os.path.getsize(v1_raw)
    rng = random.Random(seed)
    count = max(1, round(size * fraction / extent))
    sparse_copy(v1_raw, out)
    with open(out, "r+b") as f:
        for _ in range(count):
            f.seek(rng.randrange(0, (size - extent) // 4096 + 1) * 4096)
            f.write(rng.randbytes(extent))
    return count


def stage_files(dest, budget):
    """Copies regular files from /usr (sorted walk) under dest until `budget`
    bytes; returns [(relative path, size)]. Times are fixed (deterministic)."""
    files, total = [], 0
    for top in ("/usr/lib", "/usr/share", "/usr/bin"):
        for root, dirs, names in os.walk(top):
            dirs.sort()
            for name in sorted(names):
                if total >= budget:
                    break
                p = os.path.join(root, name)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                rel = os.path.relpath(p, "/")
                try:
                    os.makedirs(os.path.join(dest, os.path.dirname(rel)), exist_ok=True)
                    shutil.copyfile(p, os.path.join(dest, rel))
                except OSError:
                    continue
                sz = os.path.getsize(p)
                files.append((rel, sz))
                total += sz
    for root, dirs, names in os.walk(dest):
        for name in dirs + names:
            os.utime(os.path.join(root, name), (1700000000, 1700000000))
    return files


def ext4_used(img):
    out = subprocess.run(["dumpe2fs", "-h", img], capture_output=True, text=True, check=True).stdout
    f = {k.strip(): v.strip() for k, _, v in (l.partition(":") for l in out.splitlines())}
    return (int(f["Block count"]) - int(f["Free blocks"])) * int(f["Block size"])


def make_ext4(work, size, file_bytes, fraction, seed):
    """v1: `mkfs.ext4 -d` of `file_bytes` of /usr files on a `size`-byte
    image; v2: ~`fraction` of the file bytes replaced by new files of the
    same sizes through `debugfs -w` (ext4 allocates them). Both e2fsck-clean."""
    stage = os.path.join(work, "ext4-files")
    files = stage_files(stage, file_bytes)
    v1 = os.path.join(work, "ext4-v1.raw")
    with open(v1, "wb") as f:
        f.truncate(size)
    uuid = "6b1f0e6c-1e0a-4f4e-9a43-000000000014"
    env = dict(os.environ, E2FSPROGS_FAKE_TIME="1700000000")
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", uuid, "-E", f"hash_seed={uuid},root_owner=0:0", "-d", stage, v1],
                   check=True, env=env)
    shutil.rmtree(stage)
    rng = random.Random(seed)
    total = sum(s for _, s in files)
    pool = [(r, s) for r, s in files if 0 < s <= MIB and all(c.isalnum() or c in "._-+/" for c in r)]
    rng.shuffle(pool)
    picked, moved = [], 0
    for r, s in pool:
        if moved >= total * fraction:
            break
        picked.append((r, s))
        moved += s
    v2 = os.path.join(work, "ext4-v2.raw")
    sparse_copy(v1, v2)
    newdir = os.path.join(work, "ext4-new")
    os.makedirs(newdir)
    cmds = []
    for i, (r, s) in enumerate(picked):
        local = os.path.join(newdir, str(i))
        with open(local, "wb") as f:
            f.write(rng.randbytes(s))
        d, name = os.path.split("/" + r)
        cmds += [f"cd {d}", f"rm {name}", f"write {local} {name}"]
    script = os.path.join(work, "ext4-v2.debugfs")
    with open(script, "w") as f:
        f.write("\n".join(cmds) + "\n")
    out = subprocess.run(["debugfs", "-w", "-f", script, v2], capture_output=True, text=True, env=env)
    shutil.rmtree(newdir)
    bad = [l for l in (out.stdout + out.stderr).splitlines() if not l.startswith("debugfs") and
           ("not found" in l or "rror" in l or "Couldn't" in l or "annot" in l)]
    if out.returncode != 0 or bad:
        raise RuntimeError(f"debugfs: {bad[:3]}")
    for img in (v1, v2):
        subprocess.run(["e2fsck", "-fn", img], check=True, capture_output=True)
    return v1, v2, {"files": len(files), "file bytes": total, "replaced files": len(picked),
                    "replaced bytes": moved, "replaced fraction of file bytes": moved / total,
                    "used bytes (v1)": ext4_used(v1), "allocated bytes of the image file (v1)": allocated(v1)}


# --- the benchmark ----------------------------------------------------------

class ChunkedBench(common.Bench):
    def __init__(self, args):
        super().__init__(args)
        self.reg = common.Registry(self.work, access_log=True)
        self.sizes = [parse_size(s) for s in args.chunk_sizes.split(",")]
        ctd = args.containerd_chunk_sizes
        self.ctd_sizes = [] if ctd == "none" else [parse_size(s) for s in ctd.split(",")] if ctd else self.sizes
        self.containerd = os.geteuid() == 0 and args.containerd_chunk_sizes != "none"
        self.failures = []
        self.fig = {}  # figures other than timings

    def check(self, ok, what):
        if not ok:
            self.failures.append(what)
            log("CHECK FAILED: " + what)

    def ref(self, repo):
        return f"docker://{self.reg.host}/{repo.lower()}:latest"  # repository names are lowercase

    def layer(self, repo):
        layer = max(self.reg.manifest(repo.lower(), "latest")["layers"], key=lambda l: l["size"])
        algo, hexd = layer["digest"].split(":")
        path = os.path.join(self.reg.dir, "data/docker/registry/v2/blobs", algo, hexd[:2], hexd, "data")
        return layer, path

    def index(self, repo):
        layer, path = self.layer(repo)
        return read_index(path, layer.get("annotations", {}))

    def log_mark(self):
        return os.path.getsize(self.reg.log_path)

    def fetched(self, mark, repo):
        """Bytes the registry sent of repo's disk layer since `mark`, and the
        number of requests for it (access log: "GET /v2/...blobs/D" STATUS BYTES)."""
        time.sleep(0.1)  # the registry writes its line after the response
        digest = self.layer(repo)[0]["digest"]
        with open(self.reg.log_path, "rb") as f:
            f.seek(mark)
            text = f.read().decode(errors="replace")
        total = requests = 0
        for line in text.splitlines():
            at = line.find('"GET /v2/')
            if at < 0 or f"/blobs/{digest} " not in line:
                continue
            rest = line[line.index('"', at + 1) + 1:].split()
            if len(rest) >= 2 and rest[0] in ("200", "206") and rest[1].isdigit():
                total += int(rest[1])
                requests += 1
        return total, requests

    def stored_disk(self, store, repo):
        out = subprocess.run(self.rd("images", "-o", "json", root=store), capture_output=True, check=True)
        for img in json.loads(out.stdout):
            if img["name"].endswith(f"/{repo.lower()}:latest"):
                return img["disk"]["file"]
        raise RuntimeError(f"{repo} is not in the store {store}")

    def same_disk(self, source, stored, what):
        fmt = "qcow2" if source.endswith(".qcow2") else "raw"
        r = subprocess.run(["qemu-img", "compare", "-q", "-f", fmt, "-F", "raw", source, stored], capture_output=True)
        self.check(r.returncode == 0, f"{what}: the pulled disk differs from its source")

    def build(self, disk, repo, *flags):
        t, rss = common.timed(self.rd("build", disk, "-t", self.ref(repo), "-q", *flags))
        return t, rss

    def chunked_flags(self, size):
        return ("--layout", "chunked", "--chunk-size", size_name(size))

    # -- pulls

    def pull(self, repo, store, fresh=True, verify_against=None):
        if fresh:
            shutil.rmtree(store, ignore_errors=True)
        subprocess.run(["sync"])
        mark = self.log_mark()
        t, rss = common.timed(self.rd("pull", self.ref(repo), root=store))
        got, reqs = self.fetched(mark, repo)
        if verify_against:
            self.same_disk(verify_against, self.stored_disk(store, repo), repo)
        return t, rss, got, reqs

    def dd_floor(self, nbytes):
        out = os.path.join(self.work, "dd.out")
        subprocess.run(["sync"])
        t, _ = common.timed(["dd", "if=/dev/zero", f"of={out}", "bs=1M", f"count={-(-nbytes // MIB)}",
                             "conv=fsync", "status=none"])
        os.unlink(out)
        return t

    def full_pulls(self, raw, qcow2):
        store = os.path.join(self.work, "store")
        alloc = allocated(raw)
        self.fig["disk allocated bytes (dd floor size)"] = alloc
        steps = [("pull regdisk zstd stream (qcow2)", lambda: self.pull("bench/qcow2-zstd", store)),
                 ("pull regdisk zstd stream (raw)", lambda: self.pull("bench/raw-zstd", store)),
                 ("floor: dd conv=fsync of the disk's allocated bytes", lambda: (self.dd_floor(alloc),))]
        for c in self.sizes:
            steps.append((f"pull regdisk chunked {size_name(c)}",
                          lambda c=c: self.pull(f"bench/chunked-{size_name(c)}", store)))
        for c in self.ctd_sizes if self.containerd else ():
            steps.append((f"pull containerd chunked {size_name(c)}",
                          lambda c=c: self.pull_containerd_chunked(f"bench/chunked-{size_name(c)}")))
        if self.a.warmup:
            log("warm-up round (not counted)")
            for _, fn in steps:
                fn()
        for i in range(self.a.runs):
            for name, fn in steps[i % len(steps):] + steps[:i % len(steps)]:
                r = fn()
                if len(r) == 1:
                    self.add(name, r[0])
                elif name.startswith("pull containerd"):
                    self.add(name, r[0], peak_rss_mib=r[1] / 1024, disk_usage_bytes=r[2])
                else:
                    repo = "bench/" + ("chunked-" + name.split()[-1] if "chunked" in name else
                                       name.split("(")[1].rstrip(")") + "-zstd")
                    self.add(name, r[0], peak_rss_mib=r[1] / 1024, fetched_bytes=r[2], requests=r[3],
                             disk_usage_bytes=common.used_bytes(store),
                             disk_file_bytes=allocated(self.stored_disk(store, repo)))
        self.ctd.stop()
        # Outside the timed rounds: what each pull stored equals the disk.
        for c in self.sizes:
            self.pull(f"bench/chunked-{size_name(c)}", store, verify_against=qcow2)
        self.pull("bench/qcow2-zstd", store)
        self.check(subprocess.run(["qemu-img", "compare", "-q", qcow2, self.stored_disk(store, "bench/qcow2-zstd")],
                                  capture_output=True).returncode == 0, "zstd stream pull differs")

    def pull_containerd_chunked(self, repo):
        self.ctd.fresh()
        subprocess.run(["sync"])
        t, _ = common.timed(["ctr", "--address", self.ctd.sock, "-n", "bench", "images", "pull", "--plain-http",
                             "--snapshotter", "native", f"{self.reg.host}/{repo.lower()}:latest"])
        want = self.fig["disk virtual bytes"]
        snaps = os.path.join(self.ctd.root, "io.containerd.snapshotter.v1.native", "snapshots")
        found = any(os.path.getsize(os.path.join(r, n)) == want for r, _, ns in os.walk(snaps) for n in ns)
        self.check(found, f"containerd holds no {want}-byte disk after pulling {repo}")
        result = t, self.ctd.peak_rss_kib(), common.used_bytes(self.ctd.root)
        self.ctd.stop()
        return result

    def cpu_floors(self):
        """(SHA-256 + zstd -dc CPU-seconds of each chunked blob) / cores."""
        cores = os.cpu_count()
        for c in self.sizes:
            _, blob = self.layer(f"bench/chunked-{size_name(c)}")
            sha, dec = [], []
            for _ in range(3):
                sha.append(cpu_timed(["openssl", "dgst", "-sha256", blob])[1])
                dec.append(cpu_timed(["zstd", "-qdf", blob, "-o", "/dev/null"])[1])
            s, d = sorted(sha)[1], sorted(dec)[1]
            self.fig.setdefault("cpu floor", {})[size_name(c)] = {
                "sha256 cpu s": s, "zstd -d cpu s": d, "cores": cores, "floor s": (s + d) / cores}
            log(f"cpu floor {size_name(c)}: sha256 {s:.2f} + zstd {d:.2f} cpu-s / {cores} = {(s + d) / cores:.2f} s")

    # -- deltas

    def delta(self, kind, c, v1_repo, v2_repo, v2_source):
        """Pulls v2 into a store holding v1, `runs` times (v2 removed between).
        Records bytes and requests against the indexes' expectation."""
        store = os.path.join(self.work, "store-delta")
        t_v1 = self.pull(v1_repo, store)[0]  # a full pull of v1 into an empty store
        i1, i2 = self.index(v1_repo), self.index(v2_repo)
        n_changed, frames, expected = delta_expectation(i1, i2)
        times, got = [], []
        for r in range(max(1, self.a.runs)):
            t, _, b, reqs = self.pull(v2_repo, store, fresh=False, verify_against=v2_source if r == 0 else None)
            times.append(t)
            got.append((b, reqs))
            subprocess.run(self.rd("rmi", self.ref(v2_repo), root=store), check=True, capture_output=True)
            subprocess.run(self.rd("prune", root=store), check=True, capture_output=True)
        b, reqs = got[0]
        self.check(all(g == got[0] for g in got), f"delta {kind} {size_name(c)}: bytes differ between runs: {got}")
        self.check(b <= DELTA_BYTES_BOUND * expected,
                   f"delta {kind} {size_name(c)}: fetched {b} bytes > {DELTA_BYTES_BOUND} x {expected} expected")
        have = {x[3] for x in i1["chunks"] if not x[2]}
        d = {"chunks": len(i2["chunks"]), "changed chunks": n_changed,
             "changed chunk bytes (uncompressed)": sum(min(c, i2["disk_size"] - k * c) for k, ch in
                                                       enumerate(i2["chunks"]) if not ch[2] and ch[3] not in have),
             "changed frames bytes": frames, "index bytes": i2["length"], "header frame bytes": i2["header_frame"],
             "expected bytes": expected, "fetched bytes": b, "requests": reqs,
             "fetched / expected": b / expected, "fetched / disk virtual size": b / i2["disk_size"],
             "pull s": common.summary(times), "v1 full pull s": t_v1}
        self.fig.setdefault("delta", {}).setdefault(kind, {})[size_name(c)] = d
        log(f"delta {kind} {size_name(c)}: fetched {b} in {reqs} requests (expected {expected}, "
            f"{n_changed} changed chunks), {statistics_median(times):.2f} s")

    # -- end to end

    def end_to_end(self, qcow2):
        variants = [("zstd stream", ("--compression", "zstd"))] + \
                   [(f"chunked {size_name(c)}", self.chunked_flags(c)) for c in self.sizes]
        store = os.path.join(self.work, "store")
        for i in range(self.a.build_runs):
            for name, flags in variants[i % len(variants):] + variants[:i % len(variants)]:
                self.reg.restart()  # nobody skips an upload because the blob is already there
                subprocess.run(["sync"])
                tb, rss = self.build(qcow2, "bench/e2e", *flags)
                tp, _, _, _ = self.pull("bench/e2e", store)
                self.add(f"build+push {name}", tb, peak_rss_mib=rss / 1024)
                self.add(f"build+push+pull {name}", tb + tp)

    def images(self, raw, qcow2, ext4):
        """Every image the pulls read, in one registry."""
        self.reg.restart()
        log("building the images the pulls read")
        self.build(qcow2, "bench/qcow2-zstd", "--compression", "zstd")
        self.build(raw, "bench/raw-zstd", "--compression", "zstd")
        scattered = os.path.join(self.work, "v2-scattered.raw")
        self.fig["scattered extents"] = rewrite_scattered(raw, scattered, 0.01, SEED + 1)
        for c in self.sizes:
            n = size_name(c)
            self.build(qcow2, f"bench/chunked-{n}", *self.chunked_flags(c))
            v2 = os.path.join(self.work, f"v2-chunks-{n}.raw")
            self.fig.setdefault("rewritten chunks", {})[n] = rewrite_chunks(raw, v2, c, 0.01, SEED + c)
            self.build(v2, f"bench/v2-chunks-{n}", *self.chunked_flags(c))
            self.build(scattered, f"bench/v2-scattered-{n}", *self.chunked_flags(c))
            self.build(ext4[0], f"bench/ext4-v1-{n}", *self.chunked_flags(c))
            self.build(ext4[1], f"bench/ext4-v2-{n}", *self.chunked_flags(c))
            i = self.index(f"bench/chunked-{n}")
            layer = self.layer(f"bench/chunked-{n}")[0]
            self.fig.setdefault("layers", {})[n] = {
                "layer bytes": layer["size"], "index bytes": i["length"], "chunks": len(i["chunks"]),
                "zero chunks": sum(1 for x in i["chunks"] if x[2]),
                "non-zero chunk bytes": sum(min(c, i["disk_size"] - k * c) for k, x in enumerate(i["chunks"])
                                            if not x[2])}
        for repo in ("bench/qcow2-zstd", "bench/raw-zstd"):
            self.fig.setdefault("layers", {})[repo.split("/")[1]] = {"layer bytes": self.layer(repo)[0]["size"]}
        return scattered

    def run(self):
        try:
            log(f"work directory {self.work}")
            size = int(self.a.size_gib * (1 << 30)) // MIB * MIB
            raw, qcow2 = common.make_disk(self.work, size, self.a.boot_sector)
            self.fig.update({"disk virtual bytes": size, "qcow2 bytes": os.path.getsize(qcow2),
                             "raw allocated bytes": allocated(raw)})
            log(f"disk: {size / MIB:.0f} MiB virtual, qcow2 {os.path.getsize(qcow2) / MIB:.0f} MiB")
            ext4 = make_ext4(self.work, size, int(self.a.ext4_mb * 1e6), 0.01, SEED + 2)
            self.fig["ext4"] = ext4[2]
            log(f"ext4: {ext4[2]}")
            if self.a.build_runs:
                self.end_to_end(qcow2)
            scattered = self.images(raw, qcow2, ext4)
            self.full_pulls(raw, qcow2)
            self.cpu_floors()
            for c in self.sizes:
                n = size_name(c)
                self.delta("1% of chunks", c, f"bench/chunked-{n}", f"bench/v2-chunks-{n}",
                           os.path.join(self.work, f"v2-chunks-{n}.raw"))
                self.delta("scattered 64K extents", c, f"bench/chunked-{n}", f"bench/v2-scattered-{n}", scattered)
                self.delta("ext4 update", c, f"bench/ext4-v1-{n}", f"bench/ext4-v2-{n}", ext4[1])
            return self.report()
        finally:
            self.reg.stop()
            self.ctd.close()
            if not self.a.keep:
                shutil.rmtree(self.work, ignore_errors=True)

    # -- the report

    def report(self):
        s = {k: common.summary(v) for k, v in self.samples.items()}
        for k, extra in self.extra.items():
            if k in s:
                s[k].update({f"{e} (median)": statistics_median(vals) for e, vals in extra.items()})
        result = {"machine": common.machine(), "args": {k: v for k, v in vars(self.a).items()},
                  "figures": self.fig, "timings": s}
        result["summary"] = summarize(result)
        result["failed checks"] = self.failures
        os.makedirs(self.a.out, exist_ok=True)
        with open(os.path.join(self.a.out, "chunked-results.json"), "w") as f:
            json.dump(result, f, indent=2)
        print_tables(result)
        return result


def statistics_median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def summarize(r):
    """Per chunk size: the figures issue 14 asks for, as ratios against their targets."""
    t, fig = r["timings"], r["figures"]
    med = lambda k: t[k]["median"] if k in t else None
    zstd = med("pull regdisk zstd stream (qcow2)")
    dd = med("floor: dd conv=fsync of the disk's allocated bytes")
    out = {}
    for n, layer in fig.get("layers", {}).items():
        if n.endswith("zstd"):
            continue
        pull = med(f"pull regdisk chunked {n}")
        cpu = fig.get("cpu floor", {}).get(n, {}).get("floor s")
        floor = max(cpu, dd) if cpu is not None and dd is not None else None
        row = {"layer bytes": layer["layer bytes"],
               "layer / zstd stream layer": layer["layer bytes"] / fig["layers"]["qcow2-zstd"]["layer bytes"],
               "index bytes": layer["index bytes"], "chunks": layer["chunks"],
               "full pull s": pull, "full pull / zstd stream pull": pull / zstd if pull and zstd else None,
               "machine floor s": floor, "cpu floor s": cpu, "dd floor s": dd,
               "full pull / machine floor": pull / floor if pull and floor else None,
               "requests per full pull": t.get(f"pull regdisk chunked {n}", {}).get("requests (median)"),
               "containerd pull s": med(f"pull containerd chunked {n}"),
               "node disk bytes": t.get(f"pull regdisk chunked {n}", {}).get("disk_usage_bytes (median)"),
               "build+push s": med(f"build+push chunked {n}"),
               "build+push+pull s": med(f"build+push+pull chunked {n}")}
        if row["node disk bytes"]:
            row["node disk / qcow2"] = row["node disk bytes"] / fig["qcow2 bytes"]
        disk_file = t.get(f"pull regdisk chunked {n}", {}).get("disk_file_bytes (median)")
        if disk_file:  # the disk file alone, without the store's metadata and chunk table
            row["disk file / qcow2"] = disk_file / fig["qcow2 bytes"]
        if row["containerd pull s"] and pull:
            row["regdisk / containerd"] = pull / row["containerd pull s"]
        e2e, e2e_zstd = row["build+push+pull s"], med("build+push+pull zstd stream")
        if e2e and e2e_zstd:
            row["build+push+pull / zstd stream"] = e2e / e2e_zstd
        for kind, per in fig.get("delta", {}).items():
            d = per.get(n)
            if not d:
                continue
            row[f"delta {kind}: fetched bytes"] = d["fetched bytes"]
            row[f"delta {kind}: fetched / expected"] = d["fetched / expected"]
            row[f"delta {kind}: fetched / disk"] = d["fetched / disk virtual size"]
            row[f"delta {kind}: requests"] = d["requests"]
            row[f"delta {kind}: pull s"] = d["pull s"]["median"]
            v1_pull = d.get("v1 full pull s") if kind == "ext4 update" else pull
            if v1_pull:  # against v1's full pull (the ext4 image's own, timed once, for the ext4 update)
                row[f"delta {kind}: pull / full v1 pull"] = d["pull s"]["median"] / v1_pull
            if kind == "ext4 update":
                row["delta ext4 update: fetched / used data"] = d["fetched bytes"] / fig["ext4"]["used bytes (v1)"]
        out[n] = row
    return out


def fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if v < 10 else f"{v:.1f}"
    return str(v)


def print_tables(r):
    print(f"\nmachine: {r['machine']}")
    f = r["figures"]
    print(f"disk: {f['disk virtual bytes'] / MIB:.0f} MiB virtual, qcow2 {f['qcow2 bytes'] / MIB:.0f} MiB, "
          f"allocated {f['raw allocated bytes'] / MIB:.0f} MiB; ext4: {f['ext4']}\n")
    print(f"| {'measurement':55} | median s | min s | max s |")
    print(f"|{'-' * 57}|----------|-------|-------|")
    for k, v in r["timings"].items():
        print(f"| {k:55} | {v['median']:8.2f} | {v['min']:5.2f} | {v['max']:5.2f} |")
    sizes = list(r["summary"])
    keys = []
    for row in r["summary"].values():
        keys += [k for k in row if k not in keys]
    print("\n| " + " | ".join([f"{'per chunk size':45}"] + [f"{s:>10}" for s in sizes]) + " |")
    for k in keys:
        print("| " + " | ".join([f"{k:45}"] + [f"{fmt(r['summary'][s].get(k)):>10}" for s in sizes]) + " |")
    if r["failed checks"]:
        print("\nFAILED CHECKS:\n  " + "\n  ".join(r["failed checks"]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("regdisk", nargs="?")
    ap.add_argument("boot_sector", nargs="?")
    ap.add_argument("--size-gib", type=float, default=2.0, help="virtual size of the generated disks")
    ap.add_argument("--runs", type=int, default=3, help="rounds of full pulls (after a warm-up) and of delta pulls")
    ap.add_argument("--build-runs", type=int, default=2, help="rounds of build+push+pull (0: skip)")
    ap.add_argument("--no-warmup", dest="warmup", action="store_false", help="no warm-up round before the full pulls")
    ap.add_argument("--chunk-sizes", default="64K,256K,1M,4M")
    ap.add_argument("--containerd-chunk-sizes", help="chunk sizes containerd pulls (default: all; none: skip)")
    ap.add_argument("--ext4-mb", type=float, default=500, help="MB of /usr files in the ext4 image")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--work-parent", default="/var/tmp", help="where the work directory goes (not a tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--replot", metavar="RESULTS_JSON", help="only print the tables of saved results")
    a = ap.parse_args()
    if a.replot:
        with open(a.replot) as f:
            print_tables(json.load(f))
        return
    if not a.regdisk or not a.boot_sector:
        ap.error("give the regdisk binary and the guest boot sector (build/src/regdisk build/guest/hello.bootsector)")
    a.raw, a.vms, a.micro = False, 0, None  # what bench/run.py's Bench expects
    r = ChunkedBench(a).run()
    if r["failed checks"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
