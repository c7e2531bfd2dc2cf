#!/bin/sh
# Installs memcgscope.service for this checkout, as root:
#   /etc/systemd/system/memcgscope.service  (ExecStart pointed at this checkout)
#   /etc/default/memcgscope                 (flags; kept if it exists)
#   /etc/memcgscope/web.yml                 (TLS and basic auth; kept if it exists)
# then reloads systemd. It neither enables nor starts the service.
# Run scripts/setup.sh first: it creates the .venv that ExecStart runs.
set -eu

usage() {
    cat <<EOF
usage: deploy/systemd/install.sh [--bin PATH] [--print]
  --bin PATH   the memcgscope executable ExecStart runs (default: CHECKOUT/.venv/bin/memcgscope)
  --print      print the unit as it would be installed, and exit (no root needed)
EOF
}

die() { printf 'memcgscope install: error: %s\n' "$*" >&2; exit 1; }
say() { printf 'memcgscope install: %s\n' "$*" >&2; }

here=$(cd "$(dirname "$0")" && pwd)
checkout=$(cd "$here/../.." && pwd)
bin="$checkout/.venv/bin/memcgscope"
print=0
while [ $# -gt 0 ]; do
    case $1 in
        --bin) [ $# -ge 2 ] || die "--bin needs a path"; bin=$2; shift 2 ;;
        --print) print=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument '$1'; see --help" ;;
    esac
done

case $bin in
    /*) ;;
    *) die "--bin $bin: give an absolute path (ExecStart needs one)" ;;
esac
case "$bin$checkout" in
    *'|'*|*' '*) die "$bin: a path with '|' or a space cannot go into ExecStart here; move the checkout" ;;
esac
[ -x "$bin" ] || die "$bin is not executable; run scripts/setup.sh (it creates $checkout/.venv) or give --bin PATH"

# ProtectHome=yes hides /home and /root from the service: where the
# executable, its interpreter or the checkout live there, make it read-only
python=$(readlink -f "$(dirname "$bin")/python3" 2>/dev/null || true)
protect_home=yes
for p in "$bin" "$checkout" "$python"; do
    case $p in /home/*|/root/*) protect_home=read-only ;; esac
done

render() {
    sed -e "s|^ExecStart=/opt/memcgscope/.venv/bin/memcgscope |ExecStart=$bin |" \
        -e "s|^Documentation=file:///opt/memcgscope/|Documentation=file://$checkout/|" \
        -e "s|^ProtectHome=yes\$|ProtectHome=$protect_home|" \
        "$here/memcgscope.service"
}

if [ "$print" -eq 1 ]; then
    render
    exit 0
fi

[ "$(id -u)" -eq 0 ] || die "must run as root (it writes /etc/systemd/system); rerun with sudo, or --print to see the unit"
unit=/etc/systemd/system/memcgscope.service
tmp=$(mktemp "$unit.XXXXXX")
render >"$tmp"
chmod 0644 "$tmp"
mv "$tmp" "$unit"
say "installed $unit (ExecStart=$bin, ProtectHome=$protect_home)"
if [ ! -e /etc/default/memcgscope ]; then
    install -D -m 0644 "$here/memcgscope.default" /etc/default/memcgscope
    say "installed /etc/default/memcgscope (flags: MEMCGSCOPE_ARGS)"
else
    say "kept /etc/default/memcgscope"
fi
if [ ! -e /etc/memcgscope/web.yml ]; then
    install -d -m 0700 /etc/memcgscope
    install -m 0600 "$here/web.yml" /etc/memcgscope/web.yml
    say "installed /etc/memcgscope/web.yml (empty: plain HTTP, no auth; edit it for TLS and basic auth)"
else
    say "kept /etc/memcgscope/web.yml"
fi
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload
    say "next: systemctl enable --now memcgscope; then curl http://127.0.0.1:10064/-/healthy"
else
    say "systemd is not running here; the unit is in place for when it is"
fi
