"""The one credit-method interface, its registry, and the layer-stacked feedback networks.

A credit method gets the *detached* forward trajectory h_0..h_L, the labels, the exact
terminal credit g_L = ∂ℓ/∂h_L and the output error e = ∂ℓ/∂z, and returns the credits
g_0..g_{L-1}; in the same step it trains its own feedback networks, if any. The trainer
never asks which method it runs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from cbcore.model import CreditNet


@dataclass
class CreditContext:
    """Everything a method may use in one step. All tensors are detached."""

    hs: Tensor  # (L+1, B, d) trajectory h_0..h_L
    y: Tensor  # labels (B,) or targets (B, ...)
    g_L: Tensor  # (B, d) exact terminal credit, per example: ∂ℓ_i/∂h_L
    err: Tensor  # (B, C) output error ∂ℓ_i/∂z
    loss: Tensor  # (B,) per-example loss
    step: int = 0  # global step (0-based)
    total_steps: int = 1
    # block_vjp(l, g): ∂<g, h_l>/∂h_{l-1} through block l (1..L). Only for methods that declare
    # `needs_block_vjp` (bp); None for every other method, so they cannot backprop through blocks.
    block_vjp: Callable[[int, Tensor], Tensor] | None = None


@dataclass
class CreditOutput:
    credits: Tensor  # (L, B, d): g_0..g_{L-1}
    logs: dict[str, float] = field(default_factory=dict)  # namespaced scalars (tensors allowed)


class CreditMethod(nn.Module):
    """Base class. Subclasses implement `credits` and, if they learn, `train_feedback`."""

    name: str = ""
    needs_block_vjp: bool = False

    def credits(self, net: CreditNet, ctx: CreditContext) -> Tensor:
        """Credits g_0..g_{L-1} (L, B, d) for this context, without learning anything."""
        raise NotImplementedError

    def train_feedback(self, net: CreditNet, ctx: CreditContext) -> dict[str, Tensor]:
        """One update of the method's own feedback networks; returns logs."""
        return {}

    def step(self, net: CreditNet, ctx: CreditContext) -> CreditOutput:
        """Credits for the update, then one feedback-network update (the training-step call)."""
        check_context(ctx, net)
        g = self.credits(net, ctx)
        logs = self.train_feedback(net, ctx)
        return CreditOutput(g, logs)

    def diagnose(self, net: CreditNet, ctx: CreditContext, true: Tensor) -> dict[str, Tensor]:
        """Method-specific per-layer diagnostics as (L,) tensors; `true` is ∂ℓ/∂h_l (L, B, d)."""
        return {}


class LearnedCreditMethod(CreditMethod):
    """A method with feedback networks: an Adam optimizer at `lr_fb` and its own noise generator.

    Both are part of the module's state_dict (extra state), so a checkpoint of the method
    resumes bit-exactly.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.opt: torch.optim.Optimizer | None = None
        self._gen: torch.Generator | None = None
        self._pending_gen_state: Tensor | None = None

    def noise_generator(self, device: torch.device | str) -> torch.Generator:
        """The method's own generator on `device` (diagnostics never draw from it)."""
        device = torch.device(device)
        if self._gen is None or self._gen.device.type != device.type:
            self._gen = make_generator(self.seed + 1299709, device)
            if self._pending_gen_state is not None:
                self._gen.set_state(self._pending_gen_state)
                self._pending_gen_state = None
        return self._gen

    def get_extra_state(self) -> dict:
        return {
            "opt": self.opt.state_dict() if self.opt is not None else None,
            "gen": self._gen.get_state() if self._gen is not None else self._pending_gen_state,
        }

    def set_extra_state(self, state: dict) -> None:
        if state.get("opt") is not None and self.opt is not None:
            self.opt.load_state_dict(state["opt"])
        self._gen, self._pending_gen_state = None, state.get("gen")


REGISTRY: dict[str, Callable[..., CreditMethod]] = {}


