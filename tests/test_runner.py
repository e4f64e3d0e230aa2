"""`cbcore run`: per-seed papermill runs, GPU pinning, failures, skip/force/resume, submitit,
timeouts and analysis notebooks, on a light fixture notebook (tests/nb_fixtures/)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import nbformat
import pytest
import yaml

from cbcore import runner
from cbcore.cli import main
from cbcore.records import read_summary, run_dir_for

FIXTURES = Path(__file__).parent / "nb_fixtures"


def notebooks(tmp_path: Path, *analyses: str) -> Path:
    """A notebooks dir whose experiment notebooks are the fixture (its behaviour is by seed:
    1 raises, 2 sleeps, 3 diverges, 4 plots, 5 hangs after its summary)."""
    d = tmp_path / "notebooks"
    d.mkdir()
    for name in ("toy_lq.ipynb", "cifar.ipynb"):
        shutil.copy(FIXTURES / "experiment.ipynb", d / name)
    for name in analyses:
        shutil.copy(FIXTURES / name, d / name)
    return d


def run_dir(root: Path, seed: int, experiment: str = "toy_lq") -> Path:
    return run_dir_for(root, experiment, "quick", seed)


def cli_run(tmp_path: Path, nbs: Path, *args: str) -> int:
    return main(
        [
            "run",
            "--profile",
            "quick",
            "--root",
            str(tmp_path / "executed"),
            "--notebooks",
            str(nbs),
            *args,
        ]
    )


def test_gpu_pinning_injected_params_and_failed_seed(tmp_path, capsys, monkeypatch):
    # a registered `python3` kernelspec that points elsewhere must not be used
    broken = tmp_path / "jupyter" / "kernels" / "python3"
    broken.mkdir(parents=True)
    argv = ["/nonexistent/python", "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (broken / "kernel.json").write_text(
        json.dumps({"argv": argv, "language": "python", "display_name": "elsewhere"})
    )
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    nbs = notebooks(tmp_path)
    root = tmp_path / "executed"
    rc = cli_run(
        tmp_path,
        nbs,
        "toy_lq",
        "--seeds",
        "10",
        "1",
        "--gpus",
        "0,1",
        "--set",
        "lam=0.2",
        "--timeout",
        "120",
    )
    out = capsys.readouterr().out
    assert rc == 1  # one seed failed

    # each run recorded its own GPU, in its provenance and in its kernel's environment
    cuda = {}
    for seed in (10, 1):
        prov = json.loads((run_dir(root, seed) / "provenance.json").read_text())
        cuda[seed] = prov["CUDA_VISIBLE_DEVICES"]
    assert sorted(cuda.values()) == ["0", "1"]
    good = read_summary(run_dir(root, 10))
    assert good["status"] == "completed"
    assert good["env"]["CUDA_VISIBLE_DEVICES"] == cuda[10]
    assert good["env"]["OMP_NUM_THREADS"] == str(max(1, runner.cpu_count() // 2))
    assert good["python"] == sys.executable  # the kernel runs this interpreter

    # the resolved params were injected: seed and --set reach load_params in the notebook
    assert good["P_seed"] == 10
    params = yaml.safe_load((run_dir(root, 10) / "params.yaml").read_text())
    assert params["seed"] == 10 and params["lam"] == 0.2
    assert (run_dir(root, 10) / "toy_lq.ipynb").exists()

    # the failed seed is recorded with its error; the other completed
    bad = read_summary(run_dir(root, 1))
    assert bad["status"] == "failed"
    assert bad["error"] == "ValueError: fixture: seed 1 is broken"
    assert "raise ValueError" in bad["traceback"]
    assert "failed    toy_lq/quick/seed1" in out and "completed toy_lq/quick/seed10" in out


def test_resume_skip_and_force(tmp_path, capsys):
    nbs = notebooks(tmp_path)
    root = tmp_path / "executed"
    rd = run_dir(root, 10)
    # an interrupted earlier attempt: a checkpoint and a stale failure record
    rd.mkdir(parents=True)
    (rd / "ckpt.txt").write_text("step 1")
    (rd / "summary.json").write_text(json.dumps({"status": "timeout", "error": "old"}))
    (rd / "marker").write_text("kept unless --force")

    # it resumes in the same dir (the notebook sees its checkpoint), and completes
    assert cli_run(tmp_path, nbs, "toy_lq", "--seeds", "10") == 0
    first = read_summary(rd)
    assert first["status"] == "completed" and first["resumed"] is True
    assert (rd / "marker").exists()
    assert first["env"]["CUDA_VISIBLE_DEVICES"] == ""  # no --gpus: the CPU
    assert first["env"]["CBCORE_NUM_THREADS"] == str(runner.cpu_count())
    nb_mtime = (rd / "toy_lq.ipynb").stat().st_mtime

    # a finished run is skipped
    capsys.readouterr()
    assert cli_run(tmp_path, nbs, "toy_lq", "--seeds", "10") == 0
    assert "skip   toy_lq/quick/seed10" in capsys.readouterr().out
    assert (rd / "toy_lq.ipynb").stat().st_mtime == nb_mtime

    # --force starts over in a clean dir
    assert cli_run(tmp_path, nbs, "toy_lq", "--seeds", "10", "--force") == 0
    assert read_summary(rd)["resumed"] is False
    assert not (rd / "marker").exists()


@pytest.mark.parametrize(
    "setting, words",
    [
        ("sigma_brige=0.1", ["sigma_brige", "did you mean 'sigma_bridge'"]),
        ("K=many", ["'K'", "int"]),
        ("lam=-1.0", ["'lam'", "out of range"]),
    ],
)
def test_bad_set_is_an_error_before_any_run(tmp_path, capsys, setting, words):
    nbs = notebooks(tmp_path)
    rc = cli_run(tmp_path, nbs, "toy_lq", "--seeds", "10", "11", "--set", setting)
    err = capsys.readouterr().err
    assert rc == 2
    assert f"--set {setting}" in err
    for w in words:
        assert w in err
    assert not (tmp_path / "executed").exists()


def test_bad_notebook_is_an_error_before_any_run(tmp_path, capsys):
    nbs = notebooks(tmp_path)
    nb = nbformat.read(nbs / "toy_lq.ipynb", as_version=4)
    params = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    params.source += "\nrun_dir = str(Path.cwd())"
    nbformat.write(nb, nbs / "toy_lq.ipynb")
    assert cli_run(tmp_path, nbs, "toy_lq") == 2
    err = capsys.readouterr().err
    assert "only `name = literal`" in err and "run_dir = str(Path.cwd())" in err

    params.metadata["tags"] = []
    nbformat.write(nb, nbs / "toy_lq.ipynb")
    assert cli_run(tmp_path, nbs, "toy_lq") == 2
    assert "no cell tagged 'parameters'" in capsys.readouterr().err
    assert cli_run(tmp_path, nbs, "toy_lk") == 2
    assert "did you mean 'toy_lq'" in capsys.readouterr().err
    assert not (tmp_path / "executed").exists()


def test_submitit_local_executor(tmp_path):
    nbs = notebooks(tmp_path)
    root = tmp_path / "executed"
    rc = runner.run(
        ["toy_lq"],
        [10],
        profile="quick",
        root=root,
        notebooks_dir=nbs,
        executor="slurm",
        cluster="local",
        timeout=120,
    )
    assert rc == 0
    summary = read_summary(run_dir(root, 10))
    assert summary["status"] == "completed"
    # submitit ran the task (its own folder holds the result), and gave it one GPU
    assert list((root / ".submitit").glob("*_result.pkl"))
    assert summary["env"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_timeout(tmp_path):
    root = tmp_path / "executed"
    t0 = time.time()
    rc = runner.run(
        ["toy_lq"], [2], profile="quick", root=root, notebooks_dir=notebooks(tmp_path), timeout=4
    )
    assert rc == 1 and time.time() - t0 < 30
    summary = read_summary(run_dir(root, 2))
    assert summary["status"] == "timeout"
    assert "timeout of 4 s" in summary["error"] and "Executing" in summary["log_tail"]


def test_hang_after_the_last_cell_is_judged_by_the_record(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "HANG_GRACE_S", 0.5)
    root = tmp_path / "executed"
    rc = runner.run(
        ["toy_lq"], [5], profile="quick", root=root, notebooks_dir=notebooks(tmp_path), timeout=120
    )
    assert rc == 0  # seed 5 wrote its summary, then hung; it was stopped, and counts as done
    assert read_summary(run_dir(root, 5))["status"] == "completed"


def test_analysis_notebooks_after_the_seeds(tmp_path):
    nbs = notebooks(tmp_path, "summary.ipynb", "diagnostics.ipynb")
    root = tmp_path / "executed"
    rc = runner.run(
        ["cifar10"], [10, 12], profile="quick", root=root, notebooks_dir=nbs, jobs=3, timeout=120
    )
    assert rc == 1  # diagnostics of seed 12 fail (by the fixture's design)
    for seed in (10, 12):  # ... which leaves the seed runs as they were
        assert read_summary(run_dir(root, seed, "cifar10"))["status"] == "completed"
    exp_dir = root / "cifar10" / "quick"
    assert (exp_dir / "summary.ipynb").exists()
    assert json.loads((exp_dir / "summary_seen.json").read_text()) == [10, 12]
    assert (run_dir(root, 10, "cifar10") / "diagnostics_seen.txt").read_text() == "credit_bridge"
    err = runner.notebook_error(run_dir(root, 12, "cifar10") / "diagnostics.ipynb")
    assert err is not None and "diagnostics of" in err[0]


def test_analysis_table_is_data():
    by_name = {a.notebook: a for a in runner.ANALYSES}
    assert by_name["summary.ipynb"].per == "experiment"
    assert by_name["diagnostics.ipynb"].experiments == ("cifar10",)
    assert by_name["diagnostics.ipynb"].parameters == {"method": "credit_bridge"}
