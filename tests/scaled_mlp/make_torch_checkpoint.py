"""Writes the tiny official-layout checkpoint fixture used by tests/test_scaling_mlps_checkpoint.py.

    python tests/make_torch_checkpoint.py tests/fixtures

Builds a B-2/Wi-16 (expansion 4) on 8x8x3 images with 7 classes in PyTorch with the official module names,
saves its state dict with `torch.save`, and saves a batch of images (NHWC) with the logits torch computes for
them, so the fast test needs no torch.
"""

import os
import sys

import numpy as np
import torch
from theorax.experiments.torch_peers import TorchBottleneckMLP


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    model = TorchBottleneckMLP(input_dim=8 * 8 * 3, width=16, depth=2, num_classes=7).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters
        for norm in model.layernorms:
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    images = np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype(np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    os.makedirs(out_dir, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(out_dir, "tiny_bmlp.pt"))
    np.savez(os.path.join(out_dir, "tiny_bmlp_io.npz"), images=images, logits=logits)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "fixtures"))
