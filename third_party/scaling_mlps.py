"""Official "Scaling MLPs" checkpoints (gregorbachmann/scaling_mlps) as `ScaledMLP` parameters, without torch.

The official `BottleneckMLP` state dict names its tensors

    linear_in.{weight,bias}                      (m, 3 r^2)     embedding of the CHW-flattened image
    blocks.{i}.block.0.{weight,bias}             (k m, m)       expansion
    blocks.{i}.block.2.{weight,bias}             (m, k m)       collapse
    layernorms.{i}.{weight,bias}                 (m,)
    linear_out.{weight,bias}                     (C, m)

PyTorch Linear weights are (out, in) and become Flax kernels (in, out). Depth, width, expansion and classes are
read off the shapes; the image is taken as RGB (3 channels) and square unless `image_shape` says otherwise.
Prefixes added by DataParallel (`module.`) or torch.compile (`_orig_mod.`) are stripped.

`load_checkpoint("B_12-Wi_1024_res_64_in21k_cifar10.pt")` reads an official file and returns `(model, params)`;
`model.apply(params, images)` then takes (N, 64, 64, 3) images normalised with the dataset's statistics.

Example: a one-block, width-16 state dict in the official layout (numpy arrays, as `torch_pickle.load` returns)

    >>> rng = np.random.default_rng(0)
    >>> linears = {"linear_in": (16, 8 * 8 * 3), "blocks.0.block.0": (64, 16),
    ...            "blocks.0.block.2": (16, 64), "linear_out": (7, 16)}
    >>> state = {f"{k}.weight": rng.normal(size=s) for k, s in linears.items()}
    >>> state |= {f"{k}.bias": np.zeros(s[0]) for k, s in linears.items()}
    >>> state |= {"layernorms.0.weight": np.ones(16), "layernorms.0.bias": np.zeros(16)}
    >>> model, params = convert_state_dict(state)
    >>> model.depth, model.width, model.expansion, model.num_classes, model.input_shape
    (1, 16, 4, 7, (8, 8, 3))
    >>> model.apply(params, np.zeros((2, 8, 8, 3), np.float32)).shape
    (2, 7)
"""

from __future__ import annotations

import math
import re

import jax.numpy as jnp
import numpy as np
from theorax.models.scaled_mlp import ScaledMLP
from theorax.third_party import torch_pickle


class CheckpointError(ValueError):
    """A checkpoint's tensors are missing, unexpected or mis-shaped."""


_PREFIXES = ("module.", "_orig_mod.")


def _state_dict(obj) -> dict[str, np.ndarray]:
    if isinstance(obj, dict) and "linear_in.weight" not in obj:
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a state dict, got {type(obj).__name__}")
    out = {}
    for name, value in obj.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        out[name] = np.asarray(value)
    return out


def convert_state_dict(
    state: dict[str, np.ndarray], image_shape: tuple[int, int, int] | None = None
) -> tuple[ScaledMLP, dict]:
    """Maps an official BottleneckMLP state dict to `(ScaledMLP, params)`; see the module docstring."""
    state = _state_dict(state)
    for required in ("linear_in.weight", "linear_out.weight"):
        if required not in state:
            raise CheckpointError(
                f"checkpoint has no tensor {required!r}; found {sorted(state)[:8]}... "
                "(is this an official BottleneckMLP state dict?)"
            )
    width, input_dim = state["linear_in.weight"].shape
    num_classes = state["linear_out.weight"].shape[0]
    depth = 1 + max(
        (int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1
    )
    if depth == 0:
        raise CheckpointError(
            "checkpoint has no blocks.{i}.block.* tensors (only B-MLPs are supported)"
        )
    if "blocks.0.block.0.weight" not in state:
        raise CheckpointError("checkpoint is missing 'blocks.0.block.0.weight'")
    expansion = state["blocks.0.block.0.weight"].shape[0] // width
    if image_shape is None:
        res = math.isqrt(input_dim // 3)
        image_shape = (res, res, 3)
    if int(np.prod(image_shape)) != input_dim:
        raise CheckpointError(
            f"linear_in takes {input_dim} inputs, which is not an image of shape {image_shape}; "
            "pass image_shape=(H, W, C)"
        )

    expected = {
        "linear_in.weight": (width, input_dim),
        "linear_in.bias": (width,),
        "linear_out.weight": (num_classes, width),
        "linear_out.bias": (num_classes,),
    }
    for i in range(depth):
        expected |= {
            f"blocks.{i}.block.0.weight": (expansion * width, width),
            f"blocks.{i}.block.0.bias": (expansion * width,),
            f"blocks.{i}.block.2.weight": (width, expansion * width),
            f"blocks.{i}.block.2.bias": (width,),
            f"layernorms.{i}.weight": (width,),
            f"layernorms.{i}.bias": (width,),
        }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {state[k].shape} (expected {s})"
        for k, s in expected.items()
        if k in state and state[k].shape != s
    ]
    if missing or unexpected or shapes:
        raise CheckpointError(
            "checkpoint does not match a B-MLP of depth "
            f"{depth}, width {width}, expansion {expansion}, {num_classes} classes: "
            f"missing {missing}, unexpected {unexpected}, mis-shaped {shapes}"
        )

    f32 = lambda a: jnp.asarray(np.asarray(a, np.float32))
    linear = lambda name: {
        "kernel": f32(state[f"{name}.weight"].T),
        "bias": f32(state[f"{name}.bias"]),
    }
    params = {"linear_in": linear("linear_in"), "linear_out": linear("linear_out")}
    for i in range(depth):
        params[f"block_{i}_expand"] = linear(f"blocks.{i}.block.0")
        params[f"block_{i}_collapse"] = linear(f"blocks.{i}.block.2")
        params[f"layernorms_{i}"] = {
            "scale": f32(state[f"layernorms.{i}.weight"]),
            "bias": f32(state[f"layernorms.{i}.bias"]),
        }
    model = ScaledMLP(num_classes, depth, width, expansion, input_shape=tuple(image_shape))
    return model, {"params": params}


def load_checkpoint(
    path: str, image_shape: tuple[int, int, int] | None = None
) -> tuple[ScaledMLP, dict]:
    """Loads an official `.pt`/`.pth` BottleneckMLP checkpoint: returns `(ScaledMLP, params)`."""
    return convert_state_dict(torch_pickle.load(path), image_shape)
