# Shared helpers for setup.sh and test.sh. Sourced, not run.
# Every install step checks first, so a second run installs nothing.

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT_DIR/.venv"
CACHE_DIR=${MEMCGSCOPE_CACHE:-/var/cache/memcgscope}
OLD_BACKPORTS_LIST=/etc/apt/sources.list.d/memcgscope-bookworm-backports.list
APT_UPDATED=0

say() { printf 'memcgscope setup: %s\n' "$*" >&2; }
die() { printf 'memcgscope setup: error: %s\n' "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it installs Debian packages); rerun with sudo"
}

apt_update_once() {
    if [ "$APT_UPDATED" -eq 0 ]; then
        say "apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed; check the network and /etc/apt/sources.list"
        APT_UPDATED=1
    fi
}

pkg_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

# apt_install PKG... installs only the packages not yet installed.
apt_install() {
    local missing=() p
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    apt_update_once
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
}

# kernels_py ARGS: collector/kernels.py with the system interpreter, so it
# works before .venv exists. It fetches Debian kernels and headers into
# $CACHE_DIR without installing them (no linux-image/linux-headers package,
# nothing in /boot, /lib/modules or /etc/apt).
kernels_py() {
    MEMCGSCOPE_CACHE="$CACHE_DIR" /usr/bin/python3 "$ROOT_DIR/collector/kernels.py" "$@"
}

# Kernel headers for bcc: the headers installed for the running kernel if
# any, else Debian's matching headers, or the nearest ones, downloaded and
# unpacked into $CACHE_DIR and merged into $CACHE_DIR/kheaders/<release>
# (its .memcgscope-source names the package; probes/detect.py reads it).
ensure_kernel_headers() {
    local out
    out=$(kernels_py host-headers) || exit 1
    say "kernel headers for $(uname -r): $out"
}

# Older versions of setup.sh added bookworm-backports to /etc/apt for the
# header packages they installed. Nothing proves a file of that name is
# ours alone, and other software may rely on the suite: say so, leave it.
note_old_backports() {
    [ -e "$OLD_BACKPORTS_LIST" ] || return 0
    say "note: $OLD_BACKPORTS_LIST (from an older memcgscope setup.sh) is no longer used by memcgscope;" \
        "it was left alone: remove it yourself if nothing else needs bookworm-backports"
}

# without_service_start CMD...: runs CMD (a package install) with a
# policy-rc.d that keeps the packages' services from starting; removed
# again even when CMD dies.
without_service_start() {
    local policy=/usr/sbin/policy-rc.d
    if [ -e "$policy" ]; then "$@"; return; fi
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    "$@"
    rm -f "$policy"; trap - EXIT
}

ensure_venv() {
    [ -x /usr/bin/python3 ] || die "/usr/bin/python3 is missing; apt-get install python3"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV from /usr/bin/python3 with --system-site-packages (bcc is a system package)"
        /usr/bin/python3 -m venv --system-site-packages "$VENV" >&2 || die "python3 -m venv failed; apt-get install python3-venv"
    fi
}

# pip_install_project EXTRAS: installs the project (editable) when
# pyproject.toml changed since the last install.
pip_install_project() {
    local extras=$1 stamp="$VENV/.memcgscope-installed$1" sum
    sum=$(cat "$ROOT_DIR/pyproject.toml" | sha256sum | cut -d' ' -f1)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$sum" ]; then
        return 0
    fi
    say "pip install -e .$extras into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT_DIR$extras" >&2 \
        || die "pip install of the project failed"
    echo "$sum" >"$stamp"
}
