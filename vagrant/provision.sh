#!/usr/bin/env bash
# Runs inside the Vagrant VM as root: the project's own set-up, doctor, then
# `memcgscope validate` against this VM's kernel (the built-in scenarios).
set -euo pipefail
cd /memcgscope
bash scripts/setup.sh
.venv/bin/memcgscope doctor || true   # exit 1 only means no mode is usable; the table says why
# validate alone in a delegated scope: on cgroup v2 it may then enable the
# memory controller for its scratch cgroups (the provisioning shell's own
# session cgroup holds other processes)
mkdir -p /var/log/memcgscope
rc=0
systemd-run --scope --quiet -p Delegate=yes .venv/bin/memcgscope validate \
    --json > /var/log/memcgscope/validate.json || rc=$?
.venv/bin/memcgscope validate --recheck /var/log/memcgscope/validate.json || true   # the table
case $rc in
    0) echo "memcgscope validate: the model agrees with this kernel (report: /var/log/memcgscope/validate.json)" ;;
    1) echo "memcgscope validate: disagreements above; see README 'Validate the model against your kernel'" ;;
    *) echo "memcgscope validate: could not run (exit $rc); see the message above" ;;
esac
