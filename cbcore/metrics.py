"""Credit diagnostics (DESIGN §7), as pure functions.

True gradients come from `true_gradients`, a separate forward/backward pass that only asks
autograd for ∂ℓ/∂h_l (never touching a parameter's .grad): its result never reaches an
update. Every metric takes the true gradient as an argument.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from cbcore.methods.base import CreditContext, CreditMethod
from cbcore.model import CreditNet
from cbcore.records import layer_key
from cbcore.train import local_forward, surrogate_loss

DEFAULT_EPS = (0.01, 0.03, 0.1)


def true_gradients(net: CreditNet, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Separate exact pass: trajectory hs (L+1, B, d), ∂ℓ_i/∂h_l (L+1, B, d), loss (B,), err."""
    with torch.enable_grad():
        h = net.embed(x).detach().requires_grad_(True)
        hs = [h]
        for l in range(net.num_layers):
            h = net.block(l, h)
            hs.append(h)
        z = net.output(h)
        loss = net.loss_per_example(z, y)
        grads = torch.autograd.grad(loss.sum(), hs)  # states only: parameter .grad untouched
    return (
        torch.stack([t.detach() for t in hs]),
        torch.stack(grads).detach(),
        loss.detach(),
        net.output_error(z.detach(), y),
    )


@torch.no_grad()
def cosine_per_layer(credits: Tensor, true: Tensor) -> Tensor:
    """Mean over examples of cos(g_l, ∇_l): (L, B, d) × (L, B, d) -> (L,)."""
    return torch.nn.functional.cosine_similarity(credits, true, dim=-1, eps=1e-12).mean(-1)


@torch.no_grad()
def rho_per_layer(credits: Tensor, true: Tensor) -> Tensor:
    """Median over examples of ‖g_l‖/‖∇_l‖ (scale calibration): (L,)."""
    ratio = credits.norm(dim=-1) / true.norm(dim=-1).clamp_min(1e-12)
    return ratio.median(dim=-1).values


def broadcast_credits(g_L: Tensor, num_layers: int) -> Tensor:
    """The reference baseline: the terminal credit broadcast to every layer, (L, B, d)."""
    return g_L.expand(num_layers, *g_L.shape).clone()


@torch.no_grad()
def rollout_loss(net: CreditNet, h: Tensor, layer: int, y: Tensor) -> Tensor:
    """Mean loss after running blocks layer+1..L from a state h at `layer`."""
    for l in range(layer, net.num_layers):
        h = net.block(l, h)
    return net.loss_per_example(net.output(h), y).mean()


@torch.no_grad()
def nudge_delta(
    net: CreditNet, h: Tensor, layer: int, y: Tensor, direction: Tensor, eps: float
) -> float:
    """Δ mean loss after h ← h − ε‖h‖·dir/‖dir‖ (per example) at `layer`."""
    step = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    moved = h - eps * h.norm(dim=-1, keepdim=True) * step
    return float(rollout_loss(net, moved, layer, y) - rollout_loss(net, h, layer, y))


@torch.no_grad()
def nudge_curves(
    net: CreditNet,
    hs: Tensor,
    y: Tensor,
    layer: int,
    credit: Tensor,
    true: Tensor,
    eps_grid: Sequence[float],
    generator: torch.Generator,
) -> dict[str, list[float]]:
    """Loss change over the ε grid along the credit, the true gradient and a random direction,
    and the nudge efficiencies Δℓ(credit)/Δℓ(true) (1 = as good as BP, ≤ 0 = useless)."""
    rand = torch.randn(credit.shape, generator=generator, device=credit.device, dtype=credit.dtype)
    out: dict[str, list[float]] = {"eps": list(eps_grid), "credit": [], "true": [], "random": []}
    for eps in eps_grid:
        for name, direction in (("credit", credit), ("true", true), ("random", rand)):
            out[name].append(nudge_delta(net, hs[layer], layer, y, direction, eps))
    out["efficiency"] = [
        c / t if t != 0 else float("nan") for c, t in zip(out["credit"], out["true"])
    ]
    out["efficiency_random"] = [
        r / t if t != 0 else float("nan") for r, t in zip(out["random"], out["true"])
    ]
    return out


