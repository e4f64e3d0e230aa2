"""The report (DESIGN §8): every executed notebook rendered to self-contained HTML beside it,
and `<root>/index.html`, one row per run, read from the run records (summary.json).

Plotly figures need no network: the notebooks call `cbcore.plots.setup_plotly()`, whose
"notebook" renderer puts plotly.js in the notebook's outputs, and nbconvert copies outputs
into the HTML. The index page is plain HTML with inline CSS. `cbcore status` prints the
same rows in the terminal.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import nbformat

from cbcore.params import NOTEBOOKS
from cbcore.records import read_summary
from cbcore.runner import ANALYSES, notebook_error

MAX_KEYS = 6  # final metrics shown per method; the rest are in the cell's tooltip


class ReportError(RuntimeError):
    """Nothing to report (no runs under the root)."""


@dataclass
class RunRow:
    """One run directory, as its record describes it."""

    experiment: str
    profile: str
    seed: int
    run_dir: Path
    status: str  # summary.json status, or "incomplete" (no summary.json yet)
    finals: dict[str, dict[str, float]] = field(default_factory=dict)  # method -> key -> value
    diverged: list[str] = field(default_factory=list)  # methods with status "diverged"
    error: str | None = None
    wall_s: float | None = None
    notebook: Path | None = None

    @property
    def flagged(self) -> bool:
        return self.status != "completed" or bool(self.diverged)

    @property
    def status_text(self) -> str:
        return self.status + (f", diverged: {', '.join(self.diverged)}" if self.diverged else "")


@dataclass
class AnalysisRow:
    """An analysis notebook (summary per experiment, diagnostics per seed)."""

    experiment: str
    profile: str
    seed: int | None  # None: the whole experiment
    notebook: Path
    status: str
    error: str | None = None

    @property
    def flagged(self) -> bool:
        return self.status != "completed"


def _number(v: object) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.lower() in ("nan", "inf", "-inf"):
        return float(v)  # records write non-finite floats as strings
    return None


def finals_of(summary: dict) -> dict[str, dict[str, float]]:
    """Numeric final values per method (and the run's own `final`, as "run")."""
    out = {}
    sources = {"run": summary.get("final")} | {
        name: m.get("final")
        for name, m in (summary.get("methods") or {}).items()
        if isinstance(m, dict)
    }
    for name, final in sources.items():
        if isinstance(final, dict):
            nums = {k: n for k, v in final.items() if (n := _number(v)) is not None}
            if nums:
                out[name] = nums
    return out


def _seed(run_dir: Path) -> int | None:
    m = re.fullmatch(r"seed(-?\d+)", run_dir.name)
    return int(m.group(1)) if m else None


def collect_runs(root: str | Path) -> list[RunRow]:
    """Every `<root>/<experiment>/<profile>/seed<k>/` directory, sorted."""
    rows = []
    for d in Path(root).glob("*/*/seed*"):
        seed = _seed(d)
        if seed is None or not d.is_dir():
            continue
        experiment, profile = d.parent.parent.name, d.parent.name
        try:
            summary = read_summary(d)
        except (OSError, json.JSONDecodeError) as e:
            summary = {"status": "unreadable", "error": f"summary.json: {e}"}
        summary = summary or {
            "status": "incomplete",
            "error": "no summary.json: still running, or stopped before its end",
        }
        methods = summary.get("methods") or {}
        nb = d / NOTEBOOKS.get(experiment, f"{experiment}.ipynb")
        rows.append(
            RunRow(
                experiment=experiment,
                profile=profile,
                seed=seed,
                run_dir=d,
                status=str(summary.get("status")),
                finals=finals_of(summary),
                diverged=[
                    n
                    for n, m in methods.items()
                    if isinstance(m, dict) and m.get("status") == "diverged"
                ],
                error=summary.get("error"),
                wall_s=_number(summary.get("wall_s")),
                notebook=nb if nb.exists() else None,
            )
        )
    return sorted(rows, key=lambda r: (r.experiment, r.profile, r.seed))


def notebook_status(path: Path) -> tuple[str, str | None]:
    """completed, failed (an error output) or incomplete (cells papermill never finished)."""
    err = notebook_error(path)
    if err is not None:
        return "failed", err[0]
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as e:
        return "unreadable", str(e)
    pending = [
        c
        for c in nb.cells
        if c.get("metadata", {}).get("papermill", {}).get("status") in ("pending", "running")
    ]
    return ("incomplete", f"{len(pending)} cells did not run") if pending else ("completed", None)


def collect_analyses(root: str | Path) -> list[AnalysisRow]:
    rows = []
    for a in ANALYSES:
        pattern = f"*/*/{a.notebook}" if a.per == "experiment" else f"*/*/seed*/{a.notebook}"
        for nb in Path(root).glob(pattern):
            seed = _seed(nb.parent) if a.per == "seed" else None
            exp_dir = nb.parent if a.per == "experiment" else nb.parent.parent
            rows.append(
                AnalysisRow(exp_dir.parent.name, exp_dir.name, seed, nb, *notebook_status(nb))
            )
    return sorted(
        rows,
        key=lambda r: (r.experiment, r.profile, r.seed is not None, r.seed or 0, r.notebook.name),
    )


# ---------------------------------------------------------------- rendering


def make_exporter():
    from nbconvert import HTMLExporter

    return HTMLExporter(template_name="lab", embed_images=True)


def render_notebook(nb: Path, exporter=None) -> tuple[Path, bool]:
    """Render nb to nb.html (skipped if that is newer). Returns (path, rendered now)."""
    out = nb.with_suffix(".html")
    if out.exists() and out.stat().st_mtime >= nb.stat().st_mtime:
        return out, False
    body, _ = (exporter or make_exporter()).from_filename(str(nb))
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(out)
    return out, True


# ---------------------------------------------------------------- tables


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def fmt_wall(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) else str(v)


def metric_text(values: dict[str, float], limit: int | None = MAX_KEYS) -> str:
    """`key value, key value` (the first `limit` of them), compactly; per-layer keys
    (`cos/layer_03`) go after the aggregates, so a row shows `cos/mean` before layer 0."""
    items = sorted(values.items(), key=lambda kv: "/layer_" in kv[0])  # stable
    shown = items if limit is None else items[:limit]
    text = ", ".join(f"{k} {fmt(v)}" for k, v in shown)
    return text + (f", … +{len(items) - len(shown)}" if len(shown) < len(items) else "")


def status_table(root: str | Path) -> str:
    """The index's rows as terminal text; flagged rows start with `!`."""
    rows, analyses = collect_runs(root), collect_analyses(root)
    if not rows and not analyses:
        return f"no runs under {root} (cbcore run EXPERIMENT --seeds ... writes them)"
    table = [["", "experiment", "profile", "seed", "status", "wall", "final"]]
    for r in rows:
        table.append(
            [
                "!" if r.flagged else "",
                r.experiment,
                r.profile,
                str(r.seed),
                r.status_text,
                fmt_wall(r.wall_s),
                " | ".join(f"{m}: {metric_text(v, 3)}" for m, v in r.finals.items()) or "-",
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    n_bad = sum(r.flagged for r in rows)
    out = [f"{plural(len(rows), 'run')} under {root}" + (f", {n_bad} flagged (!)" if n_bad else "")]
    for i, row in enumerate(table):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        r = rows[i - 1] if i else None
        if r is not None and r.flagged and r.error:
            out.append(" " * (widths[0] + 2) + r.error.splitlines()[0])
    if analyses:
        out.append("analysis notebooks:")
        for a in analyses:
            where = f"{a.experiment}/{a.profile}" + (f"/seed{a.seed}" if a.seed is not None else "")
            out.append(
                f"{'!' if a.flagged else ' '} {where}/{a.notebook.name}  {a.status}"
                + (f": {a.error}" if a.error else "")
            )
    return "\n".join(out)


def print_status(root: str | Path, say: Callable[[str], None] = print) -> int:
    say(status_table(root))
    return 0


CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.5em; } .meta { color: #666; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.metrics div { white-space: nowrap; font-variant-numeric: tabular-nums; }
.metrics b { display: inline-block; min-width: 7em; }
tr.flagged { background: #fdecea; } tr.flagged .status { color: #b3261e; font-weight: bold; }
.status .error { font-weight: normal; font-size: 0.9em; white-space: pre-wrap; max-width: 40em; }
.missing { color: #999; }
"""


def _link(target: Path | None, root: Path, label: str) -> str:
    if target is None or not target.exists():
        return f'<span class="missing">{html.escape(label)}: none</span>'
    href = quote(Path(os.path.relpath(target, root)).as_posix())
    return f'<a href="{href}">{html.escape(label)}</a>'


def index_html(
    root: Path, rows: list[RunRow], analyses: list[AnalysisRow], problems: dict[Path, str]
) -> str:
    e = html.escape
    body = []
    for r in rows:
        cls = "run flagged" if r.flagged else "run"
        status = e(r.status_text) + (
            f'<div class="error">{e(r.error)}</div>' if r.error and r.flagged else ""
        )
        metrics = "".join(
            f'<div title="{e(metric_text(v, None))}"><b>{e(m)}</b> {e(metric_text(v))}</div>'
            for m, v in r.finals.items()
        )
        html_nb = r.notebook.with_suffix(".html") if r.notebook else None
        links = [
            _link(html_nb, root, "notebook"),
            _link(r.run_dir / "summary.json", root, "summary"),
        ]
        if r.notebook in problems:
            links.append(f'<span class="error">render failed: {e(problems[r.notebook])}</span>')
        body.append(
            f'<tr class="{cls}" data-run="{e(r.experiment)}/{e(r.profile)}/seed{r.seed}" '
            f'data-status="{e(r.status_text)}">'
            f"<td>{e(r.experiment)}</td><td>{e(r.profile)}</td><td class=num>{r.seed}</td>"
            f'<td class="status">{status}</td><td class="metrics">{metrics or "–"}</td>'
            f'<td class="num">{fmt_wall(r.wall_s)}</td><td>{" · ".join(links)}</td></tr>'
        )
    ana = []
    for a in analyses:
        cls = "analysis flagged" if a.flagged else "analysis"
        status = e(a.status) + (f'<div class="error">{e(a.error)}</div>' if a.error else "")
        ana.append(
            f'<tr class="{cls}"><td>{e(a.experiment)}</td><td>{e(a.profile)}</td>'
            f"<td class=num>{'all' if a.seed is None else a.seed}</td><td>{e(a.notebook.stem)}</td>"
            f'<td class="status">{status}</td>'
            f"<td>{_link(a.notebook.with_suffix('.html'), root, 'notebook')}</td></tr>"
        )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.status] = counts.get(r.status, 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    n_flag = sum(r.flagged for r in rows)
    analysis_section = (
        (
            "<h2>Analysis notebooks</h2><table><thead><tr><th>experiment</th><th>profile</th>"
            "<th>seed</th><th>notebook</th><th>status</th><th>link</th></tr></thead><tbody>"
            + "".join(ana)
            + "</tbody></table>"
        )
        if ana
        else ""
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>cbcore report</title>
<style>{CSS}</style></head><body>
<h1>cbcore report</h1>
<p class="meta">{plural(len(rows), "run")} ({e(summary)}){f", {n_flag} flagged" if n_flag else ""} ·
root {e(str(root))} · written {time.strftime("%Y-%m-%d %H:%M")}</p>
<h2>Runs</h2>
<table><thead><tr><th>experiment</th><th>profile</th><th>seed</th><th>status</th>
<th>final metrics (per method)</th><th>wall</th><th>links</th></tr></thead><tbody>
{"".join(body)}
</tbody></table>
{analysis_section}
</body></html>
"""


def build_report(root: str | Path = "executed", say: Callable[[str], None] = print) -> int:
    """Render every executed notebook under root and write root/index.html. Returns 1 if a
    notebook failed to render, else 0."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise ReportError(
            f"{root}: no such directory; run `cbcore run EXPERIMENT` first, or pass --root"
        )
    rows, analyses = collect_runs(root), collect_analyses(root)
    if not rows and not analyses:
        raise ReportError(f"{root}: no runs (expected <experiment>/<profile>/seed<k>/ directories)")
    exporter = make_exporter()
    problems: dict[Path, str] = {}
    for nb in [r.notebook for r in rows if r.notebook] + [a.notebook for a in analyses]:
        t0 = time.time()
        try:
            out, fresh = render_notebook(nb, exporter)
        except Exception as ex:  # one broken notebook must not hide the others
            problems[nb] = f"{type(ex).__name__}: {ex}"
            say(f"render failed  {nb.relative_to(root)}: {problems[nb]}")
            continue
        if fresh:
            say(f"rendered {out.relative_to(root)}  in {time.time() - t0:.1f} s")
    index = root / "index.html"
    index.write_text(index_html(root, rows, analyses, problems), encoding="utf-8")
    say(f"wrote {index}: {plural(len(rows), 'run')}, {plural(len(analyses), 'analysis notebook')}")
    return 1 if problems else 0
