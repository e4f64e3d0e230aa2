"""notebooks/diagnostics.ipynb and notebooks/summary.ipynb under papermill, placed where the
runner puts them, then `cbcore report`: both rendered and linked from index.html.

Records: a tiny real CIFAR run (seed 1), a failed seed (2), a seed asked for but never made
(3); a tiny real toy run for the toy summary with its known answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest

from cbcore import runner
from cbcore.records import run_dir_for
from cbcore.report import build_report
from tests.test_analysis import tiny_cifar_run, tiny_toy_run

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
THIN = re.compile(r"^\s*(def |class |import torch|from torch)|torch\.", re.M)


def execute(src: str, out: Path, parameters: dict) -> nbformat.NotebookNode:
    papermill = pytest.importorskip("papermill")
    out.parent.mkdir(parents=True, exist_ok=True)
    papermill.execute_notebook(
        str(NOTEBOOKS / src),
        str(out),
        parameters=parameters,
        kernel_name=runner.KERNEL_NAME,
        progress_bar=False,
        cwd=str(REPO),
        execution_timeout=300,  # a hung cell fails the test instead of blocking it
    )
    return nbformat.read(out, as_version=4)


def outputs(nb, kind: str) -> list[str]:
    """All outputs of one mime type (text: streams and text/plain) of the code cells."""
    found = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if kind == "text" and o.get("output_type") == "stream":
                found.append(o["text"])
            elif kind in o.get("data", {}):
                found.append(o["data"][kind])
    return found


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Records, then both notebooks executed the way the runner's ANALYSES run them (a
    `python3` kernelspec of this interpreter, one thread per kernel)."""
    import torch

    from cbcore.data import load_data

    tmp = tmp_path_factory.mktemp("analysis_nb")
    root = tmp / "executed"
    with pytest.MonkeyPatch.context() as mp:
        kdir = tmp / "jupyter"
        runner.write_kernelspec(str(kdir))
        mp.setenv("JUPYTER_PATH", str(kdir))
        for var in runner.THREAD_VARS:
            mp.setenv(var, "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            digits = load_data("digits", "unused", "cpu", allow_download=False)
            tiny_cifar_run(run_dir_for(root, "cifar10", "quick", 1), digits, seed=1)
            tiny_toy_run(run_dir_for(root, "toy_lq", "quick", 1), seed=1)
        finally:
            torch.set_num_threads(threads)
        failed = run_dir_for(root, "cifar10", "quick", 2)
        failed.mkdir(parents=True)
        (failed / "summary.json").write_text(
            json.dumps({"seed": 2, "status": "failed", "error": "ValueError: boom", "methods": {}})
        )
        seed1 = run_dir_for(root, "cifar10", "quick", 1)
        execute(
            "diagnostics.ipynb",
            seed1 / "diagnostics.ipynb",
            {"run_dir": str(seed1), "method": "credit_bridge", "batch_size": 32},
        )
        for experiment, seeds in (("cifar10", [1, 2, 3]), ("toy_lq", [])):
            execute(
                "summary.ipynb",
                root / experiment / "quick" / "summary.ipynb",
                {"experiment": experiment, "profile": "quick", "root": str(root), "seeds": seeds},
            )
    return root


@pytest.mark.parametrize(
    "name, injected",
    [
        ("diagnostics.ipynb", ("run_dir", "method", "methods", "epochs", "batch_size")),
        ("summary.ipynb", ("experiment", "profile", "root", "seeds")),
    ],
)
def test_source_notebooks_are_thin_and_take_the_runners_parameters(name, injected):
    path = NOTEBOOKS / name
    runner.check_notebook(path, injected)  # literal-only parameters cell with these names
    by_runner = {a.notebook: a for a in runner.ANALYSES}[name]
    runner.check_notebook(path, list(by_runner.parameters))
    nb = nbformat.read(path, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code)  # stripped
    assert not [c.source for c in code if THIN.search(c.source)]  # only cbcore calls
    assert "cbcore.plots.setup_plotly()" in code[1].source


def test_diagnostics_notebook_renders_every_method_statically(root):
    nb = nbformat.read(run_dir_for(root, "cifar10", "quick", 1) / "diagnostics.ipynb", 4)
    assert runner.notebook_error(Path(nb.metadata.papermill.output_path)) is None
    html = outputs(nb, "text/html")
    # per method: heatmaps, checkpoint lines, nudge curves (3 x 3); credit bridge: value (2)
    assert sum("Plotly.newPlot" in h for h in html) == 11
    assert any("window.PlotlyConfig" in h for h in html)  # plotly.js in a cell, not a widget
    for method in ("bp", "dfa", "credit_bridge"):
        assert any(f"{method}: per layer over epochs" in h for h in html), method
        assert any(f"{method}, epoch 2: nudge curves" in h for h in html), method
    assert any("value vs realized loss" in h for h in html)
    assert outputs(nb, "application/vnd.jupyter.widget-view+json")  # the explorer
    state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    shown = [
        o for m in state.values() if m["model_name"] == "OutputModel" for o in m["state"]["outputs"]
    ]
    assert len(shown) == 3 and all("application/vnd.plotly.v1+json" in o["data"] for o in shown)


def test_summary_notebook_names_the_failed_and_the_missing_seed(root):
    nb = nbformat.read(root / "cifar10" / "quick" / "summary.ipynb", 4)
    text = "".join(outputs(nb, "text"))
    seeds = text[text.index("seed  status") : text.index("method ")]
    assert re.search(r"^1 +completed +True +-", seeds, re.M)
    assert re.search(r"^2 +failed +False +ValueError: boom", seeds, re.M)
    assert re.search(r"^3 +missing +False +no run directory", seeds, re.M)
    finals = text[text.index("method ") :]
    for method in ("bp", "dfa", "credit_bridge"):
        assert re.search(rf"^{method} +\d\.\d{{4}} \(n=1\)", finals, re.M), method
    assert "seed 2: failed (ValueError: boom); seed 3: missing (no run directory)" in finals
    html = outputs(nb, "text/html")
    assert sum("Plotly.newPlot" in h for h in html) >= 6  # tables, 2 curves, layers


def test_toy_summary_has_the_known_answers_table(root):
    nb = nbformat.read(root / "toy_lq" / "quick" / "summary.ipynb", 4)
    text = "".join(outputs(nb, "text"))
    table = text[text.index("layer  broadcast cos") :]
    assert "bp cos (vs ∂ℓ/∂h_l)" in table
    assert len(re.findall(r"^\d +\S+ \(n=1\) +1\.0000 \(n=1\)", table, re.M)) == 3  # bp: 1


def test_report_includes_both_notebooks(root):
    assert build_report(root, say=lambda _: None) == 0
    index = (root / "index.html").read_text()
    for link in (
        "cifar10/quick/summary.html",
        "toy_lq/quick/summary.html",
        "cifar10/quick/seed1/diagnostics.html",
    ):
        assert f'href="{link}"' in index, link
        assert (root / link).is_file()
    page = (root / "cifar10/quick/seed1/diagnostics.html").read_text()
    assert page.count("Plotly.newPlot") >= 11 and "window.PlotlyConfig" in page
