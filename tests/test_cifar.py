"""cbcore.cifar: the Phase B loop — resume after a kill, divergence, same init and data order,
the record, and the notebook under papermill. CPU, digits, a 2-block net of width 16."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import pytest
import torch

from cbcore import checkpoint as ck
from cbcore import cifar
from cbcore.data import load_data
from cbcore.methods.dfa import DFA
from cbcore.params import load_params, to_dict
from cbcore.records import read_metrics, read_summary

REPO = Path(__file__).resolve().parents[1]
TINY = {"dataset": "digits", "d_hidden": 16, "num_blocks": 2, "mlp_ratio": 2, "epochs": 3,
        "batch_size": 64, "max_train": 256, "diag_every": 2, "diag_batch": 32, "fb_hidden": 16,
        "fb_depth": 1, "value_rank": 4, "K": 2, "device": "cpu", "keep_ckpt_every": 2}
TIME_KEYS = ("time/epoch_s", "time/diag_s")


def tiny(**kw):
    return load_params("cifar10", None, {**TINY, **kw})


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", "unused", "cpu", allow_download=False)


def run(P, run_dir, data, **kw):
    return cifar.run_cifar(P, run_dir, data=data, progress=False, verbose=False, **kw)


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def tensors_equal(a, b) -> bool:
    """Bit-exact equality of two nested state dicts (tensors, numbers, lists, dicts)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, digits):
    run_dir = tmp_path_factory.mktemp("full")
    return run(tiny(), run_dir, digits), run_dir


