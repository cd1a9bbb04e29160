"""Table 1-style report from one or more runs' ``summary.json``.

    python -m evaluation.report RUN_DIR [RUN_DIR ...] [--out report]

Prints a Markdown table and writes ``<out>.md`` and ``<out>.csv`` (default: ``report`` in the run
folder, or in the folder holding all the runs), with each run's settings (config.json) under the
table; incomplete runs are marked, and a run without summary.json is summarised from its item files.
Columns as in the paper's Table 1 (Editing-Mask part): method, seconds per edit, IoU (%),
C_m (%), C_non (%), rate; then the number of done items, and LPIPS / CLIPScore columns when a
summary has them. Summaries store fractions; the table prints IoU, C_m and C_non in percent
(one decimal), the rate with two decimals, seconds with one; missing values print as ``-``.
The method name is ``summary["method"]`` or, failing that, the run folder's name. A RUN_DIR
may also be the path of a summary.json itself.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["load_summary", "report_rows", "format_markdown", "write_report", "main"]

# (header, summary key, scale, decimals)
COLUMNS = [
    ("Method", "method", None, None),
    ("Time (s/edit)", "seconds", 1.0, 1),
    ("IoU (%)", "iou", 100.0, 1),
    ("C_m (%)", "c_m", 100.0, 1),
    ("C_non (%)", "c_non", 100.0, 1),
    ("rate", "rate", 1.0, 2),
    ("n", "n_done", None, None),
]
OPTIONAL_COLUMNS = [
    ("LPIPS", "lpips", 1.0, 3),
    ("CLIPScore", "clip_score", 1.0, 2),
]


def load_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's summary.json; without one (a run killed before writing it), its numbers are computed
    from the per-item files and the run is marked incomplete. config.json, when present, is `config`."""
    p = Path(run_dir)
    path = p if p.is_file() else p / "summary.json"
    folder = path.parent
    if path.is_file():
        summary = json.loads(path.read_text(encoding="utf-8"))
    elif folder.is_dir() and any(folder.glob("*/metrics.json")):
        from .runner import load_rows, summarize
        summary = {**summarize(load_rows(folder)), "complete": False, "no_summary": True}
        summary["n_done"] = summary["n_rows"]
    else:
        raise FileNotFoundError(f"no summary.json or item results in {run_dir}")
    cfg = folder / "config.json"
    if cfg.is_file():
        summary["config"] = json.loads(cfg.read_text(encoding="utf-8"))
    if not summary.get("method"):
        summary["method"] = folder.resolve().name
    if not summary.get("complete", True):
        n = summary.get("n_items")
        summary["method"] += f" (incomplete: {summary.get('n_done')}/{n if n is not None else '?'})"
    return summary


def settings_lines(summaries: Sequence[dict[str, Any]]) -> list[str]:
    """One Markdown bullet per run: models with revisions, dtype, every option, code commit."""
    out = []
    for s in summaries:
        cfg = s.get("config")
        if not cfg:
            out.append(f"- **{s['method']}**: no config.json (a run from before settings were recorded)")
            continue
        ident = cfg.get("identity", {})
        models = ", ".join(f"{role} {m['source']}" + (f"@{m['revision'][:10]}" if m.get("revision") else "")
                           for role, m in ident.get("models", {}).items())
        opts = " ".join(f"{k}={v}" for k, v in ident.get("options", {}).items())
        out.append(f"- **{s['method']}**: {models}; {ident.get('dtype')}; {opts}; list {ident.get('list', {}).get('file')}"
                   f"; code {cfg.get('code_commit') or 'unknown'}")
    return out


def _fmt(value: Any, scale: float | None, decimals: int | None) -> str:
    if value is None or value == "":
        return "-"
    if scale is None:
        return str(value)
    try:
        v = float(value) * scale
    except (TypeError, ValueError):
        return "-"
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.{decimals}f}"


def _columns(summaries: Sequence[dict[str, Any]]):
    cols = list(COLUMNS)
    for col in OPTIONAL_COLUMNS:
        if any(isinstance(s.get(col[1]), (int, float)) for s in summaries):
            cols.append(col)
    return cols


def report_rows(summaries: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """(header, formatted rows)."""
    cols = _columns(summaries)
    header = [c[0] for c in cols]
    rows = [[_fmt(s.get(key), scale, dec) for _, key, scale, dec in cols] for s in summaries]
    return header, rows


def format_markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            out.append(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(
        ("-" * (w + 2)) if i == 0 else ("-" * (w + 1) + ":") for i, w in enumerate(widths)
    ) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)]) + "\n"


def format_csv(summaries: Sequence[dict[str, Any]]) -> str:
    """Unformatted numbers (percent for IoU / C_m / C_non, like the table)."""
    cols = _columns(summaries)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c[1] if c[1] != "n_done" else "n" for c in cols])
    for s in summaries:
        row = []
        for _, key, scale, _dec in cols:
            v = s.get(key)
            if scale is not None and isinstance(v, (int, float)):
                v = float(v) * scale
            row.append("" if v is None else v)
        w.writerow(row)
    return buf.getvalue()


def default_out(run_dirs: Sequence[str | Path]) -> Path:
    """report in the run folder (one run), or in the folder that holds all the runs."""
    dirs = [Path(d).resolve() if Path(d).is_dir() else Path(d).resolve().parent for d in run_dirs]
    return (dirs[0] if len(dirs) == 1 else Path(os.path.commonpath(dirs))) / "report"


def write_report(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> str:
    """Load the summaries, write ``<out>.md`` and ``<out>.csv`` (default: `default_out`); return the table."""
    summaries = [load_summary(d) for d in run_dirs]
    header, rows = report_rows(summaries)
    table = format_markdown(header, rows)
    out = Path(out) if out is not None else default_out(run_dirs)
    out.parent.mkdir(parents=True, exist_ok=True)
    incomplete = [s["method"] for s in summaries if not s.get("complete", True)]
    md = (
        "# InstDiffEdit evaluation (Table 1 layout)\n\n"
        "IoU, C_m, C_non in percent; rate = mean C_m / mean C_non; time = mean seconds per edit "
        "as reported by each method.\n\n" + table
        + (f"\n**Incomplete runs** (their means cover the done items only): {', '.join(incomplete)}\n"
           if incomplete else "")
        + "\n## Settings\n\n" + "\n".join(settings_lines(summaries)) + "\n"
    )
    out.with_suffix(".md").write_text(md, encoding="utf-8")
    out.with_suffix(".csv").write_text(format_csv(summaries), encoding="utf-8")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m evaluation.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folder(s) with summary.json")
    ap.add_argument("--out", default=None, help="output path prefix: writes OUT.md and OUT.csv "
                    "(default: RUN_DIR/report for one run, else report in the folder holding the runs)")
    args = ap.parse_args(argv)
    try:
        table = write_report(args.run_dirs, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table, end="")
    out = Path(args.out) if args.out else default_out(args.run_dirs)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
