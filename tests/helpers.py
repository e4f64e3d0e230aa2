"""Tiny nets, params and batches shared by the tests (CPU, float32, seeded)."""

from __future__ import annotations

from dataclasses import replace

import torch

from cbcore.model import ResMLP
from cbcore.params import CifarParams


def tiny_params(**kw) -> CifarParams:
    """Small but complete credit hyperparameters (warmup off so the bridges act from step 0)."""
    base = CifarParams(
        fb_hidden=32, fb_depth=1, value_rank=8, K=2, num_anchors=2, warmup_frac=0.0, blend_frac=0.0
    )
    return replace(base, **kw)


def tiny_net(seed: int = 0, in_dim: int = 12, classes: int = 5, d: int = 16, L: int = 4) -> ResMLP:
    torch.manual_seed(seed)
    return ResMLP(in_dim, classes, d, L, mlp_ratio=2)


def teacher_batch(n: int = 64, in_dim: int = 12, classes: int = 5, seed: int = 1):
    """A learnable problem: labels from a fixed random linear teacher."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g)
    w = torch.randn(in_dim, classes, generator=g)
    return x, (x @ w).argmax(-1)
