#!/usr/bin/env bash
# The demo behind `./dev.sh demo`: publish a tiny bootable VM disk as a
# registry disk to a throwaway registry on 127.0.0.1, pull it into a node
# store, check it is the same disk, and boot it. Everything lives in a temp
# directory that is removed at the end, registry included.
#
#   scripts/demo.sh REGDISK_BINARY BOOT_SECTOR
set -euo pipefail
regdisk=$(realpath "$1")
bootsector=$(realpath "$2")
work=$(mktemp -d "${TMPDIR:-/tmp}/regdisk-demo.XXXXXX")
registry_pid=
# On every way out: stop the registry, remove everything, and exit with the
# demo's own status (not that of the registry killed here).
cleanup() {
  local rc=$?
  if [ -n "$registry_pid" ]; then
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
step() { printf '\n==> %s\n' "$*"; }

step "Starting a throwaway registry on 127.0.0.1"
port=
for _ in $(seq 1 50); do
  candidate=$((20000 + RANDOM % 40000))
  if ! (exec 3<>"/dev/tcp/127.0.0.1/$candidate") 2>/dev/null; then port=$candidate; break; fi
done
[ -n "$port" ] || { echo "demo: no free port found" >&2; exit 1; }
cat > "$work/registry.yml" <<YAML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
YAML
docker-registry serve "$work/registry.yml" >"$work/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 1 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.1
done
echo "registry at 127.0.0.1:$port"

step "Making a 1 MiB bootable disk (BIOS boot sector + a data sector) as qcow2"
cp "$bootsector" "$work/disk.raw"
printf 'PRISTINE-SECTOR-CONTENT' | dd of="$work/disk.raw" bs=512 seek=1 conv=notrunc status=none
printf 'POWEROFF' | dd of="$work/disk.raw" bs=512 seek=2 conv=notrunc status=none  # the guest powers off when done
truncate -s 1M "$work/disk.raw"
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$work/hello.qcow2"
qemu-img info "$work/hello.qcow2" | sed -n '1,4p'

base="docker://127.0.0.1:$port/kubevirt/registry-disk-v1alpha:latest"
ref="docker://127.0.0.1:$port/vmdisks/fedora25:latest"  # the image the seed spec names
export REGDISK_ROOT="$work/store"

step "regdisk base -t $base    (for the Dockerfile workflow: FROM it, ADD disk.qcow2 /disk)"
"$regdisk" base -t "$base"

step "regdisk build hello.qcow2 -t $ref"
"$regdisk" build "$work/hello.qcow2" -t "$ref"

step "regdisk pull $ref    (into the node store at $REGDISK_ROOT)"
"$regdisk" pull "$ref"

step "regdisk inspect --disk $ref    (skopeo's fields, and the disk read from its header)"
"$regdisk" inspect --disk "$ref"

step "regdisk images"
"$regdisk" images
"$regdisk" images -o json > "$work/images.json"
stored=$(sed -n 's/.*"file": "\(.*\)".*/\1/p' "$work/images.json")

step "Checking the stored disk against the original with qemu-img compare"
qemu-img compare -f qcow2 -F qcow2 "$work/hello.qcow2" "$stored"

step "regdisk run -f vm.yaml    (the seed's VM spec, its image on the local registry)"
demo_dir=$(cd "$(dirname "$0")/.." && pwd)
sed "s|image: vmdisks/|image: 127.0.0.1:$port/vmdisks/|" "$demo_dir/examples/vm.yaml" > "$work/vm.yaml"
cat "$work/vm.yaml"
echo "--- console ---"
"$regdisk" run -f "$work/vm.yaml" --timeout 60 | tr -d '\r' | tee "$work/console.txt"
grep -q 'sector1: PRISTINE-SECTOR-CONTENT' "$work/console.txt"

printf '\nDemo done: the disk went to the registry, into the node store byte for byte, and booted\n'
printf 'from the seed spec on an ephemeral overlay (its write to sector 1 is already gone).\n'
