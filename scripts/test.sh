#!/usr/bin/env bash
# The whole test suite: installs what the tests need (scripts/setup-tests.sh),
# then runs the three tiers in order and prints the time of each.
#   unit  no root; the model, parsing, doctor's logic over captured files
#   host  root; this machine's kernel (tracepoint mode, cgroupfs)
#   vm    root; the Debian guest kernels of tests/vm/harness.py GUESTS (5.10, 6.1,
#         6.12, 6.18, 7.3; v1 and v2 where the kernel has them) under QEMU
# A tier that cannot run fails; none is skipped. Exit 0 only if all pass.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
"$ROOT_DIR/scripts/setup-tests.sh" || exit 1
cd "$ROOT_DIR"
export MEMCGSCOPE_ARTIFACTS=${MEMCGSCOPE_ARTIFACTS:-/tmp/memcgscope-artifacts}
rm -rf "$MEMCGSCOPE_ARTIFACTS"; mkdir -p "$MEMCGSCOPE_ARTIFACTS"
tiers=${MEMCGSCOPE_TIERS:-"unit host vm"}
failed=0
summary=""
for tier in $tiers; do
    start=$(date +%s)
    echo "=== tier $tier ===" >&2
    "$VENV/bin/python" -m pytest "tests/$tier" -p no:cacheprovider -q -rfEs \
        --junitxml="$MEMCGSCOPE_ARTIFACTS/junit-$tier.xml"
    rc=$?
    secs=$(( $(date +%s) - start ))
    # pytest exits 5 when it collected nothing: a tier that ran no test has failed
    [ "$rc" -ne 0 ] && failed=1
    summary="$summary
tier $tier: exit $rc in ${secs}s"
done
echo "=== summary ===$summary" >&2
"$VENV/bin/python" - "$MEMCGSCOPE_ARTIFACTS" $tiers <<'PY'
import sys, xml.etree.ElementTree as ET
passed = failed = skipped = 0
for tier in sys.argv[2:]:
    try:
        root = ET.parse(f"{sys.argv[1]}/junit-{tier}.xml").getroot()
    except (OSError, ET.ParseError):
        failed += 1
        continue
    for suite in root.iter("testsuite"):
        t, f, e, s = (int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
        passed += t - f - e - s; failed += f + e; skipped += s
print(f"{passed} passed, {failed} failed, {skipped} skipped")
# a skipped test is not a pass here (docs/architecture.md, Tests)
sys.exit(1 if failed or skipped else 0)
PY
[ $? -ne 0 ] && failed=1
exit $failed
