"""The report in a real browser, offline: headless Chromium opens index.html and a rendered
notebook with the network blocked, and plotly draws the notebook's figure (its SVG is in
the DOM). Screenshots are left in the test's tmp dir."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from cbcore import runner
from cbcore.records import run_dir_for
from cbcore.report import build_report

FIXTURES = Path(__file__).parent / "nb_fixtures"
CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium not found: the browser test needs it (Debian: apt-get install -y chromium)",
)
OFFLINE = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # no name resolves ...
    "--proxy-server=127.0.0.1:9",  # ... and every connection is refused
]


def chromium(tmp: Path, url: str, *args: str) -> str:
    """Open url offline, let its scripts run (virtual time), return stdout."""
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp)
    cmd = [CHROMIUM, *OFFLINE, f"--user-data-dir={profile}", "--virtual-time-budget=10000"]
    out = subprocess.run([*cmd, *args, url], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    nbs = tmp / "notebooks"
    nbs.mkdir()
    shutil.copy(FIXTURES / "experiment.ipynb", nbs / "toy_lq.ipynb")
    root = tmp / "executed"
    rc = runner.run(
        ["toy_lq"], [4], profile="quick", root=root, notebooks_dir=nbs, say=lambda _: None
    )
    assert rc == 0
    assert build_report(root, say=lambda _: None) == 0
    return root


def test_plotly_figure_is_drawn_offline(root, tmp_path):
    page = run_dir_for(root, "toy_lq", "quick", 4) / "toy_lq.html"
    dom = chromium(tmp_path, page.as_uri(), "--dump-dom")
    assert 'class="plotly-graph-div' in dom
    assert 'class="main-svg"' in dom, "plotly did not draw the figure without network"
    shot = tmp_path / "notebook.png"  # tall enough to hold the figure
    chromium(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1200,1800")
    assert shot.stat().st_size > 10_000


def test_index_opens_offline_and_links_the_notebook(root, tmp_path):
    dom = chromium(tmp_path, (root / "index.html").as_uri(), "--dump-dom")
    assert 'data-run="toy_lq/quick/seed4"' in dom
    assert 'href="toy_lq/quick/seed4/toy_lq.html"' in dom
    shot = tmp_path / "index.png"
    chromium(
        tmp_path, (root / "index.html").as_uri(), f"--screenshot={shot}", "--window-size=1200,900"
    )
    assert shot.stat().st_size > 5_000
