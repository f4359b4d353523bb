#!/usr/bin/env bash
# regdisk's one entry point for developers and CI.
#
#   ./dev.sh demo    install what is missing, build, publish a tiny bootable
#                    registry disk to a throwaway local registry and pull it
#   ./dev.sh test    install what is missing, fuzz the VM spec parser briefly
#                    (clang + libFuzzer), build with ASan/UBSan and run every
#                    test (extra arguments go to ctest)
#   ./dev.sh build   build build/src/regdisk (Release)
#   ./dev.sh bench [ARGS]  build (Release) and run bench/run.py: regdisk against
#                    containerd and buildah on a generated 2 GiB disk (as root)
#   ./dev.sh fuzz [SECONDS]  fuzz the VM spec parser (default 300 s)
#   ./dev.sh deps    only install the Debian packages
set -euo pipefail
cd "$(dirname "$0")"

# Build tools and libraries, then the real programs the tests start.
PACKAGES=(
  cmake ninja-build g++ pkg-config binutils
  libcurl4-openssl-dev libssl-dev nlohmann-json3-dev libcli11-dev libfmt-dev libyaml-cpp-dev
  libarchive-dev libzstd-dev libisal-dev libxml2-dev
  libgtest-dev libgmock-dev libbenchmark-dev libcpp-httplib-dev clang libclang-rt-14-dev
  docker-registry skopeo umoci buildah apache2-utils openssl ca-certificates tar
  qemu-utils qemu-system-x86 libvirt-clients procps
  containerd python3 curl time isal zstd  # bench/run.py (smoke-tested in CI): the anchor and its tools
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

build() {  # build DIR CMAKE-ARGS...
  local dir=$1
  shift
  cmake -S . -B "$dir" -G Ninja "$@" >/dev/null
  cmake --build "$dir"
}

fuzz() {  # fuzz SECONDS: run every fuzz target on a copy of its corpus
  CC=clang CXX=clang++ build build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DREGDISK_FUZZ=ON \
    -DREGDISK_BUILD_TESTS=OFF -DREGDISK_BUILD_BENCH=OFF
  local work
  work=$(mktemp -d)
  cp fuzz/corpus/spec/* "$work/"
  local rc=0
  build-fuzz/fuzz/spec_fuzzer -max_total_time="$1" -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix=build-fuzz/ "$work" >build-fuzz/fuzz.log 2>&1 || rc=$?
  rm -rf "$work"
  if [ "$rc" -ne 0 ]; then
    tail -n 40 build-fuzz/fuzz.log >&2
    echo "dev.sh: the fuzzer found a problem (input saved under build-fuzz/)" >&2
    return 1
  fi
  grep -E '^Done' build-fuzz/fuzz.log || true
  echo "fuzz: spec parser clean for $1 s"
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
    fuzz "${FUZZ_SECONDS:-30}"
    exec ctest --test-dir build-test -j2 --output-on-failure "$@"
    ;;
  fuzz)
    deps
    fuzz "${2:-300}"
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
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
