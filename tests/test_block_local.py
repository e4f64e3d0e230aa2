"""The block-local rule against backprop, and the proofs that no hidden backprop happens."""

from __future__ import annotations

import pytest
import torch

import cbcore.train as train
from cbcore.methods import REGISTRY, make_method
from cbcore.metrics import diagnose
from cbcore.train import compute_update, make_optimizer, train_step
from tests.helpers import teacher_batch, tiny_net, tiny_params

NON_BP = [m for m in REGISTRY if m != "bp"]


def test_block_local_with_exact_credits_reproduces_backprop():
    """Item 1: with bp's exact credits, every parameter's gradient equals backprop's (≤ 1e-5)."""
    net = tiny_net()
    x, y = teacher_batch()
    params = list(net.parameters())

    _, logits = net(x)
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), params)

    method = make_method("bp", net, tiny_params())
    for p in params:
        p.grad = None
    compute_update(net, method, x, y, params=params)
    names = [n for n, _ in net.named_parameters()]
    diffs = {n: (p.grad - r).abs().max().item() for n, p, r in zip(names, params, ref)}
    assert all(p.grad is not None for p in params)
    assert max(diffs.values()) <= 1e-5, diffs
    assert set(diffs) == {
        "emb.weight",
        "emb.bias",
        "ln_w",
        "ln_b",
        "W1",
        "b1",
        "W2",
        "b2",
        "head_ln.weight",
        "head_ln.bias",
        "head.weight",
        "head.bias",
    }


def expected_local_grads(net, x, credits, g_L):
    """Independent computation of the rule with torch.func: block l's parameter gradient is
    the VJP of F_l alone (its own slice of the weights, its detached input) with g_l / B."""
    B, L = x.shape[0], net.num_layers
    with torch.no_grad():
        hs, _ = net(x)
    names = net.BLOCK_PARAMS
    expected = {n: torch.zeros_like(getattr(net, n)) for n in names}
    for l in range(1, L + 1):
        g = credits[l] if l < L else g_L
        own = {n: getattr(net, n)[l - 1].detach() for n in names}

        def block(w, h=hs[l - 1], l=l):
            u = torch.nn.functional.layer_norm(h, (net.d,), w["ln_w"], w["ln_b"])
            a = torch.nn.functional.gelu(u @ w["W1"].T + w["b1"])
            return h + a @ w["W2"].T + w["b2"]

        _, vjp = torch.func.vjp(block, own)
        (grads,) = vjp(g / B)
        for n in names:
            expected[n][l - 1] = grads[n]
    return expected


def broken_local_forward(net, x, input_grad=False):
    """A deliberately broken trainer: blocks see the *attached* previous state, so block l's
    parameters also receive the gradient of every block above it (hidden backprop)."""
    h0 = net.embed(x)
    h, outs, inps = h0, [], []
    for l in range(net.num_layers):
        inps.append(h)
        h = net.block(l, h)  # no detach
        outs.append(h)
    hs = torch.stack([h0.detach()] + [o.detach() for o in outs])
    return train.LocalForward(h0, outs, inps, hs)


def block_grads_are_local(method_name: str) -> bool:
    """Run one update; True iff every block's gradient is exactly its own local VJP."""
    net = tiny_net()
    x, y = teacher_batch()
    method = make_method(method_name, net, tiny_params())
    params = list(net.parameters())
    res = compute_update(net, method, x, y, params=params)
    with torch.no_grad():
        hs, logits = net(x)
    h_L = hs[-1].clone().requires_grad_(True)
    (g_L,) = torch.autograd.grad(net.loss_per_example(net.output(h_L), y).sum(), h_L)
    expected = expected_local_grads(net, x, res.credits.detach(), g_L)
    return all(
        torch.allclose(getattr(net, n).grad, expected[n], atol=1e-6, rtol=1e-4)
        for n in net.BLOCK_PARAMS
    )


class GradProbe(torch.autograd.Function):
    """Identity whose backward records that a gradient passed (from a block to its input)."""

    hits: list = []

    @staticmethod
    def forward(ctx, h):
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g):
        GradProbe.hits.append(float(g.abs().max()))
        return g


def probed_block(net):
    inner = net.block

    def block(l, h):
        return inner(l, GradProbe.apply(h)) if h.requires_grad else inner(l, h)

    return block


