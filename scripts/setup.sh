#!/usr/bin/env bash
# Installs what memcgscope needs to run on Debian 12 / Ubuntu, as root:
# bcc from the distribution, kernel headers (matching, or the nearest as a
# merged tree), and a virtual environment at .venv that sees bcc.
# Idempotent: a second run checks, installs nothing, and takes seconds.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
need_root
apt_install python3-bpfcc bpfcc-tools bpftool python3-venv
ensure_kernel_headers
ensure_venv
pip_install_project ""
say "ready: $VENV/bin/memcgscope"
