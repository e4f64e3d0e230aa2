"""cbcore.analysis: the figure data of the diagnostics and summary notebooks, with known answers.

Checkpoint functions run on a tiny CIFAR-like run made by the real loop (digits, width 16,
2 blocks, 2 epochs, every epoch diagnosed and kept); summary functions on hand-made records
whose mean, std and n are known, and on a tiny real toy run (bp's cosine is 1 at every layer).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import plotly.io as pio
import pytest
import torch

from cbcore import analysis, cifar, plots
from cbcore.data import load_data
from cbcore.metrics import DEFAULT_EPS
from cbcore.params import load_params
from cbcore.records import run_dir_for

TINY = {
    "dataset": "digits",
    "d_hidden": 16,
    "num_blocks": 2,
    "mlp_ratio": 2,
    "epochs": 2,
    "batch_size": 64,
    "max_train": 256,
    "diag_every": 1,
    "diag_batch": 32,
    "fb_hidden": 16,
    "fb_depth": 1,
    "value_rank": 4,
    "K": 2,
    "device": "cpu",
    "keep_ckpt_every": 1,
    "methods": ["bp", "dfa", "credit_bridge"],
}
TOY = {
    "d_hidden": 8,
    "num_layers": 3,
    "num_steps": 20,
    "log_every": 10,
    "batch_size": 32,
    "eval_batch": 64,
    "fb_hidden": 16,
    "fb_depth": 1,
    "value_rank": 4,
    "K": 2,
    "methods": ["bp", "dfa", "credit_bridge"],
}
L = TINY["num_blocks"]


@pytest.fixture(scope="module")
def one_thread():
    """One thread: on a shared 2-core machine two threads of tiny ops wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cifar_run(run_dir: Path, data, seed: int = 42) -> cifar.CifarResult:
    P = load_params("cifar10", None, {**TINY, "seed": seed})
    return cifar.run_cifar(P, run_dir, data=data, progress=False, verbose=False)


def tiny_toy_run(run_dir: Path, seed: int = 42):
    from cbcore import toy_lq

    P = load_params("toy_lq", None, {**TOY, "seed": seed})
    return toy_lq.run_toy(P, run_dir, progress=False, profile="quick")


@pytest.fixture(scope="module")
def digits():
    return load_data("digits", "unused", "cpu", allow_download=False)


@pytest.fixture(scope="module")
def run(tmp_path_factory, digits, one_thread) -> Path:
    run_dir = tmp_path_factory.mktemp("run") / "seed42"
    tiny_cifar_run(run_dir, digits)
    return run_dir


@pytest.fixture(scope="module")
def diag(run, digits) -> analysis.RunDiagnostics:
    # batch_size = diag_batch: the run's own diagnostic batch, so records can be reproduced
    return analysis.RunDiagnostics(run, batch_size=TINY["diag_batch"], data=digits)


# ---------------------------------------------------------------- checkpoints of one run


def test_bp_credit_is_exact_at_every_layer_and_checkpoint(diag):
    grids = analysis.checkpoint_grids(diag, "bp")
    for name in ("cos", "rho"):
        g = grids[name]
        assert g.values.shape == (L, 2) and list(g.epochs) == [1, 2] and list(g.layers) == [0, 1]
        np.testing.assert_allclose(g.values, 1.0, atol=1e-5)
    al = analysis.layer_alignment(diag.probe("bp", 1))
    np.testing.assert_allclose(al["cos"], 1.0, atol=1e-5)


def test_checkpoints_reproduce_the_recorded_diagnostics(diag):
    """On the run's own batch, a checkpoint gives the cos/rho the loop logged at that epoch
    (for the credit bridge too: same step, same blend α, same value net)."""
    for method in ("dfa", "credit_bridge"):
        ck_grid = analysis.checkpoint_grids(diag, method)
        for name in ("cos", "rho"):
            rec = analysis.layer_epoch_grid(diag.rows, method, name)
            assert list(rec.epochs) == [0, 1, 2] and rec.values.shape == (L, 3)  # 0 = init
            np.testing.assert_allclose(ck_grid[name].values, rec.values[:, 1:], atol=1e-5)
        assert not np.allclose(ck_grid["cos"].values, 1.0)  # not BP: the check can fail


