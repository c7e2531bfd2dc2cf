"""Runs inside a guest (tests/vm): `memcgscope validate -- CMD` on a
command that OOMs in its limit and on one that fits.

    python3 guest_command.py OUT.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

BIN = os.path.dirname(sys.executable)
TOUCH = "import mmap, sys; n = int(sys.argv[1]) << 20; m = mmap.mmap(-1, n); [m.__setitem__(o, 1) for o in range(0, n, 4096)]"
PARENT = "/run/memcg-v1" if os.path.ismount("/run/memcg-v1") else "/sys/fs/cgroup"


def validate(limit: str, mib: int) -> dict:
    r = subprocess.run([f"{BIN}/memcgscope", "validate", "--json", "--parent", PARENT, "--memory-max", limit, "--",
                        sys.executable, "-c", TOUCH, str(mib)], capture_output=True, text=True, timeout=600)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        doc = None
    return {"returncode": r.returncode, "report": doc, "stderr": r.stderr[-2000:]}


def main() -> int:
    out = {"oom": validate("30M", 100), "fits": validate("64M", 16)}
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
    print(f"command: oom exit {out['oom']['returncode']}, fits exit {out['fits']['returncode']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
