#!/usr/bin/env bash
# Installs what the three test tiers need on top of setup.sh: QEMU, a static
# busybox, udev, virtme-ng, Prometheus (its service is not started), and the
# guest kernels of tests/vm/harness.py, fetched into /var/cache/memcgscope
# by collector/kernels.py (downloaded and unpacked, never installed).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
"$ROOT_DIR/scripts/setup.sh"

# The tests run their own Prometheus on loopback. udev: virtme-ng's guest
# init runs the host's udevd to create /dev/virtio-ports/virtme.* (the
# command's stdin/stdout/exit status); without it the command runs on the
# console and vng exits 255 (virtme-ng 1.42; udev used to arrive with the
# linux-image packages via initramfs-tools).
without_service_start apt_install prometheus udev
apt_install qemu-system-x86 busybox-static kmod vagrant
pip_install_project "[test]"

# Guest kernels: one fetch per kernel of the guest table (a second run finds
# them in the cache and downloads nothing).
for kernel in $("$VENV/bin/python" "$ROOT_DIR/tests/vm/harness.py" --kernels); do
    out=$(kernels_py fetch "$kernel") || exit 1
    say "guest kernel $kernel: $out"
done
say "test dependencies ready"
