#!/usr/bin/env bash
# Installs what the three test tiers need on top of setup.sh: QEMU, a static
# busybox, virtme-ng, the Debian 6.1 and bookworm-backports 6.12 guest
# kernels with their headers, and Prometheus (its service is not started).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
"$ROOT_DIR/scripts/setup.sh"

# Keep Debian's prometheus service from starting on install: the tests run
# their own instance on loopback.
if ! pkg_installed prometheus; then
    policy=/usr/sbin/policy-rc.d
    created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; created_policy=1
    fi
    apt_install prometheus
    [ "$created_policy" -eq 1 ] && rm -f "$policy"
fi

apt_install qemu-system-x86 busybox-static kmod vagrant

# Guest kernels: Debian's 6.1 (the stable metapackage's ABI) and the newest
# 6.12 from bookworm-backports, taken per package (no -t).
ensure_backports
if ! ls /boot/vmlinuz-6.1.0-*-amd64 >/dev/null 2>&1; then
    apt_update_once
    k61=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6\.1\./{print $2; exit}')
    [ -n "$k61" ] || die "cannot resolve Debian's 6.1 kernel from linux-image-amd64"
    apt_install "$k61" "linux-headers-${k61#linux-image-}"
fi
if ! ls /boot/vmlinuz-6.12.*-amd64 >/dev/null 2>&1; then
    apt_update_once
    k612=$(newest_pkg '^linux-image-6\.12\.[0-9]+\+bpo-amd64$|^linux-image-6\.12\.[0-9]+\+deb12-amd64$')
    [ -n "$k612" ] || die "cannot find a 6.12 kernel in bookworm-backports"
    apt_install "$k612/bookworm-backports" "linux-headers-${k612#linux-image-}/bookworm-backports"
fi
pip_install_project "[test]"
say "test dependencies ready"