def test_layer_epoch_grid_from_rows():
    rows = [
        {"method": "a", "epoch": 0, "cos/layer_00": 0.1, "cos/layer_01": "nan"},
        {"method": "a", "epoch": 1, "train/loss": 1.0},  # no diagnostics: not a column
        {"method": "b", "epoch": 1, "cos/layer_00": 9.0, "cos/layer_01": 9.0},
        {
            "method": "a",
            "epoch": 2,
            "cos/layer_00": 0.3,
            "cos/layer_01": 0.4,
            "bridge_cos/layer_00": 7.0,
        },
    ]
    g = analysis.layer_epoch_grid(rows, "a", "cos")
    assert list(g.epochs) == [0, 2] and list(g.layers) == [0, 1]
    assert g.values[0].tolist() == [0.1, 0.3]
    assert math.isnan(g.values[1, 0]) and g.values[1, 1] == 0.4  # "nan" as records write it
    empty = analysis.layer_epoch_grid(rows, "c", "cos")
    assert empty.values.shape == (0, 0)


def test_nudge_along_the_true_gradient_is_efficient(diag):
    eps = analysis.log_grid(1.0e-3, 0.3, 5)
    bp = analysis.nudge_data(diag.probe("bp"), 1, eps)
    assert bp["eps"].shape == bp["credit"].shape == bp["true"].shape == (5,)
    np.testing.assert_allclose(bp["efficiency"], 1.0, rtol=1e-4)  # bp's credit is ∂ℓ/∂h_l
    assert bp["true"][0] < 0  # a small step against the gradient lowers the loss
    dfa = analysis.nudge_data(diag.probe("dfa"), 0, DEFAULT_EPS)
    rec = analysis.layer_epoch_grid(diag.rows, "dfa", "nudge_eff")
    mid = len(DEFAULT_EPS) // 2  # the loop records the efficiency at the middle ε
    assert dfa["efficiency"][mid] == pytest.approx(rec.values[0, -1], rel=1e-4, abs=1e-6)
    again = analysis.nudge_data(diag.probe("dfa"), 0, DEFAULT_EPS)
    np.testing.assert_array_equal(again["random"], dfa["random"])  # seeded random direction
    with pytest.raises(ValueError, match=r"layers 0\.\.1"):
        analysis.nudge_data(diag.probe("dfa"), 2, eps)


def test_value_vs_loss_matches_the_recorded_correlation(diag):
    probe = diag.probe("credit_bridge")
    rec = analysis.layer_epoch_grid(diag.rows, "credit_bridge", "value_corr")
    for layer in range(L):
        d = analysis.value_vs_loss(probe, layer)
        assert d["value"].shape == d["loss"].shape == (TINY["diag_batch"],)
        assert d["corr"] == pytest.approx(rec.values[layer, -1], abs=1e-5)
    np.testing.assert_allclose(d["loss"], probe.ctx.loss.numpy(), rtol=1e-6)
    assert diag.value_methods == ["credit_bridge"]
    with pytest.raises(ValueError, match="dfa has no value network"):
        analysis.value_vs_loss(diag.probe("dfa"), 0)


def test_epochs_and_methods(run, digits, diag):
    assert diag.methods == ["bp", "dfa", "credit_bridge"]
    assert diag.available_epochs("dfa") == [1, 2] and diag.probe("dfa").epoch == 2
    chosen = analysis.RunDiagnostics(run, 16, methods=["dfa"], epochs=[1], data=digits)
    assert chosen.methods == ["dfa"] and chosen.epochs("dfa") == [1] and len(chosen.y) == 16
    bad = analysis.RunDiagnostics(run, 16, epochs=[5], data=digits)
    with pytest.raises(ValueError, match=r"no checkpoint for epochs \[5\].*available: \[1, 2\]"):
        bad.epochs("bp")
    with pytest.raises(ValueError, match=r"\['state_bridge'\]: no checkpoints"):
        analysis.RunDiagnostics(run, 16, methods=["state_bridge"], data=digits)
    with pytest.raises(FileNotFoundError, match="no params.yaml"):
        analysis.RunDiagnostics(run / "checkpoints", 16, data=digits)


