#!/usr/bin/env bash
# The demo, as `./dev.sh demo` runs it: exit 0 when it worked, non-zero when
# it did not, and nothing left behind either way.
#
#   tests/demo_test.sh REGDISK_BINARY BOOT_SECTOR
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fail() { echo "demo_test: $*" >&2; exit 1; }

TMPDIR=$tmp "$here/scripts/demo.sh" "$1" "$2" >"$tmp.out" 2>&1
rc=$?
grep -q "Demo done" "$tmp.out" || { cat "$tmp.out"; rm -f "$tmp.out"; fail "the demo did not finish"; }
rm -f "$tmp.out"
[ "$rc" -eq 0 ] || fail "the demo worked but exited $rc"
[ -z "$(ls -A "$tmp")" ] || fail "the demo left $(ls -A "$tmp") behind"

# A demo that fails (the boot sector is missing) says so by its exit code.
TMPDIR=$tmp "$here/scripts/demo.sh" "$1" "$tmp/no-such-bootsector" >/dev/null 2>&1
rc=$?
[ "$rc" -ne 0 ] || fail "a failed demo exited 0"
[ -z "$(ls -A "$tmp")" ] || fail "a failed demo left $(ls -A "$tmp") behind"
echo "demo_test: 2 passed, 0 failed"
