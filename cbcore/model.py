"""The deep residual MLP of DESIGN §3, with block weights stored stacked over layers.

    h_0 = E(x)                                  embedding (Linear)
    h_l = h_{l-1} + W2 · GELU(W1 · LN(h_{l-1}) + b1) + b2      l = 1..L  (pre-LN residual block)
    z   = W_out · LN(h_L) + b                   head

All blocks have the same shape, so their parameters live in tensors with a leading layer
axis (L, ...). `block(l, h)` runs one block (a view of layer l's slice, so gradients flow
into the stacked tensors); `step_all(h)` runs every block at once on a stack of states
(batched matmuls, no Python loop over layers) — the bridges' continuations use it.

Any network the credit methods train (this one, or the linear toy of `cbcore.toy_lq`)
exposes the same small protocol, `CreditNet`.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CreditNet(Protocol):
    """What the credit methods and the trainer see of a network."""

    num_layers: int  # L: blocks between h_0 and h_L
    d: int  # width of the residual stream
    out_dim: int  # C: width of the output z (classes)
    target_dim: int  # width of target_features(y)

    def embed(self, x: Tensor) -> Tensor: ...  # (B, in) -> (B, d)
    def block(self, l: int, h: Tensor) -> Tensor: ...  # F_{l+1}: (B, d) -> (B, d), l = 0..L-1
    def step_all(self, h: Tensor) -> Tensor: ...  # (L, N, d) -> (L, N, d): F_{l+1}(h[l])
    def output(self, h: Tensor) -> Tensor: ...  # (B, d) -> (B, C)
    def loss_per_example(self, z: Tensor, y: Tensor) -> Tensor: ...  # (B,)
    def output_error(self, z: Tensor, y: Tensor) -> Tensor: ...  # dℓ_i/dz_i: (B, C)
    def target_features(self, y: Tensor) -> Tensor: ...  # (B, target_dim) float
    def stacked_block_params(self) -> list[Tensor]: ...  # block params, leading axis L
    def head_parameters(self) -> list[nn.Parameter]: ...
    def embed_parameters(self) -> list[nn.Parameter]: ...


class ResMLP(nn.Module):
    """Embedding, `num_blocks` pre-LN GELU residual blocks (hidden `mlp_ratio·d`), LN+Linear head."""

    def __init__(self, in_dim: int, num_classes: int, d_hidden: int, num_blocks: int,
                 mlp_ratio: int = 4) -> None:
        super().__init__()
        L, d, H = num_blocks, d_hidden, mlp_ratio * d_hidden
        self.num_layers, self.d, self.out_dim, self.target_dim = L, d, num_classes, num_classes
        self.in_dim = in_dim
        self.emb = nn.Linear(in_dim, d)
        self.ln_w = nn.Parameter(torch.ones(L, d))
        self.ln_b = nn.Parameter(torch.zeros(L, d))
        # nn.Linear-style init for W1; W2 scaled by 1/sqrt(2L) so the stream's variance stays O(1)
        self.W1 = nn.Parameter(torch.empty(L, H, d).uniform_(-1, 1) / math.sqrt(d))  # (L, H, d)
        self.b1 = nn.Parameter(torch.zeros(L, H))
        self.W2 = nn.Parameter(torch.empty(L, d, H).uniform_(-1, 1) / math.sqrt(H * 2 * L))  # (L, d, H)
        self.b2 = nn.Parameter(torch.zeros(L, d))
        self.head_ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, num_classes)

    BLOCK_PARAMS = ("ln_w", "ln_b", "W1", "b1", "W2", "b2")
    NO_DECAY = ("ln_w", "ln_b", "b1", "b2")  # stacked (L, ·) but biases/norm scales

    def embed(self, x: Tensor) -> Tensor:
        return self.emb(x)

    def block(self, l: int, h: Tensor) -> Tensor:
        u = F.layer_norm(h, (self.d,), self.ln_w[l], self.ln_b[l])  # (B, d)
        a = F.gelu(F.linear(u, self.W1[l], self.b1[l]))  # (B, H)
        return h + F.linear(a, self.W2[l], self.b2[l])  # (B, d)

    def step_all(self, h: Tensor) -> Tensor:
        u = F.layer_norm(h, (self.d,)) * self.ln_w[:, None] + self.ln_b[:, None]  # (L, N, d)
        a = F.gelu(torch.baddbmm(self.b1[:, None], u, self.W1.transpose(1, 2)))  # (L, N, H)
        return h + torch.baddbmm(self.b2[:, None], a, self.W2.transpose(1, 2))  # (L, N, d)

    def output(self, h: Tensor) -> Tensor:
        return self.head(self.head_ln(h))

    def loss_per_example(self, z: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(z.float(), y, reduction="none")

    def output_error(self, z: Tensor, y: Tensor) -> Tensor:
        return torch.softmax(z.float(), dim=-1) - F.one_hot(y, self.out_dim).float()

    def target_features(self, y: Tensor) -> Tensor:
        return F.one_hot(y, self.out_dim).float()

    def stacked_block_params(self) -> list[Tensor]:
        return [getattr(self, name) for name in self.BLOCK_PARAMS]

    def head_parameters(self) -> list[nn.Parameter]:
        return [*self.head_ln.parameters(), *self.head.parameters()]

    def embed_parameters(self) -> list[nn.Parameter]:
        return list(self.emb.parameters())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Full forward: trajectory h_0..h_L (L+1, B, d) and logits (B, C)."""
        h = self.embed(x)
        hs = [h]
        for l in range(self.num_layers):
            h = self.block(l, h)
            hs.append(h)
        return torch.stack(hs), self.output(h)


def check_net(net: CreditNet) -> None:
    """Fail early, with names, if a network does not implement the CreditNet protocol."""
    missing = [a for a in CreditNet.__annotations__ if not hasattr(net, a)]
    missing += [m for m in ("embed", "block", "step_all", "output", "loss_per_example",
                            "output_error", "target_features", "stacked_block_params")
                if not callable(getattr(net, m, None))]
    if missing:
        raise TypeError(f"{type(net).__name__} is not a CreditNet: missing {missing}")