def test_explorer_callbacks_follow_the_widgets(diag, monkeypatch):
    monkeypatch.setattr(pio.renderers, "default", "json")  # no browser outside a notebook
    ex = plots.DiagnosticsExplorer(diag, "credit_bridge")
    assert ex.method.value == "credit_bridge" and ex.epoch.value == 2
    figs = ex.figures()
    assert figs["value"] is not None and "layer 0" in figs["nudge"].layout.annotations[0].text
    ex.layer.value = 1
    ex.method.value = "dfa"  # its epochs become the epoch choices; no value network
    assert list(ex.epoch.options) == [1, 2]
    ex.epoch.value = 1
    figs = ex.figures()
    assert figs["value"] is None
    assert figs["nudge"].layout.title.text.startswith("dfa, epoch 1")
    mark = [t for t in figs["maps"].data if t.type == "scatter"][0]
    assert list(mark.x) == ["1"] and list(mark.y) == [1]  # the selection, outlined
    ex.log_eps.value = (-2.0, -1.0)
    assert ex.figures()["nudge"].data[0].x[0] == pytest.approx(0.01)
    # what the widgets show: outputs set as state (no output capture), plotly's mimetype
    (shown,) = ex.outputs["nudge"].outputs
    assert "application/vnd.plotly.v1+json" in shown["data"]
    assert shown["data"]["text/plain"].startswith("<plotly figure: dfa, epoch 1")
    (note,) = ex.outputs["value"].outputs
    assert note["text"].startswith("dfa has no value network")
    assert isinstance(plots.diagnostics_explorer(diag, "bp").explorer, plots.DiagnosticsExplorer)


# ---------------------------------------------------------------- every seed of an experiment


def write_run(
    root: Path,
    seed: int,
    status: str | None,
    methods: dict,
    rows=(),
    experiment: str = "cifar10",
    extra: dict | None = None,
) -> Path:
    """A hand-made run record: summary.json (unless status is None) and metrics.jsonl."""
    d = run_dir_for(root, experiment, "quick", seed)
    d.mkdir(parents=True)
    if status is not None:
        body = {
            "experiment": experiment,
            "profile": "quick",
            "seed": seed,
            "status": status,
            "methods": methods,
            **(extra or {}),
        }
        (d / "summary.json").write_text(json.dumps(body))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def done(acc: float, **final) -> dict:
    return {"status": "completed", "final": {"test/acc": acc, **final}}


def curve(method: str, accs: list[float], cos: list[float]) -> list[dict]:
    rows = [{"method": method, "epoch": e, "test/acc": a} for e, a in enumerate(accs, start=1)]
    rows.append(
        {
            "method": method,
            "epoch": len(accs),
            **{f"cos/layer_{l:02d}": c for l, c in enumerate(cos)},
        }
    )
    return rows


@pytest.fixture()
def seeds_root(tmp_path) -> Path:
    """Seeds 1-3 complete (bp acc 0.5, 0.6, 0.7); seed 4: dfa diverged; seed 5 failed;
    seed 6 never wrote its summary; seed 7 is asked for but has no directory."""
    root = tmp_path / "executed"
    for seed, acc in ((1, 0.5), (2, 0.6), (3, 0.7)):
        write_run(
            root,
            seed,
            "completed",
            {"bp": done(acc), "dfa": done(acc / 2)},
            curve("bp", [acc - 0.1, acc], [1.0, 1.0]) + curve("dfa", [0.1, acc / 2], [acc, 0.0]),
        )
    write_run(
        root,
        4,
        "completed",
        {
            "bp": done(0.6),
            "dfa": {
                "status": "diverged",
                "diverged": {"step": 6, "value": "nan"},
                "final": {"test/acc": 0.1},
            },
        },
        curve("bp", [0.5, 0.6], [1.0, 1.0]) + curve("dfa", [0.1, 0.1], [0.9, 0.9]),
    )
    write_run(root, 5, "failed", {}, extra={"error": "ValueError: boom"})
    write_run(root, 6, None, {}, curve("bp", [0.9], [1.0, 1.0]))
    return root


