"""PyTorch peers of our models, written from the papers' descriptions (not copied), for parity fixtures and
benchmarks. Only imported where torch is installed (the `interop` extra).

* Scaled MLPs: `TorchBottleneckMLP` (the official module layout), `TorchLion`, and `TorchTrainStep`, the whole
  training step of our recipe in PyTorch: the same on-the-fly augmentation as `inference.scaled_mlp.augment`
  (random-resized crops by area-weight matrix products, flips, mixup with one lambda per batch, normalisation),
  label-smoothed mixup cross-entropy, Lion, and the same metrics (loss, accuracy, gradient norm), so that a
  benchmark times the same work on both sides.
* Distribution transformers: `TorchDistributionTransformer`, the paper's architecture as the official code
  builds it (`nn.TransformerDecoder` of post-LN `nn.TransformerDecoderLayer`s, GELU, no dropout, batch first)
  with the embedding MLPs and the de-embedding head of `models.distribution_transformer`, loading our
  parameters (`from_params`), for models with a feature-vector prior (task (b), DT-5).
"""

from __future__ import annotations

import math

import numpy as np
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


# ------------------------------------------------------------------------------ scaled-MLP training step


def area_weights(
    start: torch.Tensor, length: torch.Tensor, size_in: int, size_out: int
) -> torch.Tensor:
    """(n, size_out, size_in): output pixel o averages source interval [start + o l / n, + l / n) by overlap
    (the same weights as `augment._area_weights`, one matrix per image)."""
    o = torch.arange(size_out, dtype=torch.float32)
    step = (length / size_out)[:, None]
    lo = start[:, None] + o[None] * step
    hi = lo + step
    p = torch.arange(size_in, dtype=torch.float32)
    overlap = torch.minimum(p[None, None] + 1, hi[..., None]) - torch.maximum(
        p[None, None], lo[..., None]
    )
    return overlap.clamp_min(0) / step[..., None]


def crop_and_resize(images: torch.Tensor, boxes: torch.Tensor, res: int) -> torch.Tensor:
    """Boxes (top, left, height, width) of float (N, H, W, C) images, area-resized to (N, res, res, C)."""
    n, h, w, c = images.shape
    wy = area_weights(boxes[:, 0], boxes[:, 2], h, res)  # (n, res, h)
    wx = area_weights(boxes[:, 1], boxes[:, 3], w, res)  # (n, res, w)
    rows = torch.bmm(wy, images.reshape(n, h, w * c)).reshape(n, res, w, c)
    return torch.einsum("nowc,npw->nopc", rows, wx)


def sample_crop_boxes(
    generator: torch.Generator, n: int, height: int, width: int, scale, ratio
) -> torch.Tensor:
    """torchvision's `RandomResizedCrop.get_params` for n images at once, as `augment.sample_crop_boxes`:
    10 tries per image, the first whose rounded size fits, else the centred fallback."""
    u = torch.rand((4, n, 10), generator=generator)
    area = height * width * (scale[0] + (scale[1] - scale[0]) * u[0])
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1])
    cw, ch = torch.round(torch.sqrt(area * aspect)), torch.round(torch.sqrt(area / aspect))
    ok = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
    ch, cw = ch.gather(1, first)[:, 0], cw.gather(1, first)[:, 0]
    top = torch.floor(u[2, :, 0] * (height - ch + 1))
    left = torch.floor(u[3, :, 0] * (width - cw + 1))
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], dtype=torch.float32)
    boxes = torch.stack([top, left, ch, cw], dim=1)
    return torch.where(ok.any(1, keepdim=True), boxes, fallback[None])


