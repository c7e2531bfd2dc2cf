#!/usr/bin/env bash
# Runs inside the Vagrant VM as root: the project's own set-up, then doctor.
set -euo pipefail
cd /memcgscope
bash scripts/setup.sh
.venv/bin/memcgscope doctor || true   # exit 1 only means no mode is usable; the table says why