def test_final_stats_mean_std_n_and_named_exclusions(seeds_root):
    runs = analysis.collect_seeds(seeds_root, "cifar10", "quick", seeds=[7])
    assert [(r.seed, r.status) for r in runs] == [
        (1, "completed"),
        (2, "completed"),
        (3, "completed"),
        (4, "completed"),
        (5, "failed"),
        (6, "incomplete"),
        (7, "missing"),
    ]
    table = {r["method"]: r for r in analysis.final_stats(runs, ["test/acc"])}
    bp = table["bp"]["test/acc"]  # seeds 1-4: 0.5, 0.6, 0.7, 0.6 -> mean 0.6
    assert bp.n == 4 and bp.mean == pytest.approx(0.6)
    assert bp.std == pytest.approx(math.sqrt(0.02 / 3))  # sample std, ddof = 1
    dfa = table["dfa"]["test/acc"]  # seed 4 diverged: out; 0.25, 0.3, 0.35
    assert (dfa.n, table["dfa"]["seeds"]) == (3, [1, 2, 3])
    assert dfa.mean == pytest.approx(0.3) and dfa.std == pytest.approx(0.05)
    assert table["dfa"]["excluded"] == (
        "seed 4: diverged at step 6; seed 5: failed (ValueError: boom); seed 6: incomplete "
        "(no summary.json: still running, or stopped before its end); seed 7: missing "
        "(no run directory)"
    )
    assert "seed 4" not in table["bp"]["excluded"] and "seed 7: missing" in table["bp"]["excluded"]
    text = analysis.format_table(analysis.final_stats(runs, ["test/acc"]))
    assert "0.6000 ± 0.0816 (n=4)" in text and "seed 7: missing" in text
    seeds = {r["seed"]: r for r in analysis.seed_table(runs)}
    assert seeds[4]["note"] == "dfa: diverged at step 6" and seeds[4]["aggregated"]
    assert seeds[7]["status"] == "missing" and not seeds[7]["aggregated"]
    assert seeds[1]["note"] is None


def test_stat_known_answers():
    s = analysis.Stat.of([0.5, 0.6, 0.7])
    assert (s.mean, s.std, s.n) == (pytest.approx(0.6), pytest.approx(0.1), 3)
    assert str(s) == "0.6000 ± 0.1000 (n=3)"
    one = analysis.Stat.of([0.5])
    assert one.n == 1 and math.isnan(one.std) and str(one) == "0.5000 (n=1)"
    assert analysis.Stat.of([]).n == 0 and str(analysis.Stat.of([])) == "– (n=0)"


def test_one_seed_missing_is_named(tmp_path):
    root = tmp_path / "executed"
    for seed, acc in ((1, 0.5), (2, 0.7)):
        write_run(root, seed, "completed", {"bp": done(acc)})
    runs = analysis.collect_seeds(root, "cifar10", "quick", seeds=[1, 2, 3])
    (row,) = analysis.final_stats(runs, ["test/acc"])
    assert row["test/acc"].n == 2 and row["test/acc"].mean == pytest.approx(0.6)
    assert row["excluded"] == "seed 3: missing (no run directory)"
    assert analysis.collect_seeds(tmp_path / "nowhere", "cifar10", "quick") == []


def test_curve_and_layer_bands(seeds_root):
    runs = analysis.collect_seeds(seeds_root, "cifar10", "quick")
    bands = analysis.curve_bands(runs, "test/acc", "epoch")
    bp = bands["bp"]
    assert list(bp["x"]) == [1, 2] and list(bp["n"]) == [4, 4]  # seed 6 (incomplete) left out
    np.testing.assert_allclose(bp["mean"], [0.5, 0.6])
    np.testing.assert_allclose(bands["dfa"]["mean"], [0.1, 0.3])  # diverged seed 4 left out
    np.testing.assert_allclose(bands["dfa"]["std"], [0.0, 0.05], atol=1e-12)
    layers = analysis.layer_bands(runs, "cos")
    np.testing.assert_allclose(layers["bp"]["mean"], [1.0, 1.0])
    np.testing.assert_allclose(layers["dfa"]["mean"], [0.6, 0.0])
    np.testing.assert_allclose(layers["dfa"]["std"], [0.1, 0.0], atol=1e-12)
    assert list(layers["dfa"]["n"]) == [3, 3] and "seed 4: diverged" in layers["dfa"]["excluded"]
    # `prefix/mean` is the mean over a row's layers when the row does not log it
    assert analysis.row_value(
        {"cos/layer_00": 0.2, "cos/layer_01": 0.4}, "cos/mean"
    ) == pytest.approx(0.3)
    assert analysis.known_answers_table(runs) == []  # CIFAR: no closed-form answers