class TorchTrainStep:
    """One training step of our recipe in PyTorch, on a uint8 (N, H, W, C) batch: random-resized crops
    (scale, ratio as the recipe) + flips, mixup (one lambda ~ Beta(alpha, alpha) per batch, image i with
    i - 1, truncated), normalisation, the model, lambda CE(y) + (1 - lambda) CE(y_{i-1}) with label smoothing,
    Lion, and the metrics our step returns (loss, accuracy against either label, gradient norm).

    `compile=True` wraps the step in `torch.compile` (augmentation, forward, backward and optimiser alike).
    Calling the object runs one step and returns the metrics as tensors.
    """

    def __init__(
        self,
        model: nn.Module,
        res: int,
        *,
        lr: float = 5e-5,
        label_smoothing: float = 0.3,
        mixup_alpha: float = 0.8,
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        mean=(0.5, 0.5, 0.5),
        std=(0.25, 0.25, 0.25),
        augment: bool = True,
        compile: bool = False,
        seed: int = 0,
    ):
        self.model, self.res, self.augment = model, res, augment
        self.optimizer = TorchLion(model.parameters(), lr=lr)
        self.loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.crop_scale, self.crop_ratio, self.mixup_alpha = crop_scale, crop_ratio, mixup_alpha
        self.mean = 255.0 * torch.tensor(mean, dtype=torch.float32)
        self.std = 255.0 * torch.tensor(std, dtype=torch.float32)
        self.generator = torch.Generator().manual_seed(seed)
        self.lams = np.random.default_rng(seed)
        self._step = torch.compile(self.step) if compile else self.step

    def inputs(self, images: torch.Tensor, boxes, flips, lam):
        """Augmented, normalised NCHW images from uint8 NHWC ones (the boxes, flips and lambda drawn)."""
        x = images.to(torch.float32)
        if self.augment:
            x = torch.round(crop_and_resize(x, boxes, self.res))
            x = torch.where(flips[:, None, None, None], x.flip(2), x)
            if self.mixup_alpha > 0:
                x = torch.floor(lam * x + (1 - lam) * torch.roll(x, 1, 0))
        x = (x - self.mean) / self.std
        return x.permute(0, 3, 1, 2)

    def step(self, images, labels, boxes, flips, lam):
        x = self.inputs(images, boxes, flips, lam)
        partner = torch.roll(labels, 1, 0) if self.augment and self.mixup_alpha > 0 else labels
        logits = self.model(x)
        loss = lam * self.loss_fn(logits, labels) + (1 - lam) * self.loss_fn(logits, partner)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.model.parameters()]
        grad_norm = torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(g) for g in grads])
        )
        self.optimizer.step()
        pred = logits.detach().argmax(-1)
        accuracy = ((pred == labels) | (pred == partner)).float().mean()
        return loss.detach(), accuracy, grad_norm

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        n, h, w, _ = images.shape
        boxes = sample_crop_boxes(self.generator, n, h, w, self.crop_scale, self.crop_ratio)
        flips = torch.rand(n, generator=self.generator) < 0.5
        mixing = self.augment and self.mixup_alpha > 0
        lam = float(self.lams.beta(self.mixup_alpha, self.mixup_alpha)) if mixing else 1.0
        loss, accuracy, grad_norm = self._step(images, labels, boxes, flips, torch.tensor(lam))
        return {"loss": loss, "train_accuracy": accuracy, "grad_norm": grad_norm}


# ------------------------------------------------------------------------------ distribution transformer


def _tensor(array) -> torch.Tensor:
    return torch.from_numpy(np.array(array, np.float32))  # a writable float32 copy


def _dense(kernel, bias) -> nn.Linear:
    """A torch Linear holding a flax Dense's (in, out) kernel and bias."""
    layer = nn.Linear(*np.shape(kernel))
    with torch.no_grad():
        layer.weight.copy_(_tensor(kernel).T)
        layer.bias.copy_(_tensor(bias))
    return layer


def _mlp(params) -> nn.Sequential:
    """`models.distribution_transformer.MLP`: dense_0, GELU, dense_1, ... (exact GELU between layers)."""
    layers = []
    for i in range(len(params)):
        if i:
            layers.append(nn.GELU())
        layers.append(_dense(params[f"dense_{i}"]["kernel"], params[f"dense_{i}"]["bias"]))
    return nn.Sequential(*layers)


