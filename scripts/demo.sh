#!/usr/bin/env bash
# The demo behind `./dev.sh demo`: publish a tiny bootable VM disk as a
# registry disk to a throwaway registry on 127.0.0.1, then pull it back into
# an OCI layout and check it is the same disk. Everything lives in a temp
# directory that is removed at the end, registry included.
#
#   scripts/demo.sh REGDISK_BINARY BOOT_SECTOR
set -euo pipefail
regdisk=$(realpath "$1")
bootsector=$(realpath "$2")
work=$(mktemp -d /tmp/regdisk-demo.XXXXXX)
registry_pid=
cleanup() {
  [ -n "$registry_pid" ] && kill "$registry_pid" 2>/dev/null && wait "$registry_pid" 2>/dev/null
  rm -rf "$work"
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
truncate -s 1M "$work/disk.raw"
qemu-img convert -f raw -O qcow2 "$work/disk.raw" "$work/hello.qcow2"
qemu-img info "$work/hello.qcow2" | sed -n '1,4p'

step "Packing it as a registry disk (/disk/hello.qcow2, owner 107:107) in an OCI layout"
mkdir -p "$work/rootfs/disk"
install -m 0444 "$work/hello.qcow2" "$work/rootfs/disk/hello.qcow2"
chmod 0555 "$work/rootfs/disk"
chown 107:107 "$work/rootfs/disk" "$work/rootfs/disk/hello.qcow2" 2>/dev/null || true
(cd "$work" && umoci init --layout layout && umoci new --image layout:hello &&
  umoci insert --image layout:hello rootfs/disk /disk) >/dev/null

ref="docker://127.0.0.1:$port/vmdisks/hello:latest"
step "regdisk copy oci:layout:hello $ref"
"$regdisk" copy "oci:$work/layout:hello" "$ref"

step "regdisk inspect $ref"
"$regdisk" inspect "$ref"

step "regdisk copy $ref oci:pulled:hello"
"$regdisk" copy "$ref" "oci:$work/pulled:hello"

step "Checking the pulled disk against the original with qemu-img compare"
layer=$("$regdisk" inspect "oci:$work/pulled:hello" | sed -n 's/.*"digest": "sha256:\([0-9a-f]*\)".*/\1/p' | tail -n 1)
mkdir -p "$work/extract"
tar -m -xzf "$work/pulled/blobs/sha256/$layer" -C "$work/extract" disk/hello.qcow2
qemu-img compare -f qcow2 -F qcow2 "$work/hello.qcow2" "$work/extract/disk/hello.qcow2"

step "Booting the pulled disk under QEMU, writes discarded (a preview of regdisk run)"
accel=tcg
[ -w /dev/kvm ] && accel=kvm
qemu-system-x86_64 -accel "$accel" -m 64 -display none -nodefaults -no-user-config \
  -serial "file:$work/console.log" \
  -drive "file=$work/extract/disk/hello.qcow2,format=qcow2,if=ide,snapshot=on" 2>"$work/qemu.log" &
qemu_pid=$!
for _ in $(seq 1 300); do
  grep -q REGDISK-GUEST-DONE "$work/console.log" 2>/dev/null && break
  sleep 0.1
done
kill "$qemu_pid" 2>/dev/null; wait "$qemu_pid" 2>/dev/null || true
tr -d '\r' < "$work/console.log"
grep -q 'sector1: PRISTINE-SECTOR-CONTENT' "$work/console.log"

printf '\nDemo done: the disk went to the registry, came back byte for byte, and booted.\n'
printf 'regdisk run -f vm.yaml (one command for all of this) arrives with the VM runtime.\n'
