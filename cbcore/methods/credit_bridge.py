"""credit_bridge: a value network V_φ(h, l, y) whose input gradient is the credit.

V_φ approximates the soft loss-to-go under the noisy forward h_{l+1} = F_{l+1}(h_l + σξ):

    V_l(h) = −λ log E_ξ exp(−V_{l+1}(F_{l+1}(h + σξ))/λ),      V_L(h) = ℓ(head(h), y)

Per step, for every layer l < L at once (layer-batched):
  anchors  a = h_l + σζ (the clean state is one of them), K continuations each,
           c_k = V̄(F_{l+1}(a + σξ_k), l+1, y), V̄ the EMA target, V̄(·, L, y) = exact loss;
  target   T = −λ log (1/K) Σ_k exp(−c_k/λ)                    (log-sum-exp)
  losses   (V_φ(a, l, y) − T)²
           + (V_φ(h_L, L, y) − ℓ)² + term_grad_weight·‖∇_h V_φ(h_L, L, y) − g_L‖²/‖g_L‖²
           + fm_weight·(V_φ(h_l, l, y) − ℓ)²
Credit: g_l = ∇_h V_φ(h_l, l, y); DFA's for the first `warmup_frac` of training, then a
linear blend g = (1−α)·g_dfa + α·g_cb over `blend_frac`. The value net trains from step 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from cbcore.methods.base import (
    CreditContext,
    LearnedCreditMethod,
    StackedMLP,
    ema_copy,
    ema_update,
    make_generator,
    register,
)
from cbcore.methods.dfa import feedback_matrices
from cbcore.model import CreditNet


def tile(t: Tensor, n: int) -> Tensor:
    """Repeat a batch n times along dim 0 (example order: [batch, batch, ...])."""
    return t.repeat(n, *([1] * (t.dim() - 1)))


class ValueNet(nn.Module):
    """V_φ for layers 0..L, one net per layer (stacked weights, layer-batched calls).

    V(h, y) = MLP([h, y]) + ½·mean_r(u²),  u = A h + C y + c   (either part is optional;
                                                              without the MLP, + a per-layer offset)

    The quadratic term can represent a linear-quadratic value exactly (the toy's); the MLP
    term carries what is not quadratic (cross-entropy's log-sum-exp).
    """

    def __init__(
        self,
        n: int,
        d: int,
        dy: int,
        hidden: int,
        depth: int,
        quadratic: bool,
        rank: int,
        generator: torch.Generator,
        mlp: bool = True,
    ) -> None:
        super().__init__()
        if not (mlp or quadratic):
            raise ValueError("credit_bridge: the value net needs value_mlp or value_quadratic")
        self.d = d
        self.mlp = StackedMLP(n, d + dy, hidden, 1, depth, generator) if mlp else None
        if not mlp:  # ½‖u‖² holds no constant: a per-layer offset stands in for the MLP's
            self.offset = nn.Parameter(torch.zeros(n))  # (n,)
        # Per-layer input standardization h ↦ (h − μ_l)/s_l with running statistics held
        # as constants (buffers): an affine map, so ∇_h V stays exact, and the regression stays
        # well-conditioned while the states' scale drifts during training.
        self.register_buffer("mu", torch.zeros(n, d))
        self.register_buffer("s", torch.ones(n))
        self.register_buffer("stats_ready", torch.zeros((), dtype=torch.bool))
        self.quadratic = quadratic
        if quadratic:
            self.A = nn.Parameter(
                torch.randn(n, rank, d, generator=generator) / d**0.5
            )  # (n, r, d)
            self.C = nn.Parameter(torch.zeros(n, rank, dy))  # (n, r, dy)
            self.c = nn.Parameter(torch.zeros(n, rank))  # (n, r)

    def forward(self, h: Tensor, yf: Tensor, layers: slice = slice(None)) -> Tensor:
        """h (n, N, d), yf (N, dy) -> V (n, N)."""
        n, N, _ = h.shape
        mu, s = self.mu[layers], self.s[layers, None, None]  # (n, d), (n, 1, 1)
        if self.mlp is not None:
            hn = (h - mu[:, None]) / s  # (n, N, d)
            v = self.mlp(torch.cat([hn, yf.expand(n, *yf.shape)], -1), layers)[..., 0]  # (n, N)
        else:
            v = self.offset[layers, None].expand(n, N)  # (n, N)
        if self.quadratic:
            # The standardization is folded into A and c, and y's term is one GEMM for all
            # layers: the continuations make N large, and each pass over (n, N, ·) costs.
            A = self.A[layers] / s  # (n, r, d)
            c = self.c[layers] - torch.einsum("nrd,nd->nr", A, mu)  # (n, r)
            yC = (yf @ self.C[layers].flatten(0, 1).T).view(N, n, -1).transpose(0, 1)  # (n, N, r)
            u = torch.baddbmm(yC + c[:, None], h, A.transpose(1, 2))  # (n, N, r)
            v = v + (0.5 / u.shape[-1]) * (u * u).sum(-1)
        return v

    @torch.no_grad()
    def update_stats(self, hs: Tensor, momentum: float = 0.99) -> None:
        """Running mean and RMS scale of the states per layer; hs (n, N, d)."""
        mu = hs.mean(1)  # (n, d)
        s = (hs - mu[:, None]).pow(2).mean((1, 2)).sqrt().clamp_min(1e-6)  # (n,)
        first = ~self.stats_ready
        self.mu.copy_(torch.where(first, mu, self.mu.lerp(mu, 1 - momentum)))
        self.s.copy_(torch.where(first, s, self.s.lerp(s, 1 - momentum)))
        self.stats_ready.fill_(True)


@register("credit_bridge")
class CreditBridge(LearnedCreditMethod):
    name = "credit_bridge"

    def __init__(self, net: CreditNet, params, *, seed: int = 0) -> None:
        super().__init__(seed)
        gen = make_generator(seed + 15485863, "cpu")
        L = net.num_layers
        self.V = ValueNet(
            L + 1,
            net.d,
            net.target_dim,
            params.fb_hidden,
            params.fb_depth,
            params.value_quadratic,
            params.value_rank,
            gen,
            mlp=params.value_mlp,
        )
        self.V_target = ema_copy(self.V)  # V̄
        self.register_buffer("B", feedback_matrices(net, seed, params.dfa_scale))  # DFA warmup
        self.opt = torch.optim.Adam(self.V.parameters(), lr=params.lr_fb)
        self.sigma, self.lam, self.K, self.m = (
            params.sigma_bridge,
            params.lam,
            params.K,
            params.num_anchors,
        )
        self.term_grad_weight, self.fm_weight = params.term_grad_weight, params.fm_weight
        self.momentum, self.fb_batch_frac = params.ema_momentum, params.fb_batch_frac
        self.warmup_frac, self.blend_frac = params.warmup_frac, params.blend_frac
        self.cont_weight = params.cont_weight
        self.gate_err = params.gate_err
        if self.gate_err > 0 and self.cont_weight == 0:
            raise ValueError(
                "credit_bridge: gate_err > 0 needs cont_weight > 0 (the gate reads "
                "the local-difference error); set cont_weight or gate_err: 0"
            )
        # running per-layer relative error of the local-difference match (1 = untrained)
        self.register_buffer("cont_err", torch.ones(L))

    def alpha(self, step: int, total_steps: int) -> float:
        """Blend weight of the bridge credit: 0 during warmup, then linear to 1 (host scalar)."""
        t = step / max(total_steps, 1)
        if self.blend_frac == 0:
            return float(t >= self.warmup_frac)
        return min(1.0, max(0.0, (t - self.warmup_frac) / self.blend_frac))

    def bridge_credits(self, net: CreditNet, ctx: CreditContext) -> Tensor:
        """g_l = ∇_h V_φ(h_l, l, y) for l = 0..L-1, one batched call: (L, B, d)."""
        L = ctx.hs.shape[0] - 1
        with torch.enable_grad():
            h = ctx.hs[:L].detach().requires_grad_(True)  # detached leaf
            v = self.V(h, net.target_features(ctx.y), slice(0, L))
            (g,) = torch.autograd.grad(v.sum(), h)
        return g

    def trust(self) -> Tensor:
        """Per-layer weight of the bridge credit under `gate_err` (L,): layer l is trusted as
        far as its own and every later layer's local-difference error is below gate_err —
        a forward-only estimate of the value gradient's quality (V_l leans on V̄_{l+1})."""
        ok = (1 - self.cont_err / self.gate_err).clamp(0, 1)  # (L,)
        return ok.flip(0).cumprod(0).flip(0)

    def credits(self, net: CreditNet, ctx: CreditContext) -> Tensor:
        a = self.alpha(ctx.step, ctx.total_steps)
        gated = self.gate_err > 0
        if a == 1.0 and not gated:
            return self.bridge_credits(net, ctx)
        g_dfa = torch.einsum("ldc,bc->lbd", self.B.to(ctx.err.dtype), ctx.err)  # (L, B, d)
        if a == 0.0:
            return g_dfa
        w = a * self.trust()[:, None, None] if gated else a  # (L, 1, 1) or a scalar
        return (1 - w) * g_dfa + w * self.bridge_credits(net, ctx)

    def step(self, net: CreditNet, ctx: CreditContext):
        out = super().step(net, ctx)
        out.logs["credit_bridge/alpha"] = self.alpha(ctx.step, ctx.total_steps)
        if self.gate_err > 0:
            out.logs["credit_bridge/trust_mean"] = self.trust().mean()
        return out

    @torch.no_grad()
    def bridge_targets(
        self, net: CreditNet, anchors: Tensor, y: Tensor, gen
    ) -> tuple[Tensor, Tensor, Tensor]:
        """T = −λ log mean_k exp(−c_k/λ) over K noisy one-block continuations: (L, N); also
        the continuations' inputs u_k = a + σξ_k (L, K·N, d) and their values c_k (L, K·N)."""
        L, N, d = anchors.shape
        K = self.K
        xi = torch.randn((L, K * N, d), generator=gen, device=anchors.device)
        u = anchors.repeat(1, K, 1) + self.sigma * xi  # (L, K·N, d)
        nxt = net.step_all(u)  # (L, K·N, d)
        c = torch.empty(L, K * N, device=anchors.device, dtype=nxt.dtype)  # (L, K·N)
        yK = tile(y, K)
        if L > 1:
            c[: L - 1] = self.V_target(nxt[: L - 1], net.target_features(yK), slice(1, L))
        c[L - 1] = net.loss_per_example(net.output(nxt[L - 1]), yK)  # V̄(·, L) = exact loss
        T = -self.lam * (torch.logsumexp(-c.view(L, K, N) / self.lam, dim=1) - math.log(K))
        return T, u, c

    def train_feedback(self, net: CreditNet, ctx: CreditContext) -> dict[str, Tensor]:
        hs, L = ctx.hs, ctx.hs.shape[0] - 1
        B = max(1, int(round(hs.shape[1] * self.fb_batch_frac)))
        y, loss, g_L = ctx.y[:B], ctx.loss[:B], ctx.g_L[:B]
        gen = self.noise_generator(hs.device)
        self.V.update_stats(hs[:, :B])
        with torch.no_grad():
            clean = hs[:L, :B]  # (L, B, d)
            zeta = torch.randn((L, B * (self.m - 1), hs.shape[2]), generator=gen, device=hs.device)
            anchors = torch.cat([clean, clean.repeat(1, self.m - 1, 1) + self.sigma * zeta], 1)
            ya = tile(y, self.m)  # labels of the anchors, (mB, ...)
            T, u, c = self.bridge_targets(net, anchors, ya, gen)  # (L, mB), (L, K·mB, ·)
        v_a = self.V(anchors.detach(), net.target_features(ya), slice(0, L))  # (L, mB)
        bridge = (v_a - T).pow(2).mean()
        if self.cont_weight > 0:
            # Local differences at the continuations' inputs u_k = a + σξ_k: within one anchor,
            # V(u_k) − mean_j V(u_j) should match c_k − mean_j c_j. Across examples values vary
            # far more than within a σ-ball, so a plain regression never resolves the gradient;
            # the centered differences are ≈ σ(ξ_k − ξ̄)·∇, a directional-derivative match in
            # K−1 random directions per anchor (relative error, like the terminal match).
            v_u = self.V(u, net.target_features(tile(ya, self.K)), slice(0, L))  # (L, K·mB)
            dv = v_u.view(L, self.K, -1)
            dc = c.view(L, self.K, -1)
            dv = dv - dv.mean(1, keepdim=True)
            dc = dc - dc.mean(1, keepdim=True)
            cont = (dv - dc).pow(2).sum() / dc.pow(2).sum().clamp_min(1e-12)
            total_cont = self.cont_weight * cont
            logs_cont = cont.detach()
            with torch.no_grad():  # per layer, for the trust gate
                err = (dv - dc).pow(2).sum((1, 2)) / dc.pow(2).sum((1, 2)).clamp_min(1e-12)
                self.cont_err.lerp_(err, 0.05)

        h_L = hs[L, :B].detach().requires_grad_(True)  # detached leaf
        v_L = self.V(h_L[None], net.target_features(y), slice(L, L + 1))[0]  # (B,)
        term_value = (v_L - loss).pow(2).mean()
        total = bridge + term_value
        logs = {
            "credit_bridge/bridge_loss": bridge.detach(),
            "credit_bridge/term_value_loss": term_value.detach(),
        }
        if self.cont_weight > 0:
            total = total + total_cont
            logs["credit_bridge/cont_loss"] = logs_cont
        if self.term_grad_weight > 0:
            (gv,) = torch.autograd.grad(v_L.sum(), h_L, create_graph=True)  # double backward
            # normalized over the batch, not per example: a well-fitted example has a tiny
            # ‖g_L‖, and per-example ratios then blow up and destabilize the value net
            term_grad = (gv - g_L).pow(2).sum() / g_L.pow(2).sum().clamp_min(1e-12)
            total = total + self.term_grad_weight * term_grad
            logs["credit_bridge/term_grad_loss"] = term_grad.detach()
        if self.fm_weight > 0:
            fm = (v_a[:, :B] - loss).pow(2).mean()
            total = total + self.fm_weight * fm
            logs["credit_bridge/fm_loss"] = fm.detach()
        self.opt.zero_grad(set_to_none=True)
        total.backward(inputs=list(self.V.parameters()))
        self.opt.step()
        ema_update(self.V_target, self.V, self.momentum)
        return logs

    @torch.no_grad()
    def diagnose(self, net: CreditNet, ctx: CreditContext, true: Tensor) -> dict[str, Tensor]:
        """Per layer: correlation over examples of V_φ(h_l, l, y) with the realized loss, and
        the cosine of the pure bridge credit ∇V_φ (whatever the warmup blend) with the truth."""
        v = self.V(ctx.hs, net.target_features(ctx.y))  # (L+1, B)
        vc = v - v.mean(1, keepdim=True)
        lc = (ctx.loss - ctx.loss.mean())[None]
        corr = (vc * lc).sum(1) / (vc.norm(dim=1) * lc.norm(dim=1)).clamp_min(1e-12)
        with torch.enable_grad():
            g_cb = self.bridge_credits(net, ctx)
        cos = torch.nn.functional.cosine_similarity(g_cb, true, dim=-1, eps=1e-12).mean(1)
        return {"value_corr": corr[:-1], "bridge_cos": cos}
