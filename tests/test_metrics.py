"""Diagnostics against their known answers on analytic cases (item 5)."""

from __future__ import annotations

import torch
from torch import nn

from cbcore.methods import make_method
from cbcore.metrics import (
    broadcast_credits,
    cosine_per_layer,
    diagnose,
    nudge_curves,
    nudge_delta,
    rho_per_layer,
    true_gradients,
    update_cosine,
)
from tests.helpers import teacher_batch, tiny_net, tiny_params


class LinearQuadNet(nn.Module):
    """h_l = M_l h_{l-1}, ℓ = ½‖h_L − y‖²/d: quadratic in every h_l (a CreditNet)."""

    def __init__(self, d=32, L=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_layers, self.d, self.out_dim, self.target_dim = L, d, d, d
        self.M = nn.Parameter(torch.eye(d) + 0.3 * torch.randn(L, d, d, generator=g) / d**0.5)

    def embed(self, x):
        return x

    def block(self, l, h):
        return h @ self.M[l].T

    def step_all(self, h):
        return torch.bmm(h, self.M.transpose(1, 2))

    def output(self, h):
        return h

    def loss_per_example(self, z, y):
        return 0.5 * (z - y).pow(2).mean(-1)

    def output_error(self, z, y):
        return (z - y) / self.d

    def target_features(self, y):
        return y

    def stacked_block_params(self):
        return [self.M]

    def embed_parameters(self):
        return []

    def head_parameters(self):
        return []


def test_cosine_and_rho_of_the_true_gradient_are_one():
    net = tiny_net()
    x, y = teacher_batch(n=32)
    _, true, _, _ = true_gradients(net, x, y)
    assert torch.allclose(cosine_per_layer(true, true), torch.ones(true.shape[0]), atol=1e-6)
    assert torch.allclose(rho_per_layer(true, true), torch.ones(true.shape[0]), atol=1e-6)
    # and they see scale and direction: 2×truth has rho 2, −truth has cosine −1
    assert torch.allclose(rho_per_layer(2 * true, true), 2 * torch.ones(true.shape[0]), atol=1e-6)
    assert torch.allclose(cosine_per_layer(-true, true), -torch.ones(true.shape[0]), atol=1e-6)


def test_nudge_along_true_gradient_matches_the_quadratic_and_has_efficiency_one():
    torch.manual_seed(0)
    net = LinearQuadNet(d=32, L=3)
    x, y = torch.randn(64, 32), torch.randn(64, 32)
    hs, true, _, _ = true_gradients(net, x, y)
    layer, eps = 1, 0.05
    # exact second-order expansion (exact for a quadratic): Δ = mean_i(−a_i‖g_i‖ + ½a_i²uᵀHu)
    g = true[layer]
    u = g / g.norm(dim=-1, keepdim=True)
    a = eps * hs[layer].norm(dim=-1, keepdim=True)
    P = net.M[2] @ net.M[1]  # maps h_1 to h_3
    Pu = u @ P.T
    analytic = (
        -a[:, 0] * g.norm(dim=-1) * 64 / 64 + 0.5 * a[:, 0] ** 2 * Pu.pow(2).mean(-1)
    ).mean()
    # true holds per-example gradients of ℓ_i; the mean loss's change is the mean of changes
    measured = nudge_delta(net, hs[layer], layer, y, g, eps)
    assert abs(measured - analytic.item()) < 1e-5 * max(1.0, abs(analytic.item()))
    gen = torch.Generator().manual_seed(0)
    curves = nudge_curves(net, hs, y, layer, g, g, [0.01, 0.05, 0.1], gen)
    assert all(abs(e - 1.0) < 1e-6 for e in curves["efficiency"])
    assert all(t < 0 for t in curves["true"])  # a step against the gradient lowers the loss


def test_random_direction_efficiency_is_near_zero():
    torch.manual_seed(0)
    net = LinearQuadNet(d=256, L=2)
    x, y = torch.randn(512, 256), torch.randn(512, 256)
    hs, true, _, _ = true_gradients(net, x, y)
    gen = torch.Generator().manual_seed(1)
    curves = nudge_curves(net, hs, y, 0, true[0], true[0], [0.001], gen)
    # first order: E[cos(random, ∇)] = 0, spread ~ 1/sqrt(d·B); second order is tiny at ε=1e-3
    assert abs(curves["efficiency_random"][0]) < 0.05, curves


def test_bp_update_cosine_is_one_and_broadcast_is_not():
    net = tiny_net()
    x, y = teacher_batch(n=32)
    _, true, _, _ = true_gradients(net, x, y)
    L = net.num_layers
    cos = update_cosine(net, x, true[:L], true[:L], true[-1])
    assert torch.allclose(cos, torch.ones(L + 1), atol=1e-5)
    bc = update_cosine(net, x, broadcast_credits(true[-1], L), true[:L], true[-1])
    assert bc[:L].min() < 0.999  # the check is not blind: a wrong credit scores below 1
    assert abs(bc[L].item() - 1.0) < 1e-5  # the last block always uses the exact g_L


def test_diagnose_bp_is_exact_and_keys_are_namespaced():
    net = tiny_net()
    x, y = teacher_batch(n=32)
    out = diagnose(net, make_method("bp", net, tiny_params()), x, y)
    L = net.num_layers
    for l in range(L):
        assert abs(out[f"cos/layer_{l:02d}"] - 1) < 1e-5
        assert abs(out[f"rho/layer_{l:02d}"] - 1) < 1e-5
        assert abs(out[f"upd_cos/layer_{l:02d}"] - 1) < 1e-5
        assert abs(out[f"nudge_eff/layer_{l:02d}"] - 1) < 1e-4
    assert f"broadcast_cos/layer_{L - 1:02d}" in out


def test_method_specific_diagnostics():
    net = tiny_net()
    x, y = teacher_batch(n=32)
    cb = diagnose(net, make_method("credit_bridge", net, tiny_params()), x, y)
    sb = diagnose(net, make_method("state_bridge", net, tiny_params()), x, y)
    assert {"value_corr/layer_00", "bridge_cos/layer_00"} <= set(cb)
    # an untrained state predictor is the identity: its error is ‖h_l − h_L‖/‖h_L‖ exactly
    hs, _, _, _ = true_gradients(net, x, y)
    expect = ((hs[0] - hs[-1]).norm(dim=-1) / hs[-1].norm(dim=-1)).mean().item()
    assert abs(sb["pred_err/layer_00"] - expect) < 1e-5
