"""bp: exact backprop credits g_l = ∂ℓ/∂h_l, by vector-Jacobian products through the blocks."""

from __future__ import annotations

import torch
from torch import Tensor

from cbcore.methods.base import CreditContext, CreditMethod, register
from cbcore.model import CreditNet


@register("bp")
class Backprop(CreditMethod):
    """The reference. The only method that declares `needs_block_vjp`."""

    name = "bp"
    needs_block_vjp = True

    def __init__(self, net: CreditNet, params=None, *, seed: int = 0) -> None:
        super().__init__()

    def credits(self, net: CreditNet, ctx: CreditContext) -> Tensor:
        if ctx.block_vjp is None:
            # Diagnostics path: recompute the exact costate from the detached trajectory.
            return exact_credits(net, ctx.hs, ctx.g_L)
        L = ctx.hs.shape[0] - 1
        out = torch.empty_like(ctx.hs[:-1])  # (L, B, d)
        g = ctx.g_L
        for l in range(L, 0, -1):  # sequential by nature: g_{l-1} = J_l^T g_l
            g = ctx.block_vjp(l, g)
            out[l - 1] = g
        return out


def exact_credits(net: CreditNet, hs: Tensor, g_L: Tensor) -> Tensor:
    """∂ℓ/∂h_l for l = 0..L-1 from a detached trajectory, by VJPs through each block."""
    L = hs.shape[0] - 1
    out = torch.empty_like(hs[:-1])
    g = g_L
    with torch.enable_grad():
        for l in range(L, 0, -1):
            h = hs[l - 1].detach().requires_grad_(True)
            (g,) = torch.autograd.grad(net.block(l - 1, h), h, g)
            out[l - 1] = g
    return out
