"""`cbcore report` and `cbcore status` on runs made by the runner from the fixture notebook:
seed 1 fails, seed 3 has a diverged method, seed 4 completes with a plotly figure, and
seed 7 is a run directory that never finished."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from urllib.parse import unquote

import pytest

from cbcore import runner
from cbcore.cli import main
from cbcore.records import run_dir_for
from cbcore.report import build_report, finals_of

FIXTURES = Path(__file__).parent / "nb_fixtures"
ROW = re.compile(
    r'<tr class="(run[^"]*)" data-run="([^"]+)" data-status="([^"]*)">(.*?)</tr>', re.S
)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("report")
    nbs = tmp / "notebooks"
    nbs.mkdir()
    shutil.copy(FIXTURES / "experiment.ipynb", nbs / "toy_lq.ipynb")
    shutil.copy(FIXTURES / "summary.ipynb", nbs / "summary.ipynb")
    root = tmp / "executed"
    rc = runner.run(
        ["toy_lq"],
        [1, 3, 4],
        profile="quick",
        root=root,
        notebooks_dir=nbs,
        jobs=3,
        timeout=120,
        say=lambda _: None,
    )
    assert rc == 1  # seed 1 fails
    unfinished = run_dir_for(root, "toy_lq", "quick", 7)
    unfinished.mkdir(parents=True)
    (unfinished / "params.yaml").write_text("seed: 7\n")
    assert build_report(root, say=lambda _: None) == 0
    return root


def index_rows(root: Path) -> dict[str, tuple[bool, str, str]]:
    """run -> (flagged, status text, row html)."""
    text = (root / "index.html").read_text()
    return {run: ("flagged" in cls, status, body) for cls, run, status, body in ROW.findall(text)}


def test_index_has_one_row_per_run_with_failures_marked(root):
    rows = index_rows(root)
    assert sorted(rows) == [f"toy_lq/quick/seed{s}" for s in (1, 3, 4, 7)]
    flagged = {run: f for run, (f, _, _) in rows.items()}
    assert flagged == {
        "toy_lq/quick/seed1": True,
        "toy_lq/quick/seed3": True,
        "toy_lq/quick/seed4": False,
        "toy_lq/quick/seed7": True,
    }
    _, status, body = rows["toy_lq/quick/seed1"]
    assert status == "failed" and "ValueError: fixture: seed 1 is broken" in body
    assert rows["toy_lq/quick/seed3"][1] == "completed, diverged: dfa"
    assert rows["toy_lq/quick/seed7"][1] == "incomplete"
    body = rows["toy_lq/quick/seed4"][2]  # final metrics per method, compactly
    assert "<b>bp</b> test/acc 0.904, train/loss 0.25" in body
    assert "<b>dfa</b> test/acc 0.5, train/loss 2.5" in body


def test_index_links_resolve_to_rendered_notebooks(root):
    text = (root / "index.html").read_text()
    hrefs = re.findall(r'href="([^"]+)"', text)
    assert hrefs and all((root / unquote(h)).is_file() for h in hrefs)
    notebooks = {h for h in hrefs if h.endswith(".html")}
    assert notebooks == {f"toy_lq/quick/seed{s}/toy_lq.html" for s in (1, 3, 4)} | {
        "toy_lq/quick/summary.html"
    }
    assert "notebook: none" in index_rows(root)["toy_lq/quick/seed7"][2]


def test_index_is_self_contained(root):
    text = (root / "index.html").read_text()
    assert "<style>" in text
    assert "<script" not in text and "<link" not in text
    assert not re.search(r'(src|href)="(https?:)?//', text)


def test_rendered_notebook_embeds_plotly(root):
    html = (run_dir_for(root, "toy_lq", "quick", 4) / "toy_lq.html").read_text()
    assert 'class="plotly-graph-div"' in html
    assert "plotly.js v" in html  # the library itself is inlined ...
    assert not re.search(r"<script[^>]*src=[\"'][^\"']*plotly", html)  # ... not fetched


def test_status_prints_the_same_rows(root, capsys):
    assert main(["status", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    line = re.compile(r"^(!?)\s+(\S+)\s+(\S+)\s+(\d+)\s+(.+?)\s{2,}", re.M)
    printed = {
        f"{e}/{p}/seed{s}": (mark == "!", status) for mark, e, p, s, status in line.findall(out)
    }
    assert printed == {run: (f, status) for run, (f, status, _) in index_rows(root).items()}
    assert "ValueError: fixture: seed 1 is broken" in out
    assert "toy_lq/quick/summary.ipynb  completed" in out


def test_analysis_notebooks_are_listed(root):
    text = (root / "index.html").read_text()
    assert "<h2>Analysis notebooks</h2>" in text
    assert '<a href="toy_lq/quick/summary.html">notebook</a>' in text


def test_rendering_is_cached(root):
    said = []
    assert build_report(root, say=said.append) == 0
    assert not [s for s in said if s.startswith("rendered")]
    assert said[-1].startswith("wrote")


def test_report_without_runs_is_an_error(tmp_path, capsys):
    assert main(["report", "--root", str(tmp_path / "nothing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["status", "--root", str(tmp_path)]) == 0
    assert "no runs under" in capsys.readouterr().out


def test_finals_of_keeps_numbers_only():
    summary = {
        "final": {"loss": 1},
        "methods": {
            "bp": {"status": "completed", "final": {"test/acc": 0.9, "flag": True, "note": "x"}},
            "dfa": {"status": "diverged", "final": {"train/loss": "nan"}},
            "state_bridge": {"status": "failed"},
        },
    }
    finals = finals_of(summary)
    assert finals["run"] == {"loss": 1.0} and finals["bp"] == {"test/acc": 0.9}
    assert str(finals["dfa"]["train/loss"]) == "nan" and "state_bridge" not in finals
