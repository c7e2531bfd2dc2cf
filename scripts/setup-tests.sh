#!/usr/bin/env bash
# Installs what the three test tiers need on top of setup.sh: QEMU, a static
# busybox, udev, virtme-ng, Prometheus (its service is not started), Podman
# with runc (tests/host/test_podman_host.py; nothing is pulled), and the
# guest kernels of tests/vm/harness.py, fetched into /var/cache/memcgscope
# by collector/kernels.py (downloaded and unpacked, never installed).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
"$ROOT_DIR/scripts/setup.sh" --vm

# setup.sh --vm brings QEMU, busybox, kmod, udev and virtme-ng. udev:
# virtme-ng's guest init runs the host's udevd to create
# /dev/virtio-ports/virtme.* (the command's stdin/stdout/exit status);
# without it the command runs on the console and vng exits 255 (virtme-ng
# 1.42; udev used to arrive with the linux-image packages via
# initramfs-tools). The tests run their own Prometheus on loopback.
without_service_start apt_install prometheus
apt_install vagrant
# Podman 4.3 (Depends: conmon, crun, containers-common, CNI plugins) and runc: crun 1.8
# refuses a v1 host whose cgroup2 mount offers a controller ("cgroups in hybrid mode not
# supported"), runc does not. No catatonit/tini: the test uses no --init. The package
# enables podman.service/.socket; they are not started.
without_service_start apt_install podman runc
# systemd-analyze (tests/unit/test_deploy_systemd.py verifies deploy/systemd
# offline; Debian ships it in the systemd package, present on most systems)
apt_install systemd
pip_install_project "[test]"

# Guest kernels: one fetch per kernel of the guest table (a second run finds
# them in the cache and downloads nothing).
for kernel in $("$VENV/bin/python" "$ROOT_DIR/tests/vm/harness.py" --kernels); do
    out=$(kernels_py fetch "$kernel") || exit 1
    say "guest kernel $kernel: $out"
done
say "test dependencies ready"