def _load_attention(attention: nn.MultiheadAttention, params) -> None:
    """Our `Attention` parameters (query / key / value kernels [d, h, c], out [h, c, d]) into torch's packed
    in_proj (rows q, k, v; heads split h-major as ours) and out_proj."""
    d = attention.embed_dim
    names = ("query", "key", "value")
    with torch.no_grad():
        attention.in_proj_weight.copy_(
            torch.cat([_tensor(params[n]["kernel"]).reshape(d, d).T for n in names])
        )
        attention.in_proj_bias.copy_(
            torch.cat([_tensor(params[n]["bias"]).reshape(d) for n in names])
        )
        attention.out_proj.weight.copy_(_tensor(params["out"]["kernel"]).reshape(d, d).T)
        attention.out_proj.bias.copy_(_tensor(params["out"]["bias"]))


def _load_norm(norm: nn.LayerNorm, params) -> None:
    with torch.no_grad():
        norm.weight.copy_(_tensor(params["scale"]))
        norm.bias.copy_(_tensor(params["bias"]))


class TorchDistributionTransformer(nn.Module):
    """A feature-prior `DistributionTransformer` in PyTorch, the official code's way (see the module docstring).

    `forward(prior_features [B, f], observations [B, n, m])` (one observation source) returns the posterior
    mixture's (logits [B, k], means [B, k, d], scale_tril [B, k, d, d]), the fields of our `GMM`.
    """

    def __init__(self, model, params):
        super().__init__()
        if model.prior_feature_dim is None or len(model.observation_dims) != 1:
            raise ValueError(
                "TorchDistributionTransformer covers models with a feature-vector prior and one "
                "observation source (task (b)'s DT-k)"
            )
        p = params["params"]
        (self.source,) = model.observation_dims
        self.dim, self.jitter, self.log_diag_range = model.dim, model.jitter, model.log_diag_range
        self.prior_embedding = _mlp(p["prior_embedding"])
        self.conversions = nn.ModuleList(
            [_mlp(p[f"conversion_{j}"]) for j in range(model.num_components)]
        )
        self.observation_embedding = _mlp(p[f"observation_{self.source}"])
        layer = nn.TransformerDecoderLayer(
            model.d_model,
            model.num_heads,
            model.dim_feedforward,
            dropout=0.0,
            activation="gelu",
            layer_norm_eps=1e-5,
            batch_first=True,
            norm_first=False,
        )
        self.trunk = nn.TransformerDecoder(layer, model.num_layers)
        for i, torch_layer in enumerate(self.trunk.layers):
            ours = p[f"layer_{i}"]
            _load_attention(torch_layer.self_attn, ours["self_attention"])
            _load_attention(torch_layer.multihead_attn, ours["cross_attention"])
            for name in ("linear1", "linear2"):
                setattr(torch_layer, name, _dense(ours[name]["kernel"], ours[name]["bias"]))
            for name in ("norm1", "norm2", "norm3"):
                _load_norm(getattr(torch_layer, name), ours[name])
        self.head = _mlp(p["component_head"])
        self.eval()

    def forward(self, prior_features: torch.Tensor, observations: torch.Tensor):
        h = self.prior_embedding(prior_features)
        tokens = torch.stack([conversion(h) for conversion in self.conversions], dim=-2)
        memory = self.observation_embedding(observations)
        tokens = self.trunk(tokens, memory)
        features = self.head(tokens)
        d = self.dim
        logits, means = features[..., 0], features[..., 1 : 1 + d]
        log_diag = features[..., 1 + d : 1 + 2 * d].clamp(*self.log_diag_range)
        rows, cols = np.tril_indices(d, -1)
        tril = features.new_zeros((*features.shape[:-1], d, d))
        tril[..., rows, cols] = features[..., 1 + 2 * d :]
        tril = tril + torch.diag_embed(torch.exp(log_diag) + self.jitter)
        return logits, means, tril
