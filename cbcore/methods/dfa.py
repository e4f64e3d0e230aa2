"""dfa: Direct Feedback Alignment, g_l = B_l e with fixed random B_l (seeded, never trained)."""

from __future__ import annotations

import torch
from torch import Tensor

from cbcore.methods.base import CreditContext, CreditMethod, make_generator, register
from cbcore.model import CreditNet


def feedback_matrices(net: CreditNet, seed: int, scale: float = 1.0) -> Tensor:
    """(L, d, C) fixed random matrices, entries N(0, scale²/C), from their own generator."""
    g = make_generator(seed + 7919, "cpu")  # CPU generator: same matrices on every device
    L, d, C = net.num_layers, net.d, net.out_dim
    return torch.randn(L, d, C, generator=g) * (scale / C**0.5)


@register("dfa")
class DFA(CreditMethod):
    name = "dfa"

    def __init__(self, net: CreditNet, params=None, *, seed: int = 0) -> None:
        super().__init__()
        scale = getattr(params, "dfa_scale", 1.0)
        self.register_buffer("B", feedback_matrices(net, seed, scale))  # (L, d, C)

    def credits(self, net: CreditNet, ctx: CreditContext) -> Tensor:
        return torch.einsum("ldc,bc->lbd", self.B.to(ctx.err.dtype), ctx.err)  # (L, B, d)
