"""Phase A toy: closed-form answers against autograd and Monte Carlo, the run record, and the
notebook under papermill at tiny parameters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nbformat
import papermill as pm
import pytest
import torch

from cbcore import metrics
from cbcore.methods import CreditContext, dfa, make_method
from cbcore.model import check_net
from cbcore.params import load_params
from cbcore.records import read_metrics, read_summary
from cbcore.toy_lq import (
    ToyLQ,
    broadcast_baseline,
    cpu_threads,
    exact_costates,
    products,
    run_toy,
    soft_value_matrices,
    soft_value_mc,
    soft_values,
)
from cbcore.train import train_step

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "d_hidden": 8,
    "num_layers": 3,
    "num_steps": 20,
    "log_every": 10,
    "batch_size": 32,
    "eval_batch": 64,
    "fb_hidden": 16,
}


def general_M(d: int, L: int, seed: int) -> torch.Tensor:
    """Well-conditioned but not orthogonal: the soft value then differs from the costate."""
    g = torch.Generator().manual_seed(seed)
    return torch.eye(d).repeat(L, 1, 1) * 0.8 + 0.4 * torch.randn(L, d, d, generator=g) / d**0.5


def test_toy_is_a_credit_net_with_orthogonal_blocks():
    net = ToyLQ(16, 4, 0.6, seed=0)
    check_net(net)
    eye = torch.eye(16).expand(4, 16, 16)
    assert torch.allclose(net.M @ net.M.transpose(1, 2), eye, atol=1e-5)
    assert torch.allclose(net.T @ net.T.T, torch.eye(16), atol=1e-5)
    h = torch.randn(4, 5, 16)
    stepped = torch.stack([net.block(l, h[l]) for l in range(4)])
    assert torch.allclose(net.step_all(h), stepped, atol=1e-6)


def test_exact_costate_equals_autograd():
    net = ToyLQ(12, 5, 0.6, seed=1)
    with torch.no_grad():
        net.M.copy_(general_M(12, 5, 2))  # any M, not only the orthogonal seed
    x, y = net.sample(32, torch.Generator().manual_seed(3))
    hs, true, _, _ = metrics.true_gradients(net, x, y)  # autograd through the net
    closed = exact_costates(net.M, hs, y)
    assert closed.shape == (6, 32, 12)
    torch.testing.assert_close(closed, true, rtol=1e-5, atol=1e-7)


def test_soft_value_is_the_design_recursion_and_its_gradient():
    """R_l unrolls DESIGN §5's one-step rule V_l(h) = ½(Mh − c)^T(S^{-1} + σ²MM^T/λ)^{-1}(Mh − c)."""
    d, L, sigma, lam = 6, 4, 0.7, 0.3
    M = general_M(d, L, 4).double()
    y = torch.randn(5, d, dtype=torch.float64)
    hs = torch.randn(L + 1, 5, d, dtype=torch.float64)
    V, grad = soft_values(M, hs, y, sigma, lam)
    S, c = torch.eye(d, dtype=M.dtype) / d, y  # V_L = ½(h − y)^T S (h − y)
    for l in range(L - 1, -1, -1):  # quadratic part through the one-step rule, in h_l coordinates
        W = torch.linalg.inv(torch.linalg.inv(S) + sigma**2 * M[l] @ M[l].T / lam)
        u = hs[l] @ M[l].T - c
        ref = 0.5 * ((u @ W) * u).sum(-1)
        S, c = M[l].T @ W @ M[l], torch.linalg.solve(M[l], c.T).T
        assert torch.allclose(V[l] - V[l].mean(), ref - ref.mean(), atol=1e-10), l
    h = hs.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(soft_values(M, h, y, sigma, lam)[0].sum(), h)
    torch.testing.assert_close(grad, auto[:L])


