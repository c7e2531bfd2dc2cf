#!/usr/bin/env python3
"""Bring a VM tier run's artifacts into the unit tier's data: for each
guest directory under ARTIFACTS (tests/vm/conftest.py copies every guest's
share there):

  <guest>/probes-<mode>.json -> recordings/matrix/<guest>-<mode>.jsonl (recordings/make.py)
  <guest>/validate.json      -> validate/<guest>.json (the facts and, per scenario,
                                its source and kernel side: what --recheck needs)
  <guest>/capture/           -> sysroots/<guest>/ (doctor's captured files)

    python tests/unit/data/import_vm.py /tmp/memcgscope-artifacts [GUEST ...]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "recordings"))

import make  # noqa: E402

KEEP = ("kernel", "kernel_version", "upstream", "profile", "profile_reason", "mode", "facts")


def trim_report(doc: dict) -> dict:
    out = {k: doc.get(k) for k in KEEP}
    out["scenarios"] = [{k: s.get(k) for k in ("scenario", "verdict", "not_applicable", "source", "kernel_side")}
                        for s in doc["scenarios"]]
    return out


def main(argv: list[str]) -> int:
    root = Path(argv[0])
    guests = argv[1:] or sorted(p.name for p in root.iterdir() if (p / "steps.json").exists())
    for g in guests:
        d = root / g
        for mode in ("kprobe", "fentry"):
            art = d / f"probes-{mode}.json"
            if art.exists():
                out = HERE / "recordings" / "matrix" / f"{g}-{mode}.jsonl"
                out.parent.mkdir(exist_ok=True)
                out.write_text(make.convert(art, None, 8))
                print(f"{out.relative_to(HERE)}: {out.stat().st_size} bytes")
        if (d / "validate.json").exists():
            out = HERE / "validate" / f"{g}.json"
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(trim_report(json.loads((d / "validate.json").read_text())), indent=1) + "\n")
            print(f"{out.relative_to(HERE)}: {out.stat().st_size} bytes")
        if (d / "capture").is_dir():
            dest = HERE / "sysroots" / g
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(d / "capture", dest)
            print(f"sysroots/{g}/")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
