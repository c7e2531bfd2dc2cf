#!/usr/bin/env bash
# Installs what memcgscope needs to run on Debian 12 / Ubuntu, as root:
# bcc from the distribution, kernel headers for bcc (downloaded into
# /var/cache/memcgscope, never installed as a package: collector/kernels.py)
# and a virtual environment at .venv that sees bcc.
# Idempotent: a second run checks, installs nothing, and takes seconds.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
apt_install python3-bpfcc bpfcc-tools bpftool python3-venv
ensure_kernel_headers
ensure_venv
pip_install_project ""
note_old_backports
say "ready: $VENV/bin/memcgscope"
