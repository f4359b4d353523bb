#!/usr/bin/env bash
# regdisk's one entry point for developers and CI.
#
#   ./dev.sh demo    install what is missing, build, publish a tiny bootable
#                    registry disk to a throwaway local registry and pull it
#   ./dev.sh test    install what is missing, run the pull, store and node
#                    daemon tests under ThreadSanitizer, then build with
#                    ASan/UBSan and run every test (extra arguments go to
#                    ctest, and skip the TSan pass); deterministic: the fuzz targets replay their
#                    corpus and a fixed-seed mutation run (ctest -L fuzz)
#   ./dev.sh build   build build/src/regdisk (Release)
#   ./dev.sh bench [ARGS]  build (Release) and run bench/run.py: regdisk against
#                    containerd and buildah on a generated 2 GiB disk (as root)
#   ./dev.sh fuzz [SECONDS] [TARGET]  run libFuzzer (clang, build-fuzz/) on each
#                    target in fuzz/ (or TARGET) for SECONDS each (default
#                    300), on a copy of fuzz/corpus/TARGET/
#   ./dev.sh deps    only install the Debian packages
set -euo pipefail
cd "$(dirname "$0")"

# Build tools and libraries, then the real programs the tests start.
PACKAGES=(
  cmake ninja-build g++ pkg-config binutils
  libcurl4-openssl-dev libssl-dev nlohmann-json3-dev libcli11-dev libfmt-dev libyaml-cpp-dev libtomlplusplus-dev
  libarchive-dev libzstd-dev libisal-dev libxml2-dev libisofs-dev libsqlite3-dev libmicrohttpd-dev libgnutls28-dev
  libgtest-dev libgmock-dev libbenchmark-dev libcpp-httplib-dev clang libclang-rt-14-dev
  docker-registry skopeo umoci buildah apache2-utils openssl ca-certificates tar
  qemu-utils qemu-system-x86 libvirt-clients procps iproute2
  genisoimage python3-yaml  # isoinfo and PyYAML read the cloud-init seeds back in tests
  zsh fish  # the completion scripts are loaded and run by the real shells in tests
  containerd python3 curl time isal zstd  # bench/run.py (smoke-tested in CI): the anchor and its tools
  # The Linux test guest (guest/linux/build-guest.sh) and its cloud-init seeds.
  dosfstools mtools syslinux syslinux-common cpio xz-utils gzip
  # Lazy boot: the NBD server (nbdkit and its plugin API) and the client tools the tests use.
  nbdkit nbdkit-plugin-dev libnbd-dev libnbd-bin
)
# Only for ./dev.sh bench: the plot of the ratios.
BENCH_PACKAGES=(python3-matplotlib)

deps() {  # deps [EXTRA-PACKAGES...]
  local missing=()
  for p in "${PACKAGES[@]}" "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "dev.sh: installing ${missing[*]}" >&2
  local sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

build() {  # build DIR CMAKE-ARGS... [-- TARGETS...]
  local dir=$1 args=() targets=()
  shift
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=("$1"); shift; done
  [ $# -gt 0 ] && shift && targets=(--target "$@")
  cmake -S . -B "$dir" -G Ninja "${args[@]}" >/dev/null
  cmake --build "$dir" "${targets[@]}"
}

fuzz() {  # fuzz SECONDS [TARGET]: run libFuzzer on each target, on a copy of its corpus
  local seconds=$1 only=${2:-} targets=() t
  for t in fuzz/*_fuzzer.cc; do
    t=${t#fuzz/}
    targets+=("${t%_fuzzer.cc}")
  done
  if [ -n "$only" ]; then
    [ -f "fuzz/${only}_fuzzer.cc" ] || { echo "dev.sh: no fuzz target $only (have: ${targets[*]})" >&2; return 2; }
    targets=("$only")
  fi
  CC=clang CXX=clang++ build build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DREGDISK_FUZZ=ON \
    -DREGDISK_BUILD_TESTS=OFF -DREGDISK_BUILD_BENCH=OFF
  local failed=()
  for t in "${targets[@]}"; do
    # libFuzzer adds what it finds to its first directory: a copy, so
    # fuzz/corpus/ changes only by hand.
    local work=build-fuzz/corpus/$t log=build-fuzz/$t.log rc=0
    rm -rf "$work"
    mkdir -p "$work"
    cp fuzz/corpus/"$t"/* "$work"/
    build-fuzz/fuzz/"$t"_fuzzer -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -artifact_prefix=build-fuzz/"$t"- "$work" >"$log" 2>&1 || rc=$?
    if [ "$rc" -ne 0 ]; then
      tail -n 40 "$log" >&2
      echo "dev.sh: fuzz target $t found a problem; the input is build-fuzz/$t-crash-* (or -leak-, -timeout-)." >&2
      echo "  Replay it: build-test/fuzz/${t}_replay FILE (ASan build) or build-fuzz/fuzz/${t}_fuzzer FILE." >&2
      echo "  Once fixed, add it as fuzz/corpus/$t/regress-WHAT, so that ctest -L fuzz replays it for ever." >&2
      failed+=("$t")
      continue
    fi
    echo "fuzz: $t clean for $seconds s ($(grep -oE '^Done [0-9]+ runs' "$log" || echo '? runs'))"
  done
  echo "fuzz: new inputs are in build-fuzz/corpus/TARGET/; to keep the few that add coverage:"
  echo "  build-fuzz/fuzz/TARGET_fuzzer -merge=1 fuzz/corpus/TARGET build-fuzz/corpus/TARGET"
  echo "  (review them and keep the corpus small: ctest replays every file)"
  if [ ${#failed[@]} -ne 0 ]; then
    echo "dev.sh: fuzzing found problems in: ${failed[*]}" >&2
    return 1
  fi
}

case "${1:-}" in
  demo)
    deps
    build build -DCMAKE_BUILD_TYPE=Release -DREGDISK_BUILD_TESTS=OFF
    exec scripts/demo.sh build/src/regdisk build/guest/hello.bootsector
    ;;
  test)
    shift
    deps
    build build-test -DCMAKE_BUILD_TYPE=Debug -DREGDISK_SANITIZE=ON -DREGDISK_WERROR=ON
    if [ $# -eq 0 ]; then
      # The threaded pull, the store, the daemon's object store (writers
      # and watchers) and the node daemon's engine (its workers, QEMUs and
      # watches) again under ThreadSanitizer (a data race fails the test:
      # TSan exits 66), then everything under ASan.
      build build-tsan -DCMAKE_BUILD_TYPE=Debug -DREGDISK_TSAN=ON -DREGDISK_WERROR=ON -DREGDISK_BUILD_BENCH=OFF \
        -- regdisk unit_tests store_tests crash_tests state_tests daemon_tests
      ctest --test-dir build-tsan -j2 --output-on-failure -R '^(BlockPipe|Store|Crash|Unpack|State|Daemon)'
    fi
    exec ctest --test-dir build-test -j2 --output-on-failure "$@"
    ;;
  fuzz)
    deps
    fuzz "${2:-300}" "${3:-}"
    ;;
  build)
    deps
    build build -DCMAKE_BUILD_TYPE=Release -DREGDISK_BUILD_TESTS=OFF
    ;;
  bench)
    shift
    deps "${BENCH_PACKAGES[@]}"
    build build -DCMAKE_BUILD_TYPE=Release -DREGDISK_BUILD_TESTS=OFF
    exec /usr/bin/python3 bench/run.py build/src/regdisk build/guest/hello.bootsector \
      --micro build/bench/micro/regdisk_micro "$@"
    ;;
  deps)
    deps
    ;;
  *)
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