def test_resume_after_kills_matches_uninterrupted_run(uninterrupted, digits, tmp_path, monkeypatch):
    full, full_dir = uninterrupted
    P = tiny()
    # Kill 1: after state_bridge's epoch-1 checkpoint (via the epoch hook).
    def kill_after(method, epoch):
        def hook(row):
            if row["method"] == method and row["epoch"] == epoch:
                raise KeyboardInterrupt(f"killed after {method} epoch {epoch}")
        return hook

    with pytest.raises(KeyboardInterrupt):
        run(P, tmp_path, digits, on_epoch_end=kill_after("state_bridge", 1))
    assert (read_summary(tmp_path) or {}).get("status") is None  # not finished
    # Kill 2: inside credit_bridge's epoch 2, after its rows were logged but before its
    # checkpoint was written — the resume must drop those rows.
    real_save = ck.save_checkpoint

    def dying_save(state, path):
        if state["method"] == "credit_bridge" and state["epoch"] == 2:
            raise KeyboardInterrupt("killed while writing the checkpoint")
        real_save(state, path)

    monkeypatch.setattr(ck, "save_checkpoint", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run(P, tmp_path, digits)
    logged = [(r["method"], r["epoch"]) for r in read_metrics(tmp_path)]
    assert ("credit_bridge", 2) in logged  # logged, but not checkpointed
    monkeypatch.setattr(ck, "save_checkpoint", real_save)
    resumed = run(P, tmp_path, digits)

    assert resumed.methods == full.methods  # final metrics, exactly
    assert untimed(resumed.rows) == untimed(full.rows)  # nothing duplicated, nothing lost
    for m in P.methods:
        a = ck.load_checkpoint(ck.last_path(tmp_path, m))
        b = ck.load_checkpoint(ck.last_path(full_dir, m))
        for part in ("model", "method_state", "optimizer"):
            assert tensors_equal(a[part], b[part]), (m, part)
    summary = read_summary(tmp_path)
    assert summary["status"] == "completed"
    assert set(summary["methods"]) == set(P.methods)


def test_record_and_rows(uninterrupted):
    full, run_dir = uninterrupted
    for name in ("metrics.jsonl", "summary.json", "provenance.json", "params.yaml"):
        assert (run_dir / name).exists(), name
    epochs = [r for r in full.rows if "train/loss" in r]
    assert [(r["method"], r["epoch"]) for r in epochs] == [
        (m, e) for m in ("bp", "dfa", "state_bridge", "credit_bridge") for e in (1, 2, 3)]
    assert [r["step"] for r in epochs[:3]] == [4, 8, 12]  # 256 examples / 64 per step
    for r in epochs:
        for k in ("train/loss", "train/acc", "test/acc", "time/epoch_s", "train/lr"):
            assert isinstance(r[k], float), k
    assert all("credit_bridge/alpha" in r for r in epochs if r["method"] == "credit_bridge")
    alphas = [r["credit_bridge/alpha"] for r in epochs if r["method"] == "credit_bridge"]
    assert alphas == sorted(alphas) and alphas[-1] == 1.0
    diag = [(r["method"], r["epoch"]) for r in full.rows if "cos/layer_00" in r]
    assert diag == [(m, e) for m in ("bp", "dfa", "state_bridge", "credit_bridge")
                    for e in (0, 2, 3)]  # init, every diag_every, and the last epoch
    bp_diag = [r for r in full.rows if r["method"] == "bp" and "cos/layer_01" in r]
    assert all(r["cos/layer_01"] == pytest.approx(1.0, abs=1e-5) for r in bp_diag)
    m = full.methods["credit_bridge"]
    assert m["status"] == "completed"
    assert set(m["final"]) >= {"test/acc", "train/acc", "cos/mean"}
    assert ck.snapshots(run_dir, "dfa") == [2]  # keep_ckpt_every = 2
    table = cifar.final_table(full)
    assert [r["method"] for r in table] == list(full.methods)
    assert "credit_bridge" in cifar.format_table(table)


def test_same_init_and_data_order_across_methods(uninterrupted, digits, tmp_path):
    """During its warmup the credit bridge uses DFA's credits with DFA's matrices: from the same
    init and data order its updates are DFA's, bit for bit."""
    full, _ = uninterrupted
    init = {r["method"]: r for r in full.rows if r["epoch"] == 0}
    assert init["dfa"]["cos/layer_00"] == init["credit_bridge"]["cos/layer_00"]
    assert init["bp"]["diag/loss"] == init["state_bridge"]["diag/loss"] == init["dfa"]["diag/loss"]
    P = tiny(warmup_frac=1.0, epochs=1, methods=["dfa", "credit_bridge"])
    rows = {r["method"]: r for r in run(P, tmp_path, digits).rows if "train/loss" in r}
    for k in ("train/loss", "train/acc", "test/acc"):
        assert rows["dfa"][k] == rows["credit_bridge"][k], k


def test_nan_loss_marks_method_diverged_and_next_method_runs(digits, tmp_path, monkeypatch):
    real = DFA.credits

    def poisoned(self, net, ctx):
        g = real(self, net, ctx)
        return g * float("nan") if ctx.step == 5 else g  # step 5's update makes the net NaN

    monkeypatch.setattr(DFA, "credits", poisoned)
    res = run(tiny(methods=["dfa", "bp"]), tmp_path, digits)
    dfa = res.methods["dfa"]
    assert dfa["status"] == "diverged"
    assert dfa["diverged"]["step"] == 6  # the first step whose loss is non-finite
    assert math.isnan(dfa["diverged"]["value"])
    assert [r["epoch"] for r in res.rows if r["method"] == "dfa" and "train/loss" in r] == [1, 2]
    assert res.methods["bp"]["status"] == "completed"
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["methods"]["dfa"]["diverged"] == {"step": 6, "value": "nan"}
    assert summary["status"] == "completed"
    # a re-run skips both (they are done) and keeps the record as it was
    again = run(tiny(methods=["dfa", "bp"]), tmp_path, digits)
    assert untimed(again.rows) == untimed(res.rows)


def test_resume_refuses_other_params(uninterrupted, digits):
    _, run_dir = uninterrupted
    with pytest.raises(cifar.ResumeError, match=r"lr: 0.001 → 0.002"):
        run(tiny(lr=2.0e-3), run_dir, digits)


def test_resume_accepts_checkpoints_older_than_a_new_param(tmp_path):
    """A key the checkpoint predates counts as its default (a new param that keeps the old
    behaviour by default must not strand existing runs); a changed value does not."""
    P = tiny()
    old = {k: v for k, v in to_dict(P).items() if k != "fm_weight"}
    cifar.check_resumable({"params": old, "done": False, "device": "cpu"}, P,
                          torch.device("cpu"), tmp_path / "last.pt")
    with pytest.raises(cifar.ResumeError, match=r"fm_weight: 0.0 → 0.5"):
        cifar.check_resumable({"params": old, "done": False, "device": "cpu"},
                              tiny(fm_weight=0.5), torch.device("cpu"), tmp_path / "last.pt")


def test_setup_device_and_threads(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("CBCORE_NUM_THREADS", "1")
    try:
        assert cifar.setup_device("cpu") == torch.device("cpu")
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.delenv("CBCORE_NUM_THREADS")
    assert cifar.setup_device("auto").type == expected
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            cifar.setup_device("cuda")


def test_load_trained_restores_final_model(uninterrupted, digits):
    full, run_dir = uninterrupted
    P, net, method = cifar.load_trained(run_dir, "credit_bridge", data=digits)
    state = ck.load_checkpoint(ck.last_path(run_dir, "credit_bridge"))
    assert tensors_equal(net.state_dict(), state["model"])
    assert method.name == "credit_bridge" and P.d_hidden == 16
    P2, net2, _ = cifar.load_trained(run_dir, "dfa", epoch=2, data=digits)
    with pytest.raises(FileNotFoundError, match=r"kept epochs for dfa: \[2\]"):
        cifar.load_trained(run_dir, "dfa", epoch=1, data=digits)


def test_notebook_runs_under_papermill(tmp_path, monkeypatch):
    papermill = pytest.importorskip("papermill")
    monkeypatch.setenv("CBCORE_NUM_THREADS", "1")  # the kernel inherits it: tiny net, no contention
    src = REPO / "notebooks" / "cifar.ipynb"
    nb = nbformat.read(src, as_version=4)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")
    run_dir = tmp_path / "seed7"
    overrides = {**TINY, "epochs": 2, "max_train": 128}
    papermill.execute_notebook(
        str(src), str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False,
        cwd=str(REPO),
        parameters={"experiment": "cifar10", "profile": "quick", "seed": 7,
                    "run_dir": str(run_dir), "overrides": overrides})
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["seed"] == 7
    assert set(summary["methods"]) == {"bp", "dfa", "state_bridge", "credit_bridge"}
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    html = [o["data"]["text/html"] for c in out.cells for o in c.get("outputs", [])
            if "text/html" in o.get("data", {})]
    assert sum("Plotly.newPlot" in h for h in html) >= 3  # accuracy, cosine, table figures