def test_soft_value_matches_monte_carlo():
    """V_l(h) = −λ log E exp(−ℓ(h_L)/λ) over noisy rollouts, within 3 MC standard errors + 1e-3."""
    d, L, sigma, lam, n = 4, 3, 0.5, 0.5, 100_000
    M = general_M(d, L, 5)
    gen = torch.Generator().manual_seed(6)
    h, y = torch.randn(6, d, generator=gen), torch.randn(6, d, generator=gen)
    for layer in range(L + 1):
        V, _ = soft_values(M, h.expand(L + 1, -1, -1), y, sigma, lam)
        mc, se = soft_value_mc(M, h, y, layer, sigma, lam, n, gen)
        assert se.max() < 0.01  # the MC is precise enough for the check to mean something
        err = (V[layer].double() - mc).abs()
        assert (err <= 4 * se + 1e-4).all(), (layer, V[layer], mc, se)
    # the noise matters at these settings: the soft value is far from the noiseless loss-to-go
    noiseless = 0.5 * ((h.double() @ products(M)[0].T - y.double()) ** 2).mean(-1)
    V0 = soft_values(M, h.expand(L + 1, -1, -1), y, sigma, lam)[0][0]
    assert (V0.double() - noiseless).abs().mean() > 0.05


def test_soft_gradient_is_the_costate_scaled_when_blocks_are_orthogonal():
    net = ToyLQ(16, 4, 0.6, seed=0)
    x, y = net.sample(8, torch.Generator().manual_seed(0))
    hs = net.trajectory(x)
    _, R = soft_value_matrices(net.M, 0.1, 0.1)
    assert torch.allclose(R[0], (16 + 0.1 * 4) * torch.eye(16, dtype=R.dtype), atol=1e-5)
    _, soft = soft_values(net.M, hs, y, 0.1, 0.1)
    true = exact_costates(net.M, hs, y)
    torch.testing.assert_close(soft[0], true[0] * 16 / 16.4, rtol=1e-4, atol=1e-7)


def test_broadcast_baseline_is_low_at_layer_0_for_the_seed_toy():
    P = load_params("toy_lq")
    base = broadcast_baseline(P, torch.device("cpu"))
    assert base["cos/layer_00"] <= 0.3
    assert base[f"cos/layer_{P.num_layers - 1:02d}"] > base["cos/layer_00"]


def test_frozen_train_step_trains_feedback_not_the_toy():
    P = load_params("toy_lq", overrides=TINY)
    net = ToyLQ(P.d_hidden, P.num_layers, P.theta, P.seed).requires_grad_(False)
    M0 = net.M.clone()
    method = make_method("credit_bridge", net, P)
    w0 = [p.clone() for p in method.V.parameters()]
    x, y = net.sample(16, torch.Generator().manual_seed(0))
    res = train_step(net, method, None, x, y, 0, 10)
    assert res.credits.shape == (3, 16, 8)
    assert torch.equal(net.M, M0)
    assert any(not torch.equal(a, b) for a, b in zip(w0, method.V.parameters()))


def test_run_toy_writes_the_run_record(tmp_path):
    P = load_params("toy_lq", overrides={**TINY, "methods": ["dfa", "credit_bridge"]})
    res = run_toy(P, run_dir=tmp_path, progress=False, profile="test")
    rows = read_metrics(tmp_path)
    assert rows == json.loads(json.dumps(res.rows))
    assert [r["step"] for r in rows if r["method"] == "dfa"] == [1, 11, 20]
    cb = [r for r in rows if r["method"] == "credit_bridge"][-1]
    for key in (
        "cos/layer_00",
        "rho/layer_02",
        "softcos/layer_01",
        "bridge_cos/layer_00",
        "train/loss",
        "credit_bridge/bridge_loss",
    ):
        assert math.isfinite(cb[key]), key
    summary = read_summary(tmp_path)
    assert summary["status"] == "completed" and summary["seed"] == P.seed
    assert set(summary["methods"]) == {"dfa", "credit_bridge"}
    final = summary["methods"]["credit_bridge"]["final"]
    assert final["cos/min"] <= final["cos/mean"] <= 1
    assert "cos/layer_00" in summary["baseline"]
    for name in ("params.yaml", "provenance.json"):
        assert (tmp_path / name).exists()


def test_train_forward_lowers_the_loss_with_bp():
    P = load_params(
        "toy_lq",
        overrides={
            **TINY,
            "methods": ["bp"],
            "train_forward": True,
            "num_steps": 60,
            "lr": 1.0e-2,
            "log_every": 59,
        },
    )
    res = run_toy(P, progress=False)
    losses = [r["train/loss"] for r in res.rows]
    assert losses[-1] < 0.7 * losses[0]
    assert res.summary["methods"]["bp"]["final"]["cos/min"] > 0.999


