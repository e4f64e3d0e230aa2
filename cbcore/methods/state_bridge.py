"""state_bridge: a learned state predictor G_ψ(h, l) ≈ h_L, credit by a VJP through G_ψ only.

G_ψ(h, l) = h + r_ψ(h, l)                      identity at init (r's last layer is zero)
g_l       = (∂G_ψ(h_l, l)/∂h)^T g_L             a vector-Jacobian product through G_ψ
training  : anchors a = h_l + σζ (the clean state is one of them), one noisy continuation
            target  Ḡ(F_{l+1}(a + σξ), l+1),  Ḡ(·, L) = identity,  Ḡ the EMA target of G_ψ
"""

from __future__ import annotations

import torch
from torch import Tensor

from cbcore.methods.base import (
    CreditContext,
    LearnedCreditMethod,
    StackedMLP,
    ema_copy,
    ema_update,
    make_generator,
    register,
)
from cbcore.model import CreditNet


class StatePredictor(torch.nn.Module):
    """G_ψ for layers 0..L-1, one residual MLP per layer, evaluated layer-batched."""

    def __init__(self, net: CreditNet, hidden: int, depth: int, generator: torch.Generator):
        super().__init__()
        self.r = StackedMLP(net.num_layers, net.d, hidden, net.d, depth, generator, zero_last=True)

    def forward(self, h: Tensor, layers: slice = slice(None)) -> Tensor:
        # normalize the input scale per example so one lr fits every layer; output stays in h units
        scale = h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()  # (n, N, 1)
        return h + scale * self.r(h / scale, layers)  # (n, N, d)


@register("state_bridge")
class StateBridge(LearnedCreditMethod):
    name = "state_bridge"

    def __init__(self, net: CreditNet, params, *, seed: int = 0) -> None:
        super().__init__(seed)
        gen = make_generator(seed + 104729, "cpu")
        self.G = StatePredictor(net, params.fb_hidden, params.fb_depth, gen)
        self.G_target = ema_copy(self.G)  # Ḡ
        self.opt = torch.optim.Adam(self.G.parameters(), lr=params.lr_fb)
        self.sigma, self.m = params.sigma_bridge, params.num_anchors
        self.momentum = params.ema_momentum
        self.fb_batch_frac = params.fb_batch_frac

    def credits(self, net: CreditNet, ctx: CreditContext) -> Tensor:
        L = ctx.hs.shape[0] - 1
        with torch.enable_grad():
            h = ctx.hs[:-1].detach().requires_grad_(True)  # (L, B, d) detached leaf
            out = self.G(h)
            (g,) = torch.autograd.grad(out, h, ctx.g_L.expand(L, -1, -1))
        return g

    def train_feedback(self, net: CreditNet, ctx: CreditContext) -> dict[str, Tensor]:
        hs, L = ctx.hs, ctx.hs.shape[0] - 1
        B = max(1, int(round(hs.shape[1] * self.fb_batch_frac)))
        gen = self.noise_generator(hs.device)
        with torch.no_grad():
            clean = hs[:L, :B]  # (L, B, d)
            noise = torch.randn((L, B * (self.m - 1), hs.shape[2]), generator=gen, device=hs.device)
            anchors = torch.cat([clean, clean.repeat(1, self.m - 1, 1) + self.sigma * noise], 1)
            xi = torch.randn(anchors.shape, generator=gen, device=hs.device)
            nxt = net.step_all(anchors + self.sigma * xi)  # (L, mB, d): F_{l+1}(a + σξ)
            target = nxt.clone()
            if L > 1:
                target[: L - 1] = self.G_target(
                    nxt[: L - 1], slice(1, L)
                )  # Ḡ(·, l+1); Ḡ(·, L) = id
        pred = self.G(anchors.detach())
        loss = (pred - target).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        ema_update(self.G_target, self.G, self.momentum)
        return {"state_bridge/loss": loss.detach()}

    @torch.no_grad()
    def diagnose(self, net: CreditNet, ctx: CreditContext, true: Tensor) -> dict[str, Tensor]:
        """Relative prediction error ‖G_ψ(h_l, l) − h_L‖/‖h_L‖ per layer (mean over examples)."""
        hs = ctx.hs
        pred = self.G(hs[:-1])
        err = (pred - hs[-1]).norm(dim=-1) / hs[-1].norm(dim=-1).clamp_min(1e-12)  # (L, B)
        return {"pred_err": err.mean(1)}
