#!/usr/bin/env bash
# build-guest.sh OUT_DIR: writes OUT_DIR/linux-guest.raw, regdisk's Linux test
# guest: Debian's cloud kernel and busybox-static in an initramfs whose /init
# (guest/linux/init) prints markers, reads the cloud-init NoCloud seed, takes
# a DHCP lease and serves HTTP; on a FAT disk made bootable with syslinux.
#
# No root: the packages come from `apt-get download` and are unpacked with
# dpkg-deb -x into a temp dir; the disk is written with mtools. The result is
# cached in ${REGDISK_TEST_CACHE:-$HOME/.cache/regdisk}/linux-guest-KEY/, KEY
# being the packages' versions and a hash of this script, init and
# udhcpc.script. See guest/linux/README.md.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: $0 OUT_DIR" >&2
  exit 2
fi
out=$1
here=$(cd "$(dirname "$0")" && pwd)
# Without HOME (some CI environments), the cache is kept beside the output.
if [ -n "${HOME:-}" ]; then
  cache=${REGDISK_TEST_CACHE:-$HOME/.cache/regdisk}
else
  cache=${REGDISK_TEST_CACHE:-$out/.cache}
fi
inputs=("$here/build-guest.sh" "$here/init" "$here/udhcpc.script")
# The kernel's meta package. Debian's generic linux-image-amd64 (a 70 MB
# download) also has AHCI and e1000, which the cloud kernel lacks.
meta_pkg=${REGDISK_GUEST_KERNEL:-linux-image-cloud-amd64}

# Modules the guest loads when the kernel has them as modules (their
# dependencies come along). ahci and e1000 are not in the cloud kernel at all;
# a module that is built in needs nothing.
required_modules=(virtio_pci virtio_net virtio_blk virtio_scsi sd_mod sr_mod ata_piix isofs vfat
                  nls_cp437 nls_ascii nls_iso8859_1 nls_utf8 button evdev)
optional_modules=(ahci e1000)

die() { echo "build-guest.sh: $*" >&2; exit 1; }
for tool in apt-get apt-cache dpkg-deb cpio gzip mkfs.vfat mcopy syslinux objcopy sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is missing: install the packages in dev.sh (./dev.sh deps)"
done

mkdir -p "$out" "$cache"

# Copies the cached image to OUT_DIR (a copy: QEMU may write to it).
deliver() {
  local dir=$1
  touch "$dir"
  cp --reflink=auto "$dir/linux-guest.raw" "$out/linux-guest.raw.tmp"
  mv -f "$out/linux-guest.raw.tmp" "$out/linux-guest.raw"
  cp "$dir/versions" "$out/linux-guest.versions"
}

src_hash=$(cat "${inputs[@]}" | sha256sum | cut -c1-16)

