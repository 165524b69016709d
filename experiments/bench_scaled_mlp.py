r"""Train-step throughput of a scaled MLP beside PyTorch (eager and torch.compile), in one process run.

    python -m theorax.experiments.bench_scaled_mlp --out=results/bench            # B-6/Wi-512, 32x32x3, batch 256
    python -m theorax.experiments.bench_scaled_mlp --model=B-12/Wi-1024 --res=64 --batch=1024

Measures, all float32 on whatever JAX and torch run on here:
* the machine's float32 matmul rate (best of a large square matmul in JAX and in torch);
* our jitted train step with the full recipe (random-resized crops, flips, mixup 0.8, label smoothing, Lion),
  and without augmentation, to price the augmentation;
* the same model and optimiser (the official module layout, Lion) in PyTorch eager and under torch.compile,
  fed already-augmented batches (their crops happen in FFCV's loader officially, so they are not timed).
Training FLOPs per image are 6 x forward MACs (forward 2, backward 4). Writes `OUT/scaled_mlp.json`, with the
minor page faults per step (see `runtime.use_huge_pages`: run with `THEORAX_SYSTEM_MALLOC=1` to see the step
with glibc's default malloc). From Python the same is `benchmark(Settings(...))`; the flags exist only when this
module runs as a script.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from theorax.experiments import runtime, timing
from theorax.inference.scaled_mlp import training as recipe_lib
from theorax.models.scaled_mlp import ScaledMLP, forward_flops, parse_architecture


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to time; the command line's flags, field for field."""

    model: str = "B-6/Wi-512"  # architecture
    res: int = 32  # image resolution (3 channels)
    batch: int = 256
    steps: int = 10  # timed steps per repeat
    repeats: int = 3  # the best repeat is reported
    torch: bool = True  # also time the PyTorch peers


FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line's flags; defined only when this module runs as a script."""
    defaults = Settings()
    flags.DEFINE_string("out", "results/bench", "Directory for scaled_mlp.json.")
    flags.DEFINE_string("model", defaults.model, "Architecture.")
    flags.DEFINE_integer("res", defaults.res, "Image resolution (3 channels).")
    flags.DEFINE_integer("batch", defaults.batch, "Batch size.")
    flags.DEFINE_integer("steps", defaults.steps, "Timed steps per repeat.")
    flags.DEFINE_integer("repeats", defaults.repeats, "Repeats; the best is reported.")
    flags.DEFINE_bool("torch", defaults.torch, "Also time the PyTorch peers.")


def torch_sync(device: str) -> None:
    """Waits for torch's queued work on `device` (CUDA runs asynchronously; the CPU does not)."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def matmul_rate(n: int = 2048, dtype: str = "float32", torch_device: str | None = "cpu") -> dict:
    """FLOP/s of an n x n x n matmul in `dtype`, best of 3 repeats of 5: {"jax": ..., "torch": ...} (torch on
    `torch_device` where it is installed; None leaves it out)."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    mm = jax.jit(lambda a: a @ a)
    t = timing.time_calls(lambda: mm(a).block_until_ready(), 3, 5)["min_s"]
    rates = {"jax": 2 * n**3 / t}
    try:
        import torch
    except ImportError:
        return rates
    if torch_device is not None:
        x = torch.randn(n, n, dtype=getattr(torch, dtype), device=torch_device)

        def torch_mm():
            x @ x
            torch_sync(torch_device)

        rates["torch"] = 2 * n**3 / timing.time_calls(torch_mm, 3, 5)["min_s"]
    return rates


def step_dots_time(
    settings: Settings, depth: int, width: int, expansion: int, in_dim: int, num_classes: int
) -> float:
    """Best seconds for just the matrix products of one training step, each on its own: a floor for the step.

    Forward x W for the embedding, every block's two layers and the head; backward dY W^T (not for the
    embedding) and X^T dY for each. Each product is reduced to a scalar so that none can be dropped.
    """
    b, ew = settings.batch, expansion * width
    forward = [(in_dim, width)] + [(width, ew), (ew, width)] * depth + [(width, num_classes)]
    shapes = []  # (m, k, n) of every product
    for i, (k, n) in enumerate(forward):
        shapes += [(b, k, n), (k, b, n)] + ([(b, n, k)] if i else [])
    keys = jax.random.split(jax.random.key(0), 2 * len(shapes))
    operands = [
        (jax.random.normal(k1, (m, k)), jax.random.normal(k2, (k, n)))
        for (m, k, n), k1, k2 in zip(shapes, keys[::2], keys[1::2], strict=True)
    ]
    dots = jax.jit(lambda ops: [jnp.sum(a @ w) for a, w in ops])
    return timing.time_calls(lambda: jax.block_until_ready(dots(operands)), settings.repeats, 3)[
        "min_s"
    ]


