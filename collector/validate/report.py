"""The validate report: a table in 80 columns, or JSON."""

from __future__ import annotations

import json

__all__ = ["format_table", "to_json", "reports_from_json", "WIDTHS"]

#: scenario, field, kernel, model, tolerance, verdict (+ 5 separating spaces = 80)
WIDTHS = (14, 27, 9, 9, 8, 8)


def _cell(value, width: int) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, str):
        text = value.strip().replace("\n", "; ") or '""'
    else:
        text = str(value)
    return text if len(text) <= width else text[:width - 1] + "…"


def _line(cells) -> str:
    return " ".join(_cell(c, w).ljust(w) for c, w in zip(cells, WIDTHS)).rstrip()


def format_table(reports, header: str = "") -> str:
    out = []
    if header:
        out.append(header)
    out.append(_line(("SCENARIO", "FIELD", "KERNEL", "MODEL", "TOL", "VERDICT")))
    notes = []
    for rep in reports:
        short = rep.name.removesuffix(".toml")
        if rep.verdict in ("n/a", "error"):
            why = rep.not_applicable or rep.error
            out.append(_line((short, "-", "-", "-", "-", rep.verdict)))
            notes.append(f"{short}: {'not applicable' if rep.verdict == 'n/a' else 'error'}: {why}")
            continue
        for row in rep.rows:
            # "memory." is on every control file: left out here, kept in --json
            shown = row.field.replace(" memory.", " ")
            out.append(_line((short, shown, row.kernel, row.model, row.tolerance.describe(), row.verdict)))
            if row.verdict == "disagree":
                notes.append(f"{short}: {row.field}: kernel {row.kernel!r}, model {row.model!r}, tolerance "
                             f"{row.tolerance.describe()} ({row.tolerance.why})"
                             + (f"; {row.note}" if row.note else ""))
        for check, reason, detail in rep.divergences[:5]:
            notes.append(f"{short}: divergence {check}/{reason}: {detail}")
    counts = {}
    for rep in reports:
        counts[rep.verdict] = counts.get(rep.verdict, 0) + 1
    out.append("")
    out.append("scenarios: " + ", ".join(f"{n} {v}" for v, n in sorted(counts.items())))
    if notes:
        out.append("")
        out.extend(_wrap(n) for n in notes)
    return "\n".join(out)


def _wrap(text: str, width: int = 80) -> str:
    import textwrap
    return "\n".join(textwrap.wrap(text, width=width, subsequent_indent="    "))


def to_json(reports, facts: dict) -> str:
    return json.dumps({**facts, "scenarios": [r.to_json() for r in reports],
                       "agree": all(r.verdict in ("agree", "n/a") for r in reports)}, indent=1)


class _Tol:
    def __init__(self, text: str, why: str):
        self.text, self.why = text, why

    def describe(self) -> str:
        return self.text


def reports_from_json(doc: dict) -> list:
    """ScenarioReports back from validate's JSON (a guest's report)."""
    from .compare import Row
    from .suite import ScenarioReport
    out = []
    for s in doc.get("scenarios", []):
        rep = ScenarioReport(s["scenario"], s.get("description", ""), not_applicable=s.get("not_applicable"),
                             error=s.get("error"))
        rep.rows = [Row(s["scenario"], r["field"], r["kernel"], r["model"], _Tol(r["tolerance"], r.get("why", "")),
                        r["verdict"], r.get("note", "")) for r in s.get("rows", [])]
        rep.divergences = [(d["check"], d["reason"], d["detail"]) for d in s.get("divergences", [])]
        out.append(rep)
    return out
