"""The credit bridge's schedule, its trust gate and its parameter checks."""

from __future__ import annotations

import pytest
import torch

from cbcore.methods import CreditContext, make_method
from cbcore.metrics import true_gradients
from cbcore.train import train_step
from tests.helpers import teacher_batch, tiny_net, tiny_params


def test_blend_schedule():
    cb = make_method("credit_bridge", tiny_net(), tiny_params(warmup_frac=0.2, blend_frac=0.1))
    assert [cb.alpha(s, 100) for s in (0, 19, 20, 25, 30, 99)] == pytest.approx(
        [0, 0, 0, 0.5, 1, 1]
    )


def test_trust_is_cumulative_from_the_top():
    cb = make_method("credit_bridge", tiny_net(L=4), tiny_params(cont_weight=1.0, gate_err=0.5))
    cb.cont_err.copy_(torch.tensor([0.0, 0.25, 0.6, 0.1]))
    # own factors (1 - err/0.5)+ = [1, 0.5, 0, 0.8]; layer l also needs every layer above it
    assert torch.allclose(cb.trust(), torch.tensor([0.0, 0.0, 0.0, 0.8]))
    cb.cont_err.copy_(torch.tensor([0.25, 0.0, 0.0, 0.25]))
    assert torch.allclose(cb.trust(), torch.tensor([0.25, 0.5, 0.5, 0.5]))


def test_gated_credit_is_dfa_where_untrusted_and_bridge_where_trusted():
    net = tiny_net(L=4)
    x, y = teacher_batch(n=16)
    P = tiny_params(cont_weight=1.0, gate_err=0.5)
    cb = make_method("credit_bridge", net, P)
    cb.cont_err.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # layer 0 untrusted, others fully
    hs, grads, loss, err = true_gradients(net, x, y)
    ctx = CreditContext(hs=hs, y=y, g_L=grads[-1], err=err, loss=loss, step=99, total_steps=100)
    g = cb.credits(net, ctx)
    g_dfa = torch.einsum("ldc,bc->lbd", cb.B, err)
    g_cb = cb.bridge_credits(net, ctx)
    assert torch.allclose(g[0], g_dfa[0]) and torch.allclose(g[1:], g_cb[1:])


def test_gate_without_cont_weight_names_both_keys():
    with pytest.raises(ValueError, match="gate_err.*cont_weight"):
        make_method("credit_bridge", tiny_net(), tiny_params(gate_err=0.5))


def test_cont_loss_trains_and_updates_the_per_layer_error():
    net = tiny_net(L=4)
    x, y = teacher_batch(n=32)
    cb = make_method("credit_bridge", net, tiny_params(cont_weight=1.0))
    out = train_step(net, cb, None, x, y, 0, 10)
    assert "credit_bridge/cont_loss" in out.logs
    # moved from its initial 1 by 5% of the way towards the measured per-layer error
    assert not torch.allclose(cb.cont_err, torch.ones(4)) and torch.isfinite(cb.cont_err).all()