# Asking apt for the versions costs over a second (this apt keeps no
# pkgcache.bin), so the key found for a given state of apt's lists is
# remembered; when the lists change, apt is asked again.
lists_stamp=$({ stat -c '%n %s %Y' /var/lib/apt/lists/*_Packages* /etc/apt/preferences \
                  /etc/apt/preferences.d/* 2>/dev/null || true; } | sha256sum | cut -c1-16)
memo_hash=$(printf '%s %s %s\n' "$meta_pkg" "$src_hash" "$lists_stamp" | sha256sum | cut -c1-16)
memo="$cache/linux-guest-memo-$memo_hash"
if [ -f "$memo" ]; then
  key=$(cat "$memo")
  if [ -f "$cache/linux-guest-$key/linux-guest.raw" ]; then
    deliver "$cache/linux-guest-$key"
    exit 0
  fi
fi

# The kernel package the meta package depends on, and the versions.
show=$(apt-cache show --no-all-versions "$meta_pkg" busybox-static 2>/dev/null) ||
  die "apt-cache knows no $meta_pkg or busybox-static: run 'apt-get update' (as root) first"
kernel_pkg=$(awk -v p="$meta_pkg" '/^Package:/ {pkg = $2} pkg == p && /^Depends:/ {
  for (i = 2; i <= NF; i++) if ($i ~ /^linux-image-/) { sub(/,$/, "", $i); print $i; exit } }' <<<"$show")
[ -n "$kernel_pkg" ] || die "$meta_pkg depends on no linux-image-* package"
kernel_ver=$(apt-cache policy "$kernel_pkg" | awk '/Candidate:/ {print $2; exit}')
busybox_ver=$(awk '/^Package:/ {pkg = $2} pkg == "busybox-static" && /^Version:/ {print $2; exit}' <<<"$show")
if [ -z "$kernel_ver" ] || [ "$kernel_ver" = "(none)" ]; then
  die "no candidate version of $kernel_pkg"
fi
[ -n "$busybox_ver" ] || die "no candidate version of busybox-static"
versions="$kernel_pkg=$kernel_ver busybox-static=$busybox_ver"
key=$(printf '%s %s\n' "$versions" "$src_hash" | sha256sum | cut -c1-16)
printf '%s\n' "$key" >"$memo.tmp.$$" && mv -f "$memo.tmp.$$" "$memo"
if [ -f "$cache/linux-guest-$key/linux-guest.raw" ]; then
  deliver "$cache/linux-guest-$key"
  exit 0
fi

echo "build-guest.sh: building the Linux test guest ($versions)" >&2
work=$(mktemp -d "$cache/.linux-guest-build.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/debs" "$work/x" "$work/root"

# Download as the current user; as root, apt would hand the download to its
# _apt user, who cannot write to this private temp dir.
apt_opts=(-q)
[ "$(id -u)" -ne 0 ] || apt_opts+=(-o APT::Sandbox::User=root)
(cd "$work/debs" && apt-get "${apt_opts[@]}" download "$kernel_pkg=$kernel_ver" "busybox-static=$busybox_ver" >/dev/null) ||
  die "apt-get download $kernel_pkg=$kernel_ver busybox-static=$busybox_ver failed"
for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$work/x"
done

kernel=$(echo "$work"/x/boot/vmlinuz-*)
[ -f "$kernel" ] || die "$kernel_pkg holds no /boot/vmlinuz-*"
kdir=$(echo "$work"/x/lib/modules/*)
[ -d "$kdir/kernel" ] || die "$kernel_pkg holds no /lib/modules/*/kernel"
busybox="$work/x/bin/busybox"
[ -x "$busybox" ] || die "busybox-static holds no /bin/busybox"

# --- The initramfs -----------------------------------------------------------
root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,tmp,root,etc/acpi,lib/modules}
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
install -m 0755 "$here/init" "$root/init"
install -m 0755 "$here/udhcpc.script" "$root/etc/udhcpc.script"
echo "PWRF power" >"$root/etc/acpid.conf"
printf '#!/bin/sh\necho "REGDISK-GUEST: power button" >/dev/console\nsync\npoweroff -f\n' >"$root/etc/acpi/power"
chmod 0755 "$root/etc/acpi/power"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"

# Module name (dashes as underscores) -> file in the package.
declare -A ko_file=() builtin=() staged=()
while IFS= read -r -d '' f; do
  b=${f##*/}
  b=${b%%.ko*}
  ko_file[${b//-/_}]=$f
done < <(find "$kdir/kernel" -name '*.ko*' -print0)
if [ -f "$kdir/modules.builtin" ]; then
  while read -r line; do
    b=${line##*/}
    b=${b%%.ko*}
    builtin[${b//-/_}]=1
  done <"$kdir/modules.builtin"
fi
load_order=()

# Stages module $1 after its dependencies (from its .modinfo "depends=").
# Compressed modules are unpacked here: busybox insmod takes plain .ko files.
stage_module() {
  local m=${1//-/_} f dst deps d
  [ -z "${staged[$m]:-}" ] || return 0
  staged[$m]=1
  f=${ko_file[$m]:-}
  [ -n "$f" ] || return 1
  dst="$root/lib/modules/$m.ko"
  case "$f" in
    *.ko.xz) xz -dc "$f" >"$dst" ;;
    *.ko.zst) zstd -qdc "$f" >"$dst" ;;
    *.ko.gz) gzip -dc "$f" >"$dst" ;;
    *) cp "$f" "$dst" ;;
  esac
  objcopy -O binary --only-section=.modinfo "$dst" "$work/modinfo"
  deps=$(tr '\0' '\n' <"$work/modinfo" | sed -n 's/^depends=//p')
  for d in ${deps//,/ }; do
    stage_module "$d" || die "$m depends on $d, which $kernel_pkg does not have"
  done
  load_order+=("$m.ko")
}
for m in "${required_modules[@]}" "${optional_modules[@]}"; do
  if [ -n "${builtin[$m]:-}" ]; then
    continue
  elif [ -n "${ko_file[$m]:-}" ]; then
    stage_module "$m"
  else
    case " ${optional_modules[*]} " in
      *" $m "*) ;;
      *) die "$kernel_pkg has no module $m and does not build it in" ;;
    esac
  fi
done
printf '%s\n' "${load_order[@]}" >"$root/etc/modules"

(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) | gzip -9n >"$work/initrd.gz"

# --- The boot disk -----------------------------------------------------------
cat >"$work/syslinux.cfg" <<'EOF'
SERIAL 0 115200
PROMPT 0
TIMEOUT 0
DEFAULT linux
LABEL linux
  KERNEL vmlinuz
  INITRD initrd.gz
  APPEND console=ttyS0,115200 quiet panic=-1
EOF
# An unpartitioned ("superfloppy") FAT disk: SeaBIOS runs its boot sector,
# which syslinux wrote. Room for the files, ldlinux and the FAT itself.
kib=$((($(stat -c %s "$kernel") + $(stat -c %s "$work/initrd.gz")) / 1024 + 1024))
kib=$((kib + kib / 20))
img="$work/linux-guest.raw"
mkfs.vfat -C -n REGDISK -i 52474431 "$img" "$kib" >/dev/null
mcopy -i "$img" "$kernel" ::vmlinuz
mcopy -i "$img" "$work/initrd.gz" ::initrd.gz
mcopy -i "$img" "$work/syslinux.cfg" ::syslinux.cfg
syslinux --install "$img"

# Into the cache, atomically (another run may have finished first).
dir="$cache/linux-guest-$key"
mkdir "$work/result"
mv "$img" "$work/result/linux-guest.raw"
printf '%s\n' "$versions" "modules: ${load_order[*]}" >"$work/result/versions"
mv -T "$work/result" "$dir" 2>/dev/null || [ -f "$dir/linux-guest.raw" ] || die "cannot write $dir"
# Guests of other keys unused for 30 days go.
find "$cache" -maxdepth 1 -name 'linux-guest-*' -mtime +30 -exec rm -rf {} + 2>/dev/null || true
deliver "$dir"
echo "build-guest.sh: $out/linux-guest.raw ($(($(stat -c %s "$out/linux-guest.raw") / 1048576)) MiB)" >&2
