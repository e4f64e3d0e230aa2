"""The block-local training step, shared by every credit method (DESIGN §3).

Each block's parameters are updated only from its own forward and its credit:

    grad θ_l = (∂F_l(h_{l-1}.detach())/∂θ_l)^T g_l / B,

the embedding from g_0, the head from the exact CE gradient with h_L detached. One backward
over the surrogate  Σ_l <g_l, F_l(h_{l-1}.detach())>/B + CE(head(h_L.detach()))  does it in
one pass. The forward keeps each block's graph local: block l sees a detached copy of
h_{l-1}, so no gradient can travel from one block into another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from cbcore.methods.base import CreditContext, CreditMethod, check_credits
from cbcore.model import CreditNet


@dataclass
class LocalForward:
    """A forward pass whose block graphs are cut at every block input."""

    h0: Tensor  # (B, d) embedding output, graph to the embedding's parameters
    outs: list[Tensor]  # L tensors (B, d): F_l(h_{l-1}.detach()), graph to block l only
    inps: list[Tensor]  # L detached block inputs (leaves; requires_grad only for block_vjp)
    hs: Tensor  # (L+1, B, d) detached trajectory


def local_forward(net: CreditNet, x: Tensor, input_grad: bool = False) -> LocalForward:
    h0 = net.embed(x)  # (B, d)
    h = h0
    outs, inps = [], []
    for l in range(net.num_layers):
        inp = h.detach().requires_grad_(input_grad)  # cut: block l+1 sees a leaf
        h = net.block(l, inp)
        inps.append(inp)
        outs.append(h)
    hs = torch.stack([h0.detach()] + [o.detach() for o in outs])  # (L+1, B, d)
    return LocalForward(h0, outs, inps, hs)


def make_block_vjp(fwd: LocalForward):
    """block_vjp(l, g) = ∂<g, h_l>/∂h_{l-1} through block l (1-based), graphs retained."""

    def block_vjp(l: int, g: Tensor) -> Tensor:
        (gi,) = torch.autograd.grad(fwd.outs[l - 1], fwd.inps[l - 1], g, retain_graph=True)
        return gi

    return block_vjp


def terminal(net: CreditNet, h_L: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Head on detached h_L: logits z (graph to head params), per-example loss, g_L, err."""
    h_L = h_L.detach().requires_grad_(True)
    z = net.output(h_L)  # (B, C)
    loss = net.loss_per_example(z, y)  # (B,)
    (g_L,) = torch.autograd.grad(loss.sum(), h_L, retain_graph=True)  # (B, d): ∂ℓ_i/∂h_L
    return z, loss, g_L, net.output_error(z.detach(), y)


def surrogate_loss(fwd: LocalForward, credits: Tensor, g_L: Tensor, loss: Tensor) -> Tensor:
    """Σ_l <g_l, h_l>/B over the local graphs + mean CE through the head (h_L detached).

    h_0 carries the embedding's graph and h_l (l ≥ 1) block l's, so layer l's parameters get
    exactly (∂h_l/∂θ_l)^T g_l / B; block L gets the exact g_L.
    """
    g = torch.cat([credits.detach(), g_L.detach()[None]])  # (L+1, B, d)
    h = torch.stack([fwd.h0, *fwd.outs])  # (L+1, B, d), one graph per layer
    return (g * h).sum() / loss.shape[0] + loss.mean()


@dataclass
class StepResult:
    loss: Tensor  # scalar (device tensor: no host sync here)
    correct: Tensor | None  # number of correct predictions (classification) or None
    credits: Tensor  # (L, B, d)
    logs: dict = field(default_factory=dict)


def compute_update(
    net: CreditNet,
    method: CreditMethod,
    x: Tensor,
    y: Tensor,
    step: int = 0,
    total_steps: int = 1,
    params: list[Tensor] | None = None,
) -> StepResult:
    """Forward, credits (the method also trains its feedback nets), and — if `params` is
    given — the block-local gradients written into those parameters' `.grad`."""
    fwd = local_forward(net, x, input_grad=method.needs_block_vjp)
    z, loss, g_L, err = terminal(net, fwd.hs[-1], y)
    ctx = CreditContext(
        hs=fwd.hs,
        y=y,
        g_L=g_L.detach(),
        err=err,
        loss=loss.detach(),
        step=step,
        total_steps=total_steps,
        block_vjp=make_block_vjp(fwd) if method.needs_block_vjp else None,
    )
    out = method.step(net, ctx)
    check_credits(out.credits, ctx, method.name)
    if params:
        surrogate_loss(fwd, out.credits, g_L, loss).backward(inputs=params)
    correct = None
    if z.dim() == 2 and y.dim() == 1 and not y.is_floating_point():
        correct = (z.detach().argmax(-1) == y).sum()
    return StepResult(loss.detach().mean(), correct, out.credits, out.logs)


def train_step(
    net: CreditNet,
    method: CreditMethod,
    opt: torch.optim.Optimizer | None,
    x: Tensor,
    y: Tensor,
    step: int = 0,
    total_steps: int = 1,
    scheduler=None,
) -> StepResult:
    """One block-local step: forward, credits (method also trains its feedback nets), update.

    With `opt=None` the network is not updated (the toy's frozen run); the method still learns.
    """
    params = None
    if opt is not None:
        opt.zero_grad(set_to_none=True)
        params = [p for group in opt.param_groups for p in group["params"]]
    result = compute_update(net, method, x, y, step, total_steps, params)
    if opt is not None:
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return result


def make_optimizer(net: torch.nn.Module, lr: float, weight_decay: float, total_steps: int):
    """AdamW on every network parameter (no decay on biases and norms) + a cosine schedule."""
    skip = set(getattr(net, "NO_DECAY", ()))  # stacked biases/norm scales are 2-D: name them
    named = list(net.named_parameters())
    decay = [p for n, p in named if p.dim() >= 2 and n not in skip]
    no_decay = [p for n, p in named if p.dim() < 2 or n in skip]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=lr,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total_steps) / max(total_steps, 1)))
    )
    return opt, sched