def test_known_answers_table_on_hand_made_toy_records(tmp_path):
    root = tmp_path / "executed"
    for seed, c0 in ((1, 0.8), (2, 0.6)):
        final = {"status": "completed", "final": {}}
        rows = [
            {
                "method": "bp",
                "step": 10,
                "cos/layer_00": 1.0,
                "cos/layer_01": 1.0,
                "softcos/layer_00": 0.9,
                "softcos/layer_01": 0.95,
            },
            {
                "method": "credit_bridge",
                "step": 10,
                "cos/layer_00": c0,
                "cos/layer_01": 0.9,
                "softcos/layer_00": c0 + 0.1,
                "softcos/layer_01": 0.95,
                "bridge_cos/layer_00": c0,
                "bridge_cos/layer_01": 0.9,
            },
        ]
        write_run(
            root,
            seed,
            "completed",
            {"bp": final, "credit_bridge": final},
            rows,
            "toy_lq",
            {"baseline": {"cos/layer_00": 0.3, "cos/layer_01": 0.5}},
        )
    runs = analysis.collect_seeds(root, "toy_lq", "quick")
    table = analysis.known_answers_table(runs)
    assert [r["layer"] for r in table] == [0, 1]
    row = table[0]
    assert row["broadcast cos"].mean == pytest.approx(0.3) and row["broadcast cos"].n == 2
    assert row["bp cos (vs ∂ℓ/∂h_l)"].mean == 1.0
    cb = row["credit_bridge cos (vs ∂ℓ/∂h_l)"]
    assert cb.mean == pytest.approx(0.7) and cb.std == pytest.approx(math.sqrt(0.02)) and cb.n == 2
    assert row["credit_bridge softcos (vs ∇V_l soft)"].mean == pytest.approx(0.8)
    assert "credit_bridge bridge_cos (vs ∂ℓ/∂h_l)" in row
    assert "bp bridge_cos (vs ∂ℓ/∂h_l)" not in row  # only what was measured


def test_real_toy_records_bp_is_exact(tmp_path, one_thread):
    """A tiny real toy run: bp's credit is the exact costate, so its cosine is 1 at every
    layer, and the broadcast baseline is the run's own."""
    root = tmp_path / "executed"
    tiny_toy_run(run_dir_for(root, "toy_lq", "quick", 3), seed=3)
    runs = analysis.collect_seeds(root, "toy_lq", "quick", seeds=[3, 4])
    table = analysis.known_answers_table(runs)
    assert len(table) == TOY["num_layers"]
    for row in table:
        assert row["bp cos (vs ∂ℓ/∂h_l)"].mean == pytest.approx(1.0, abs=1e-5)
        assert row["bp cos (vs ∂ℓ/∂h_l)"].n == 1
        assert -1.0 <= row["broadcast cos"].mean <= 1.0
    assert table[0]["broadcast cos"].mean < 0.99  # far from the identity: not trivial
    spec = analysis.summary_spec("toy_lq")
    finals = {r["method"]: r for r in analysis.final_stats(runs, spec.finals)}
    assert finals["bp"]["cos/mean"].mean == pytest.approx(1.0, abs=1e-5)
    assert finals["credit_bridge"]["excluded"] == "seed 4: missing (no run directory)"
    bands = analysis.curve_bands(runs, "cos/mean", spec.x)
    assert list(bands["bp"]["x"]) == [1, 11, 20]  # logged steps
    with pytest.raises(KeyError, match="no summary layout"):
        analysis.summary_spec("mnist")


def test_a_diverged_method_still_gives_figures(tmp_path, digits, one_thread, monkeypatch):
    """NaN weights after divergence: the data is NaN, and the figures are still made."""
    from cbcore.methods.dfa import DFA

    real = DFA.credits

    def poisoned(self, net, ctx):
        g = real(self, net, ctx)
        return g * float("nan") if ctx.step == 5 else g  # step 5's update makes the net NaN

    monkeypatch.setattr(DFA, "credits", poisoned)
    P = load_params("cifar10", None, {**TINY, "methods": ["dfa"]})
    res = cifar.run_cifar(P, tmp_path, data=digits, progress=False, verbose=False)
    assert res.methods["dfa"]["status"] == "diverged"
    monkeypatch.setattr(pio.renderers, "default", "json")
    diag = analysis.RunDiagnostics(tmp_path, 16, data=digits)
    assert diag.epochs("dfa") == [1, 2]
    probe = diag.probe("dfa")
    assert np.isnan(analysis.layer_alignment(probe)["cos"]).all()
    figs = plots.DiagnosticsExplorer(diag, "credit_bridge").figures()  # absent: first method
    assert figs["nudge"].layout.title.text.startswith("dfa, epoch 2")
    assert plots.alignment_lines(analysis.checkpoint_grids(diag, "dfa")).data