@pytest.mark.parametrize("method_name", NON_BP)
def test_no_gradient_reaches_a_block_from_above(method_name, monkeypatch):
    """Item 2: for every non-BP method, each block's gradient is its local VJP, and no
    backward pass ever runs through a block into its input during the update."""
    assert block_grads_are_local(method_name)

    net = tiny_net()
    x, y = teacher_batch()
    method = make_method(method_name, net, tiny_params())
    monkeypatch.setattr(net, "block", probed_block(net))
    GradProbe.hits.clear()
    opt, _ = make_optimizer(net, 1e-3, 0.0, 10)
    train_step(net, method, opt, x, y)
    assert GradProbe.hits == []


@pytest.mark.parametrize("method_name", NON_BP)
def test_hidden_backprop_check_fails_on_a_broken_trainer(method_name, monkeypatch):
    """The checks above can fail: with a trainer that forgets to detach, both catch it."""
    monkeypatch.setattr(train, "local_forward", broken_local_forward)
    assert not block_grads_are_local(method_name)

    net = tiny_net()
    x, y = teacher_batch()
    method = make_method(method_name, net, tiny_params())
    monkeypatch.setattr(net, "block", probed_block(net))
    GradProbe.hits.clear()
    opt, _ = make_optimizer(net, 1e-3, 0.0, 10)
    train_step(net, method, opt, x, y)
    assert GradProbe.hits, "the probe saw no gradient through a block in the broken trainer"


def reaches(t: torch.Tensor, targets: set[int]) -> bool:
    """True iff t's autograd graph reaches one of the target leaves (by id)."""
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # AccumulateGrad nodes hold their leaf
        if var is not None and id(var) in targets:
            return True
        stack.extend(f for f, _ in fn.next_functions)
    return False


def feedback_inputs_attached(method, net, x, y) -> list[str]:
    """One training step with a hook on each feedback network of the method (its top-level
    submodules); returns the names of those that got an input whose graph reaches a
    parameter of the main network."""
    net_params = {id(p) for p in net.parameters()}
    bad: list[str] = []
    calls: list[str] = []

    def hook(name):
        def pre(module, args):
            calls.append(name)
            if any(isinstance(a, torch.Tensor) and reaches(a, net_params) for a in args):
                bad.append(name)

        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in method.named_children()]
    try:
        opt, _ = make_optimizer(net, 1e-3, 0.0, 10)
        train_step(net, method, opt, x, y)
    finally:
        for h in handles:
            h.remove()
    assert len(set(calls)) >= 2, f"hooks fired only for {set(calls)}: the check saw nothing"
    return bad


@pytest.mark.parametrize("method_name", ["state_bridge", "credit_bridge"])
def test_feedback_networks_see_only_detached_inputs(method_name, monkeypatch):
    net = tiny_net()
    x, y = teacher_batch()
    method = make_method(method_name, net, tiny_params())
    nets = [n for n, _ in method.named_children()]
    assert len(nets) >= 2, nets  # the learned net and its EMA target
    assert feedback_inputs_attached(method, net, x, y) == []

    # Broken variant: the trainer hands over an attached trajectory and the method forgets
    # to detach it (Tensor.detach made a no-op): the check must see it.
    def attached_forward(net, x, input_grad=False):
        fwd = broken_local_forward(net, x, input_grad)
        fwd.hs = torch.stack([fwd.h0] + fwd.outs)
        return fwd

    monkeypatch.setattr(train, "local_forward", attached_forward)
    monkeypatch.setattr(torch.Tensor, "detach", lambda t: t)
    method = make_method(method_name, net, tiny_params())
    assert feedback_inputs_attached(method, net, x, y)


@pytest.mark.parametrize("method_name", list(REGISTRY))
def test_update_is_bit_identical_with_diagnostics_on_and_off(method_name):
    """Item 3: diagnostics between steps change nothing in the parameter trajectory."""
    x, y = teacher_batch()

    def run(with_diag: bool):
        torch.manual_seed(0)
        net = tiny_net()
        P = tiny_params(warmup_frac=0.3, blend_frac=0.3)  # cross the credit-bridge blend too
        method = make_method(method_name, net, P)
        opt, sched = make_optimizer(net, 1e-2, 0.01, 6)
        for s in range(6):
            train_step(net, method, opt, x, y, s, 6, sched)
            if with_diag:
                diagnose(net, method, x[:16], y[:16], step=s, total_steps=6, seed=s)
        return [p.detach().clone() for p in [*net.parameters(), *method.parameters()]]

    a, b = run(False), run(True)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
