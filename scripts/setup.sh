#!/usr/bin/env bash
# Installs what memcgscope needs to run on Debian 12 / Ubuntu, as root:
# bcc from the distribution, kernel headers for bcc (downloaded into
# /var/cache/memcgscope, never installed as a package: collector/kernels.py)
# and a virtual environment at .venv that sees bcc.
# Idempotent: a second run checks, installs nothing, and takes seconds.
#   --vm  also what `memcgscope validate --vm` needs: QEMU, a static busybox,
#         kmod, udev (virtme-ng's guest init runs the host's udevd for the
#         command's I/O) and virtme-ng in the venv
set -euo pipefail
. "$(dirname "$0")/lib.sh"
vm=0
for arg in "$@"; do
    case $arg in
        --vm) vm=1 ;;
        *) die "setup.sh: unknown option $arg; use --vm (or nothing)" ;;
    esac
done
need_root
apt_install python3-bpfcc bpfcc-tools bpftool python3-venv
ensure_kernel_headers
ensure_venv
if [ "$vm" = 1 ]; then
    without_service_start apt_install udev
    apt_install qemu-system-x86 busybox-static kmod
    pip_install_project "[vm]"
else
    pip_install_project ""
fi
note_old_backports
say "ready: $VENV/bin/memcgscope"