def register(name: str) -> Callable:
    """Class/factory decorator: `@register("dfa")` adds it to the name→factory registry."""

    def deco(factory: Callable[..., CreditMethod]) -> Callable[..., CreditMethod]:
        if name in REGISTRY:
            raise ValueError(f"credit method '{name}' is registered twice")
        REGISTRY[name] = factory
        return factory

    return deco


def make_method(name: str, net: CreditNet, params, *, seed: int | None = None) -> CreditMethod:
    """Build a registered credit method for `net` from its hyperparameters (a CreditParams)."""
    if name not in REGISTRY:
        raise KeyError(f"unknown credit method '{name}'; registered: {sorted(REGISTRY)}")
    seed = params.seed if seed is None else seed
    return REGISTRY[name](net, params, seed=seed)


def check_credits(credits: Tensor, ctx: CreditContext, method: str) -> None:
    """A method must return (L, B, d) credits; name the method and both shapes if not."""
    L1, B, d = ctx.hs.shape
    if credits.shape != (L1 - 1, B, d):
        raise ValueError(
            f"credit method '{method}' returned credits of shape {tuple(credits.shape)}; "
            f"expected (L, B, d) = {(L1 - 1, B, d)}"
        )


def check_context(ctx: CreditContext, net: CreditNet | None = None) -> None:
    """Shapes of a context agree with each other (and with the net); errors name the field."""
    if ctx.hs.dim() != 3:
        raise ValueError(f"CreditContext.hs must be (L+1, B, d), got shape {tuple(ctx.hs.shape)}")
    L1, B, d = ctx.hs.shape
    if net is not None and (L1 != net.num_layers + 1 or d != net.d):
        raise ValueError(
            f"CreditContext.hs has shape {tuple(ctx.hs.shape)} but the net has "
            f"L+1 = {net.num_layers + 1} states of width d = {net.d}"
        )
    if ctx.g_L.shape != (B, d):
        raise ValueError(f"CreditContext.g_L must be (B, d) = {(B, d)}, got {tuple(ctx.g_L.shape)}")
    if ctx.err.dim() != 2 or ctx.err.shape[0] != B:
        raise ValueError(
            f"CreditContext.err must be (B, C) with B = {B}, got {tuple(ctx.err.shape)}"
        )
    if ctx.y.shape[0] != B:
        raise ValueError(f"CreditContext.y must have B = {B} rows, got {tuple(ctx.y.shape)}")


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class StackedMLP(nn.Module):
    """`n` independent MLPs (one per layer) evaluated at once with batched matmuls.

    forward(x): (n, N, in) -> (n, N, out). Inputs come in as detached leaves; the net
    touches only its own parameters.
    """

    def __init__(
        self,
        n: int,
        in_dim: int,
        hidden: int,
        out_dim: int,
        depth: int,
        generator: torch.Generator | None = None,
        zero_last: bool = False,
    ) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * depth + [out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            w = torch.randn(n, b, a, generator=generator) / a**0.5  # (n, out, in)
            if zero_last and i == len(dims) - 2:
                w.zero_()
            self.weights.append(nn.Parameter(w))
            self.biases.append(nn.Parameter(torch.zeros(n, b)))

    def forward(self, x: Tensor, layers: slice = slice(None)) -> Tensor:
        n_layers = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b[layers, None], x, w[layers].transpose(1, 2))  # (n, N, out_i)
            if i < n_layers - 1:
                x = torch.nn.functional.gelu(x)
        return x


def ema_copy(module: nn.Module) -> nn.Module:
    """A frozen copy of a module: the EMA target net of a bridge."""
    return copy.deepcopy(module).requires_grad_(False)


@torch.no_grad()
def ema_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """target ← momentum·target + (1 − momentum)·source for every parameter; buffers (such
    as input statistics) are copied, so the target normalizes its inputs like the source."""
    torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), 1.0 - momentum)
    for bt, bs in zip(target.buffers(), source.buffers()):
        bt.copy_(bs)