def local_grads(net: CreditNet, x: Tensor, credits: Tensor, g_L: Tensor) -> list[Tensor]:
    """Flattened local update of each layer from the credits: entry 0 is the embedding's
    (from g_0), entries 1..L the blocks' (block L from the exact g_L). L+1 vectors."""
    with torch.enable_grad():
        fwd = local_forward(net, x)
        s = surrogate_loss(fwd, credits, g_L, x.new_zeros(x.shape[0]))  # no head term
        emb, stacked = list(net.embed_parameters()), list(net.stacked_block_params())
        grads = torch.autograd.grad(s, emb + stacked, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, emb + stacked)]
    g_emb = torch.cat([g.flatten() for g in grads[: len(emb)]]) if emb else credits.new_zeros(1)
    g_blocks = torch.cat([g.reshape(net.num_layers, -1) for g in grads[len(emb) :]], 1)  # (L, P)
    return [g_emb, *g_blocks]


def update_cosine(net: CreditNet, x: Tensor, credits: Tensor, true: Tensor, g_L: Tensor) -> Tensor:
    """Cosine of each layer's local update (from the credits) with its BP gradient (from the
    true gradients): (L+1,), entry 0 the embedding, entry L the last block (always exact)."""
    a = local_grads(net, x, credits, g_L)
    b = local_grads(net, x, true, g_L)
    cos = torch.nn.functional.cosine_similarity
    return torch.stack([cos(u, v, dim=0, eps=1e-20) for u, v in zip(a, b)])


def diagnose(
    net: CreditNet,
    method: CreditMethod,
    x: Tensor,
    y: Tensor,
    *,
    step: int = 0,
    total_steps: int = 1,
    eps_grid: Sequence[float] = DEFAULT_EPS,
    nudge_layers: Sequence[int] | None = None,
    seed: int = 0,
) -> dict[str, float]:
    """All §7 diagnostics of one method on a fixed batch, as flat namespaced metrics.

    Keys: `cos/layer_03`, `rho/layer_03`, `upd_cos/layer_03`, `nudge_eff/layer_03`
    (at the middle ε), `broadcast_cos/layer_03`, `broadcast_rho/layer_03`, plus the method's own
    (`value_corr/…`, `bridge_cos/…`, `pred_err/…`). Nothing here updates anything.
    """
    hs, true, loss, err = true_gradients(net, x, y)
    L = net.num_layers
    ctx = CreditContext(
        hs=hs, y=y, g_L=true[-1], err=err, loss=loss, step=step, total_steps=total_steps
    )
    credits = method.credits(net, ctx).detach()  # (L, B, d)
    out: dict[str, float] = {}

    def put(prefix: str, values: Tensor) -> None:
        for l, v in enumerate(values.tolist()):
            out[layer_key(prefix, l)] = v

    put("cos", cosine_per_layer(credits, true[:L]))
    put("rho", rho_per_layer(credits, true[:L]))
    put("upd_cos", update_cosine(net, x, credits, true[:L], true[-1])[:L])
    bc = broadcast_credits(true[-1], L)
    put("broadcast_cos", cosine_per_layer(bc, true[:L]))
    put("broadcast_rho", rho_per_layer(bc, true[:L]))
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    mid = len(eps_grid) // 2
    for l in nudge_layers if nudge_layers is not None else range(L):
        curves = nudge_curves(net, hs, y, l, credits[l], true[l], eps_grid, gen)
        out[layer_key("nudge_eff", l)] = curves["efficiency"][mid]
        out[layer_key("nudge_eff_random", l)] = curves["efficiency_random"][mid]
    for name, values in method.diagnose(net, ctx, true[:L]).items():
        put(name, values)
    out["diag/loss"] = float(loss.mean())
    return out
