"""The bench's PyTorch training step does our step's work: the same crops, loss and metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from theorax.inference.scaled_mlp import augment
from theorax.inference.scaled_mlp import training as lib
from theorax.models.scaled_mlp import ScaledMLP

pytestmark = pytest.mark.interop


def test_torch_crops_equal_ours_for_the_same_boxes():
    torch = pytest.importorskip("torch")
    from theorax.experiments import torch_peers

    x = np.random.default_rng(0).integers(0, 256, (16, 12, 10, 3)).astype(np.uint8)
    boxes = np.asarray(augment.sample_crop_boxes(jax.random.key(0), 16, 12, 10))
    ours = augment.crop_and_resize(jnp.asarray(x), jnp.asarray(boxes), 8)
    theirs = torch_peers.crop_and_resize(torch.from_numpy(x).float(), torch.from_numpy(boxes), 8)
    np.testing.assert_allclose(theirs.numpy(), np.asarray(ours), atol=1e-3)
    drawn = torch_peers.sample_crop_boxes(
        torch.Generator().manual_seed(0), 4000, 32, 32, (0.08, 1), (3 / 4, 4 / 3)
    )
    top, left, ch, cw = drawn.numpy().T
    assert (
        (top >= 0).all()
        and (left >= 0).all()
        and (top + ch <= 32).all()
        and (left + cw <= 32).all()
    )
    assert 0.40 < (ch * cw / 32**2).mean() < 0.56  # as ours (test_augment)


def test_torch_step_loss_and_metrics_equal_ours_without_augmentation():
    torch = pytest.importorskip("torch")
    from theorax.experiments.torch_peers import TorchBottleneckMLP, TorchTrainStep

    res, classes = 8, 5
    model = ScaledMLP(num_classes=classes, depth=2, width=16, input_shape=(res, res, 3))
    params = model.init(jax.random.key(0), jnp.zeros((1, res, res, 3)))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, res, res, 3)).astype(np.uint8)
    labels = rng.integers(0, classes, 16).astype(np.int32)
    recipe = lib.Recipe(res=res, mean=(0.5,) * 3, std=(0.25,) * 3, augment=False, mixup_alpha=0.0)
    opt = lib.make_optimizer(lib.OptimizerConfig("lion"), 5e-5)
    step = lib.make_train_step(model, opt, recipe, jax.random.key(1))
    state = jax.tree.map(jnp.copy, {"params": params, "opt_state": opt.init(params)})  # donated
    _, ours = step(state, images, labels, np.int32(0))

    twin = TorchBottleneckMLP(3 * res * res, 16, 2, classes, 4)
    p = params["params"]
    pairs = [("linear_in", p["linear_in"]), ("linear_out", p["linear_out"])]
    for i in range(2):
        pairs += [
            (f"blocks.{i}.block.0", p[f"block_{i}_expand"]),
            (f"blocks.{i}.block.2", p[f"block_{i}_collapse"]),
        ]
    with torch.no_grad():
        for name, layer in pairs:
            module = twin.get_submodule(name)
            module.weight.copy_(torch.from_numpy(np.array(layer["kernel"]).T))
            module.bias.copy_(torch.from_numpy(np.array(layer["bias"])))
        for i in range(2):
            twin.layernorms[i].weight.copy_(
                torch.from_numpy(np.array(p[f"layernorms_{i}"]["scale"]))
            )
            twin.layernorms[i].bias.copy_(torch.from_numpy(np.array(p[f"layernorms_{i}"]["bias"])))
    theirs = TorchTrainStep(twin, res, augment=False)(
        torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    )
    for k in ("loss", "train_accuracy", "grad_norm"):
        np.testing.assert_allclose(float(theirs[k]), float(ours[k]), rtol=1e-5, err_msg=k)