def test_diverged_method_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(dfa.DFA, "credits", lambda self, net, ctx: ctx.hs[:-1] * float("nan"))
    P = load_params("toy_lq", overrides={**TINY, "methods": ["dfa", "bp"], "train_forward": True})
    run_toy(P, run_dir=tmp_path, progress=False)
    summary = read_summary(tmp_path)
    assert summary["status"] == "diverged"
    assert summary["methods"]["dfa"]["status"] == "diverged"
    assert summary["methods"]["dfa"]["step"] >= 1
    assert summary["methods"]["bp"]["status"] == "completed"


def test_notebook_runs_under_papermill(tmp_path, monkeypatch):
    monkeypatch.setenv("CBCORE_NUM_THREADS", "1")  # the kernel inherits it: tiny toy, no contention
    nb_path = ROOT / "notebooks" / "toy_lq.ipynb"
    nb = nbformat.read(nb_path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")
    run_dir = tmp_path / "run"
    pm.execute_notebook(
        str(nb_path),
        str(tmp_path / "out.ipynb"),
        kernel_name="python3",
        progress_bar=False,
        parameters={
            "experiment": "toy_lq",
            "profile": "quick",
            "seed": 7,
            "run_dir": str(run_dir),
            "overrides": {**TINY, "methods": ["dfa", "state_bridge", "credit_bridge"]},
        },
        cwd=str(tmp_path),
    )
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["seed"] == 7
    assert set(summary["methods"]) == {"dfa", "state_bridge", "credit_bridge"}
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    html = [o for c in out.cells for o in c.get("outputs", []) if "text/html" in o.get("data", {})]
    assert html, "no figure or table rendered"


def test_quadratic_value_net_holds_the_soft_value_exactly():
    """value_mlp: false — ½‖A h + C y + c‖²/r + offset is the toy's soft value for
    A = √r R^{-1/2} P_l, C = −√r R^{-1/2}: then the bridge credit is ∇V_l itself."""
    P = load_params("toy_lq", overrides={**TINY, "value_mlp": False, "value_rank": 8})
    net = ToyLQ(P.d_hidden, P.num_layers, P.theta, P.seed)
    with torch.no_grad():
        net.M.copy_(general_M(8, 3, 7))
    method = make_method("credit_bridge", net, P)
    Pl, R = soft_value_matrices(net.M, P.sigma_bridge, P.lam)
    e, U = torch.linalg.eigh(R)
    R_isqrt = (U * e.rsqrt()[:, None]) @ U.transpose(1, 2)  # (L+1, d, d)
    with torch.no_grad():
        method.V.A.copy_(8**0.5 * R_isqrt @ Pl)
        method.V.C.copy_(-(8**0.5) * R_isqrt)
        method.V.c.zero_()
    x, y = net.sample(16, torch.Generator().manual_seed(1))
    hs = net.trajectory(x)
    V, soft = soft_values(net.M, hs, y, P.sigma_bridge, P.lam)
    ctx = CreditContext(hs=hs, y=y, g_L=hs[-1], err=hs[-1], loss=V[-1], step=1, total_steps=1)
    torch.testing.assert_close(method.bridge_credits(net, ctx), soft, rtol=1e-4, atol=1e-6)
    vals = method.V(hs, y) - method.V.offset[:, None]
    torch.testing.assert_close(
        vals - vals.mean(1, keepdim=True), V - V.mean(1, keepdim=True), rtol=1e-4, atol=1e-6
    )


def test_thread_count_from_params_or_the_batch_runner(monkeypatch):
    n = torch.get_num_threads()
    monkeypatch.delenv("CBCORE_NUM_THREADS", raising=False)
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == n  # restored
    monkeypatch.setenv("CBCORE_NUM_THREADS", "1")
    with cpu_threads(0):
        assert torch.get_num_threads() == 1
    monkeypatch.setenv("CBCORE_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="CBCORE_NUM_THREADS"):
        with cpu_threads(1):
            pass
