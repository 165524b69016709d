"""PyTorch peers of our models, written from the papers' descriptions (not copied), for parity fixtures and
benchmarks. Only imported where torch is installed (the `interop` extra)."""

from __future__ import annotations

import torch
from torch import nn


class TorchBottleneckBlock(nn.Module):
    def __init__(self, width: int, expansion: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Linear(width, expansion * width), nn.GELU(), nn.Linear(expansion * width, width)
        )

    def forward(self, x):
        return self.block(x)


class TorchBottleneckMLP(nn.Module):
    """The official B-MLP's module layout and parameter names (linear_in, blocks.i.block.0/2, layernorms.i,
    linear_out), pre-LN residual blocks, exact GELU, LayerNorm eps 1e-5, NCHW flatten."""

    def __init__(
        self, input_dim: int, width: int, depth: int, num_classes: int, expansion: int = 4
    ):
        super().__init__()
        self.linear_in = nn.Linear(input_dim, width)
        self.blocks = nn.ModuleList([TorchBottleneckBlock(width, expansion) for _ in range(depth)])
        self.layernorms = nn.ModuleList([nn.LayerNorm(width) for _ in range(depth)])
        self.linear_out = nn.Linear(width, num_classes)

    def forward(self, x):  # x: (N, C, H, W)
        x = self.linear_in(x.reshape(x.shape[0], -1))
        for block, norm in zip(self.blocks, self.layernorms, strict=True):
            x = x + block(norm(x))
        return self.linear_out(x)


class TorchLion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023) with decoupled weight decay times lr, as the official scaling_mlps optimiser."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, (b1, b2), wd = group["lr"], group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - lr * wd)
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-lr)
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
