# Shared helpers for setup.sh and test.sh. Sourced, not run.
# Every install step checks first, so a second run installs nothing.

ROOT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT_DIR/.venv"
CACHE_DIR=${MEMCGSCOPE_CACHE:-/var/cache/memcgscope}
BACKPORTS_LIST=/etc/apt/sources.list.d/memcgscope-bookworm-backports.list
APT_UPDATED=0

say() { printf 'memcgscope setup: %s\n' "$*" >&2; }
die() { printf 'memcgscope setup: error: %s\n' "$*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" -eq 0 ] || die "must run as root (it installs Debian packages); rerun with sudo"
}

os_codename() { . /etc/os-release && printf '%s' "${VERSION_CODENAME:-}"; }

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
# A name may carry "/suite" (e.g. pkg/bookworm-backports) to take one
# package from that suite without -t, which would upgrade others too.
apt_install() {
    local missing=() p
    for p in "$@"; do
        pkg_installed "${p%%/*}" || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    apt_update_once
    say "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}" >&2 || die "apt-get install ${missing[*]} failed"
}

pkg_available() {
    apt_update_once
    apt-cache show "$1" >/dev/null 2>&1
}

ensure_backports() {
    [ "$(os_codename)" = bookworm ] || return 0
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        say "adding bookworm-backports to $BACKPORTS_LIST (used only per package, never with -t)"
        echo 'deb http://deb.debian.org/debian bookworm-backports main' >"$BACKPORTS_LIST"
        APT_UPDATED=0
    fi
}

# newest_pkg REGEX [SUITE]: the newest package name matching REGEX.
newest_pkg() {
    apt_update_once
    apt-cache pkgnames | grep -E "$1" | sort -V | tail -n 1
}

# Kernel headers for bcc: the matching package when the distribution has
# one, else the nearest Debian headers as one merged tree of symlinks in
# $CACHE_DIR/kheaders/<release> (real-kernels.md §3). /lib/modules is
# never written.
ensure_kernel_headers() {
    local rel; rel=$(uname -r)
    [ -e "/lib/modules/$rel/build/include" ] && { say "kernel headers: matching ($rel)"; return 0; }
    local tree="$CACHE_DIR/kheaders/$rel"
    if [ -f "$tree/.memcgscope-source" ]; then
        say "kernel headers: fallback tree $tree ($(cat "$tree/.memcgscope-source"))"
        return 0
    fi
    if pkg_available "linux-headers-$rel"; then
        apt_install "linux-headers-$rel"
        return 0
    fi
    ensure_backports
    apt_update_once
    local best
    best=$(nearest_headers "$rel") || die "no Debian kernel headers near $rel; install headers for $rel and rerun"
    local arch_pkg=${best%%/*} suite=""
    [[ "$best" == */* ]] && suite="/${best#*/}"
    local common_pkg
    common_pkg=$(apt-cache depends "$arch_pkg" 2>/dev/null | awk '/Depends: linux-headers-.*-common/{print $2; exit}')
    [ -n "$common_pkg" ] || die "cannot find the -common package of $arch_pkg"
    apt_install "$arch_pkg$suite" "$common_pkg$suite"
    local ver=${arch_pkg#linux-headers-}
    local common_dir="/usr/src/${common_pkg}" arch_dir="/usr/src/linux-headers-$ver"
    [ -d "$common_dir" ] && [ -d "$arch_dir" ] || die "expected $common_dir and $arch_dir after installing $arch_pkg"
    say "kernel headers: no package for $rel; merging $arch_pkg into $tree"
    rm -rf "$tree.tmp"; mkdir -p "$tree.tmp"
    cp -rs "$common_dir/." "$tree.tmp/"
    cp -rsf "$arch_dir/." "$tree.tmp/"
    echo "$arch_pkg" >"$tree.tmp/.memcgscope-source"
    rm -rf "$tree"; mv "$tree.tmp" "$tree"
}

# nearest_headers RELEASE: the linux-headers-*-amd64 package whose version
# is closest to RELEASE, preferring versions at or below it.
nearest_headers() {
    local rel=$1 want
    want=$(printf '%s' "$rel" | grep -oE '^[0-9]+\.[0-9]+')
    apt-cache pkgnames linux-headers- \
        | grep -E '^linux-headers-[0-9]+\.[0-9]+[^ ]*-amd64$' \
        | grep -vE -- '-(rt|cloud)-amd64$' \
        | while read -r p; do
            v=$(printf '%s' "${p#linux-headers-}" | grep -oE '^[0-9]+\.[0-9]+')
            # distance in minor versions; versions above the running one cost extra
            awk -v a="$want" -v b="$v" -v p="$p" 'BEGIN{
                split(a,x,"."); split(b,y,".");
                d=(x[1]*100+x[2])-(y[1]*100+y[2]); if (d<0) d=-d*2+1;
                printf "%06d %s\n", d, p }'
          done | sort -k1,1n -k2,2Vr | awk 'NR==1{print $2}' \
        | { read -r p || exit 1; printf '%s' "$p"; }
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