def recipe_step(model, res: int, augment: bool, key: jax.Array | None = None):
    """The bench's training step: the full recipe (crops, flips, mixup 0.8, label smoothing 0.3, Lion 5e-5), or
    the same without augmentation. Returns (jitted step, optimizer)."""
    recipe = recipe_lib.Recipe(
        res=res,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        augment=augment,
        mixup_alpha=0.8 if augment else 0.0,
    )
    optimizer = recipe_lib.make_optimizer(recipe_lib.OptimizerConfig("lion"), 5e-5)
    key = jax.random.key(1) if key is None else key
    return recipe_lib.make_train_step(model, optimizer, recipe, key), optimizer


def jax_step_time(
    settings: Settings, model, params, images, labels, augment: bool
) -> tuple[float, float]:
    """(best seconds per step, minor page faults per step) of our jitted step."""
    step, optimizer = recipe_step(model, settings.res, augment)
    state = {"params": params, "opt_state": optimizer.init(params)}
    state = jax.tree.map(jnp.copy, state)
    holder = {"state": state, "i": 0}

    def one():
        holder["state"], m = step(holder["state"], images, labels, np.int32(holder["i"]))
        holder["i"] += 1
        m["loss"].block_until_ready()

    one()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = timing.time_calls(one, settings.repeats, settings.steps)["min_s"]
    calls = 1 + settings.repeats * settings.steps
    return t, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls


def torch_step_times(
    settings: Settings,
    depth,
    width,
    expansion,
    num_classes,
    images,
    labels,
    *,
    device: str = "cpu",
    bf16: bool = False,
    modes=("eager", "compile"),
) -> dict:
    """The same model and optimiser in PyTorch on `device` (eager and/or torch.compile), fed augmented
    batches; with `bf16`, the forward pass and loss under bfloat16 autocast (parameters and Lion in float32,
    as our bfloat16 compute). Keys `torch_{mode}_step_s`, `torch_{mode}_first_call_s` or `torch_{mode}_error`."""
    import torch
    from theorax.experiments.torch_peers import TorchBottleneckMLP, TorchLion

    torch.manual_seed(0)
    x = torch.from_numpy(np.asarray(images, np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    x, y = x.to(device), torch.from_numpy(np.asarray(labels, np.int64)).to(device)
    device_type = device.split(":")[0]
    out = {}
    for mode in modes:
        model = TorchBottleneckMLP(3 * settings.res**2, width, depth, num_classes, expansion)
        model = model.to(device)
        opt = TorchLion(model.parameters(), lr=5e-5)
        loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.3)

        def train_step(model=model, opt=opt, loss_fn=loss_fn):
            lam = 0.7
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                xm = lam * x + (1 - lam) * torch.roll(x, 1, 0)
                logits = model(xm)
                loss = lam * loss_fn(logits, y) + (1 - lam) * loss_fn(logits, torch.roll(y, 1, 0))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return loss

        compiled = torch.compile(train_step) if mode == "compile" else train_step

        def fn(compiled=compiled):
            loss = compiled()
            torch_sync(device)
            return loss

        try:
            start = time.perf_counter()
            fn()
            out[f"torch_{mode}_first_call_s"] = time.perf_counter() - start
            out[f"torch_{mode}_step_s"] = timing.time_calls(fn, settings.repeats, settings.steps)[
                "min_s"
            ]
        except Exception as e:  # noqa: BLE001 - a broken torch.compile toolchain is reported, not fatal
            out[f"torch_{mode}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def benchmark(settings: Settings) -> dict:
    """Times everything the module docstring lists; returns what `scaled_mlp.json` holds."""
    depth, width, expansion = parse_architecture(settings.model)
    num_classes, b, res = 10, settings.batch, settings.res
    macs = forward_flops(depth, width, num_classes, 3 * res * res, expansion)
    train_flops = 6 * macs * b
    rng = np.random.default_rng(0)
    images_np = rng.integers(0, 256, (b, res, res, 3)).astype(np.uint8)
    labels_np = rng.integers(0, num_classes, (b,)).astype(np.int32)
    images, labels = jnp.asarray(images_np), jnp.asarray(labels_np)

    model = ScaledMLP(num_classes, depth, width, expansion, input_shape=(res, res, 3))
    params = model.init(jax.random.key(0), jnp.zeros((1, res, res, 3)))
    peak = matmul_rate()
    machine_rate = max(peak.values())
    t_dots = step_dots_time(settings, depth, width, expansion, 3 * res * res, num_classes)
    t_full, faults = jax_step_time(settings, model, params, images, labels, augment=True)
    t_plain, _ = jax_step_time(settings, model, params, images, labels, augment=False)
    result = {
        "model": settings.model,
        "res": res,
        "batch": b,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "train_flops_per_step": train_flops,
        "matmul_flops_per_s": peak,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "jax_page_faults_per_step": faults,
        "jax_step_dots_only_s": t_dots,
        "jax_full_recipe_step_s": t_full,
        "jax_no_augment_step_s": t_plain,
        "jax_images_per_s": b / t_full,
        "jax_fraction_of_matmul_rate": train_flops / t_full / machine_rate,
        "augmentation_cost_fraction": 1 - t_plain / t_full,
    }
    if settings.torch:
        result |= torch_step_times(
            settings, depth, width, expansion, num_classes, images_np, labels_np
        )
        for mode in ("eager", "compile"):
            if f"torch_{mode}_step_s" in result:
                result[f"speedup_vs_torch_{mode}"] = result[f"torch_{mode}_step_s"] / t_full
    return result


def main(argv):
    del argv
    settings = Settings(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(Settings)})
    result = benchmark(settings)
    os.makedirs(FLAGS.out, exist_ok=True)
    path = os.path.join(FLAGS.out, "scaled_mlp.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    b, res, t_full = settings.batch, settings.res, result["jax_full_recipe_step_s"]
    peak, t_plain = result["matmul_flops_per_s"], result["jax_no_augment_step_s"]
    t_dots, train_flops = result["jax_step_dots_only_s"], result["train_flops_per_step"]
    machine_rate = max(peak.values())
    print(f"\n{settings.model} train step, {res}x{res}x3, batch {b}, float32, {result['backend']}:")
    print(
        f"  machine matmul rate   {machine_rate / 1e9:8.1f} GFLOP/s  ({', '.join(f'{k} {v / 1e9:.1f}' for k, v in peak.items())})"
    )
    print(
        f"  theorax (full recipe) {t_full * 1e3:8.1f} ms/step  {b / t_full:8.0f} img/s  "
        f"{train_flops / t_full / 1e9:6.1f} GFLOP/s = {100 * result['jax_fraction_of_matmul_rate']:.0f}% of matmul rate"
    )
    print(
        f"  theorax (no augment)  {t_plain * 1e3:8.1f} ms/step  augmentation costs "
        f"{100 * result['augmentation_cost_fraction']:.1f}% of the step"
    )
    print(
        f"  its matmuls alone     {t_dots * 1e3:8.1f} ms/step  ({100 * t_dots / t_full:.0f}% of the step; "
        "a floor for any implementation using these matmuls)"
    )
    for mode in ("eager", "compile"):
        if f"torch_{mode}_step_s" in result:
            t = result[f"torch_{mode}_step_s"]
            print(
                f"  torch {mode:8s}        {t * 1e3:8.1f} ms/step  {b / t:8.0f} img/s  -> theorax is "
                f"{result[f'speedup_vs_torch_{mode}']:.2f}x"
            )
        elif f"torch_{mode}_error" in result:
            print(f"  torch {mode:8s}        failed: {result[f'torch_{mode}_error']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    runtime.use_huge_pages()
    define_flags()
    app.run(main)
