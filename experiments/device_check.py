r"""The device check: every system's accelerator workload, for a fixed short budget, on whatever backend JAX sees.

    python -m theorax.experiments.device_check --out=DIR           # full sizes: at most 6 minutes on one H200
    python -m theorax.experiments.device_check --out=DIR --tiny    # tiny sizes, the same code path (the fast tier)
    python -m theorax.experiments.device_check --out=DIR --gp_hyperprior_budget_s=300   # task (d), paper preset

Writes `DIR/device_check.json` (every row, the devices and their memory, the machine record of
`experiments.timing`) after each workload, so a run cut short still leaves what it measured, and
`DIR/device_check.md` (a table). Every workload runs the systems' own code (the recipe's train step, `sample`
and `search_ratios`, the transformer's posterior and train step), with the batch split by `NamedSharding` over
a `data` mesh of every device found (`runtime.data_mesh`; the JSON gives the count), and each program is
compiled ahead of time and checked against the device's free memory first (`runtime.compile_within_memory`):
a workload that cannot fit is reported with the size it needs and the memory the device has, and the check goes
on. A missing peer (torch) skips its rows and says so. From Python: `run_device_check(out, tiny=True)`.

| system | workload (full size) | timed | H200 estimate, compile included |
|---|---|---|---|
| chip | n x n x n matmul, n = 8192, float32 and bfloat16 (JAX; torch beside it) | best of 3 x 5 | 10 s |
| scaled MLPs | B-12/Wi-1024 train step, 64x64x3, batch 1,024, full recipe (crops, flips, mixup, label smoothing, Lion), float32 and bfloat16 compute: images/s and the fraction of that dtype's matmul rate | best of 3 x 10 steps | 40 s |
| DC-Solver | NFE-10 DC-Solver sampling (UniPC-3 bh1, CFG 7.5; the program `sample` compiles) of 1,000,000 points in 64 dimensions, the `cpu` preset's analytic mixture; one NFE-10 ratio search on 10 points (cold = with compilation, then warm) | best of 3; the search cold once, then best of 3 | 40 s |
| distribution transformers | DT-5 posteriors (the paper's `invgamma_wide` model, 64/8/6/256) for 100,000 problems; its training step at batch 5,000 | best of 3; best of 3 x 10 steps | 40 s |
| deep kernel machines, interaction basis | `device_workload(tiny)` of `experiments/bench_dkm.py` / `bench_interaction_basis.py`, once they exist | theirs | 60 s |
| scaled MLPs | the same model in PyTorch on the same device: eager and `torch.compile`, float32 (TF32 matmuls, as XLA's default on GPU) and bfloat16 autocast | best of 3 x 10 steps | 150 s |

About 340 s by these estimates (they are not measurements: no accelerator has run this yet). The PyTorch peers
run last, since `torch.compile` is the longest part; a workload that would start after `--budget_s` (360 s) is
skipped with a note, so the check ends inside the device's 10-minute limit whatever happens.

On the project's H200 (the `device` tool, `carry=[".whl"]`, from the repository root): the device has JAX (CUDA),
flax, optax, numpyro, chex, einops, orbax and torch, but not ml-collections or tensorboardX, whose wheels
`make device-wheels` puts in `.whl/` (ignored by git), and the checkout must be importable as `theorax` (a link
in /tmp/pkg). The first call (timeout_s 540) runs the check:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl && export PYTHONPATH=/tmp/site || exit; mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/theorax \
      && export PYTHONPATH=/tmp/pkg:$PYTHONPATH PYTHONUNBUFFERED=1 \
      && python3 -m theorax.experiments.device_check --out=$OUT

The second (timeout_s 570; the same command with `--gp_hyperprior_budget_s=300` after `--out=$OUT`) trains task
(d) of the distribution transformer at the paper's preset (DT-20, 256/16/5096, 6 layers, batch 1,000) for the
steps that fit 300 s, sized from its own measured step time, and scores it against the quadrature reference
(compilation twice, ~300 s of training, the evaluation). It writes `gp_hyperprior.json` (the results, the step
time, the overrides and the equivalent `experiments.distribution_transformer` command) and `gp_hyperprior.md`
(the README's task (d) row). It needs about 7 of the 15 minutes of device time; lower the budget when `status`
shows less left.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import json
import math
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from theorax.configs import dc_solver as dc_config
from theorax.configs import distribution_transformer as dt_config
from theorax.experiments import bench_scaled_mlp, runtime, timing
from theorax.experiments import distribution_transformer as dtx
from theorax.experiments.dc_solver import make_mixture
from theorax.inference import dc_solver as dcs
from theorax.inference.dc_solver import solvers as dc_solvers
from theorax.inference.dc_solver.config import solver_config
from theorax.inference.distribution_transformer import training as dt_training
from theorax.models import diffusion
from theorax.models.scaled_mlp import ScaledMLP, forward_flops, parse_architecture

FLAGS = flags.FLAGS
BUDGET_S = 360.0  # the 6 minutes on one H200, compilation included


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The workloads' sizes and timed repeats (`FULL` on an accelerator, `TINY` on any CPU).

    Attributes:
      matmul_n: side of the square matmul that measures the chip's rate.
      mlp_model, mlp_res, mlp_batch: the scaled MLP's architecture, image side (3 channels) and batch.
      dc_points, dc_nfe: DC-Solver's batch of points (64-dimensional) and steps.
      search_points, search_gt_steps, search_iters: the ratio search's datapoints, DDIM ground-truth steps and
        optimiser iterations per step.
      dt_problems, dt_batch: problems of the posterior workload; batch of the transformer's training step.
      dt_model: (d_model, heads, layers, feed-forward width) of the transformer (the paper's DT-5: 64/8/6/256).
      repeats: timed repeats (the best is reported, and the median); steps: calls per repeat of a train step.
    """

    matmul_n: int = 8192
    mlp_model: str = "B-12/Wi-1024"
    mlp_res: int = 64
    mlp_batch: int = 1024
    dc_points: int = 1_000_000
    dc_nfe: int = 10
    search_points: int = 10
    search_gt_steps: int = 200
    search_iters: int = 40
    dt_problems: int = 100_000
    dt_batch: int = 5000
    dt_model: tuple[int, int, int, int] = (64, 8, 6, 256)
    repeats: int = 3
    steps: int = 10


FULL = Sizes()
TINY = Sizes(
    matmul_n=256,
    mlp_model="B-2/Wi-64",
    mlp_res=16,
    mlp_batch=32,
    dc_points=1000,
    search_gt_steps=20,
    search_iters=3,
    dt_problems=1000,
    dt_batch=64,
    dt_model=(16, 2, 1, 32),
    repeats=2,
    steps=2,
)
DTYPES = {"float32": None, "bfloat16": jnp.bfloat16}


# ------------------------------------------------------------------------------------------ the check


@dataclasses.dataclass
class Check:
    """What every workload shares: the sizes, the mesh, the memory check, the torch peer, the matmul rates."""

    sizes: Sizes
    tiny: bool
    mesh: jax.sharding.Mesh
    memory_limit_bytes: int | None = None
    torch_device: str | None = None  # None: no torch rows (see torch_missing)
    torch_missing: str = ""  # why there are none
    torch_modes: tuple[str, ...] = ("eager", "compile")
    peak: dict[str, float] = dataclasses.field(default_factory=dict)  # dtype -> FLOP/s

    @property
    def batch(self) -> jax.sharding.NamedSharding:
        return runtime.batch_sharding(self.mesh)

    @property
    def replicated(self) -> jax.sharding.NamedSharding:
        return runtime.replicated(self.mesh)

    def batch_or_none(self, n: int) -> jax.sharding.NamedSharding | None:
        """The batch sharding when `n` splits over every device, else None (one device)."""
        return self.batch if n % self.mesh.size == 0 else None

    def compile(self, what: str, jitted, *args) -> tuple[jax.stages.Compiled, dict]:
        """Compiles ahead of time within the device's memory; returns (program, its memory in bytes)."""
        start = time.perf_counter()
        compiled = runtime.compile_within_memory(
            jitted, *args, what=what, limit_bytes=self.memory_limit_bytes
        )
        memory = runtime.program_memory(compiled)
        return compiled, {"memory_bytes": memory, "compile_s": time.perf_counter() - start}


def row(system: str, workload: str, *, status: str = "ok", note: str = "", **fields) -> dict:
    """One line of the table: `seconds` (best per call), `median_s`, `compile_s`, `rate` in `unit`,
    `fraction_of_matmul_rate`, `memory_bytes` (`runtime.program_memory`) and anything else a workload
    reports."""
    return {"system": system, "workload": workload, "status": status, "note": note, **fields}


def abstract(tree, sharding) -> object:
    """`jax.ShapeDtypeStruct`s of a pytree of arrays or shapes, placed with `sharding`."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def timed_calls(fn: Callable[[], object], sizes: Sizes, calls: int) -> dict:
    t = timing.time_calls(fn, sizes.repeats, calls)
    return {"seconds": t["min_s"], "median_s": t["median_s"]}


def time_train_steps(compiled, state, *inputs, repeats: int, calls: int) -> dict:
    """Best and median seconds per step of `state, metrics = compiled(state, *inputs, step)` (state donated,
    steps numbered on), each step waited for; best of `repeats` means of `calls` steps."""
    holder = {"state": state, "i": 0}

    def one():
        holder["state"], metrics = compiled(holder["state"], *inputs, np.int32(holder["i"]))
        holder["i"] += 1
        metrics["loss"].block_until_ready()

    t = timing.time_calls(one, repeats, calls)
    holder.clear()  # the state's buffers go now, not when the caller's frame does
    return {"seconds": t["min_s"], "median_s": t["median_s"]}


# ---------------------------------------------------------------------------------------- workloads


def matmul(check: Check) -> list[dict]:
    """The chip's matmul rate per dtype (the denominator of the scaled MLPs' fraction), JAX and torch."""
    n, rows = check.sizes.matmul_n, []
    for dtype in DTYPES:
        rates = bench_scaled_mlp.matmul_rate(n, dtype, torch_device=check.torch_device)
        check.peak[dtype] = max(rates.values())
        note = (
            f"torch {rates['torch'] / 1e12:.3g} TFLOP/s"
            if "torch" in rates
            else f"torch: {check.torch_missing}"
        )
        rows.append(
            row("chip", f"matmul {n}x{n}x{n}, {dtype}", rate=rates["jax"] / 1e12, unit="TFLOP/s",
                note=note, rates=rates)
        )  # fmt: skip
    return rows


def _mlp_setup(sizes: Sizes):
    depth, width, expansion = parse_architecture(sizes.mlp_model)
    b, res = sizes.mlp_batch, sizes.mlp_res
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (b, res, res, 3)).astype(np.uint8)
    labels = rng.integers(0, 10, (b,)).astype(np.int32)
    flops = 6 * forward_flops(depth, width, 10, 3 * res * res, expansion) * b
    return (depth, width, expansion), images, labels, flops


def scaled_mlp(check: Check) -> list[dict]:
    """The recipe's jitted train step (`bench_scaled_mlp.recipe_step`) in float32 and bfloat16 compute."""
    s = check.sizes
    (depth, width, expansion), images, labels, flops = _mlp_setup(s)
    b, res = s.mlp_batch, s.mlp_res
    batch = check.batch_or_none(b)
    x, y = jax.device_put(images, batch), jax.device_put(labels, batch)
    models = {
        name: ScaledMLP(10, depth, width, expansion, input_shape=(res, res, 3), dtype=dtype)
        for name, dtype in DTYPES.items()
    }
    steps = {name: bench_scaled_mlp.recipe_step(m, res, augment=True) for name, m in models.items()}

    # Parameters (and Lion's state) are float32 whatever the compute dtype: one initialiser serves both.
    def init(key, model=models["float32"], optimizer=steps["float32"][1]):
        params = model.init(key, jnp.zeros((1, res, res, 3)))
        return {"params": params, "opt_state": optimizer.init(params)}

    init = jax.jit(init, out_shardings=check.replicated)
    key = jax.random.key(0)
    state_shape = abstract(jax.eval_shape(init, key), check.replicated)
    rows = []
    for name, (step, _) in steps.items():
        what = f"{s.mlp_model} train step, {res}x{res}x3, batch {b:,}, full recipe, {name}"
        compiled, info = check.compile(
            what, step, state_shape, abstract(images, batch), abstract(labels, batch), np.int32(0)
        )
        t = time_train_steps(compiled, init(key), x, y, repeats=s.repeats, calls=s.steps)
        peak = check.peak.get(name)
        rows.append(
            row("scaled MLPs", what, rate=b / t["seconds"], unit="images/s", **t,
                fraction_of_matmul_rate=flops / t["seconds"] / peak if peak else None,
                train_flops_per_step=flops, **info)
        )  # fmt: skip
    return rows


def torch_step_times(
    res: int,
    repeats: int,
    calls: int,
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
    """The bench's model and optimiser in PyTorch on `device` (eager and/or torch.compile), fed augmented
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
        model = TorchBottleneckMLP(3 * res**2, width, depth, num_classes, expansion)
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
            bench_scaled_mlp.torch_sync(device)
            return loss

        try:
            start = time.perf_counter()
            fn()
            out[f"torch_{mode}_first_call_s"] = time.perf_counter() - start
            out[f"torch_{mode}_step_s"] = timing.time_calls(fn, repeats, calls)["min_s"]
        except Exception as e:  # noqa: BLE001 - a broken torch.compile toolchain is reported, not fatal
            out[f"torch_{mode}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return out


def scaled_mlp_torch(check: Check) -> list[dict]:
    """The same model and optimiser in PyTorch on the same device (`torch_step_times`)."""
    s = check.sizes
    (depth, width, expansion), images, labels, flops = _mlp_setup(s)
    b, res = s.mlp_batch, s.mlp_res
    rows = []
    for name in DTYPES:
        label = "bfloat16 autocast" if name == "bfloat16" else "float32"
        what = lambda mode, label=label: (
            f"{s.mlp_model} train step, torch {mode}, batch {b:,}, {label}"
        )
        if check.torch_device is None:
            rows += [
                row("scaled MLPs", what(m), status="skipped", note=check.torch_missing)
                for m in ("eager", "compile")
            ]
            continue
        out = torch_step_times(
            res, s.repeats, s.steps, depth, width, expansion, 10, images, labels,
            device=check.torch_device, bf16=name == "bfloat16", modes=check.torch_modes,
        )  # fmt: skip
        peak = check.peak.get(name)
        for mode in ("eager", "compile"):
            if mode not in check.torch_modes:
                rows.append(row("scaled MLPs", what(mode), status="skipped",
                                note=f"skipped: torch {mode} not asked for"))  # fmt: skip
            elif f"torch_{mode}_step_s" not in out:
                rows.append(
                    row("scaled MLPs", what(mode), status="failed", note=out[f"torch_{mode}_error"])
                )
            else:
                t = out[f"torch_{mode}_step_s"]
                rows.append(
                    row("scaled MLPs", what(mode), seconds=t, rate=b / t, unit="images/s",
                        fraction_of_matmul_rate=flops / t / peak if peak else None,
                        compile_s=out[f"torch_{mode}_first_call_s"],
                        note="fed augmented batches (the official crops run in the data loader)")
                )  # fmt: skip
    return rows


def dc_solver(check: Check) -> list[dict]:
    """DC-Solver sampling (NFE 10, CFG 7.5) over a sharded batch, and one `search_ratios`.

    The sampler is the program `dcs.sample` jits, the one scan of `solvers.run` over the coefficient plan,
    compiled here ahead of time for the shapes (checked against the free memory before the points exist) and
    called directly, so it compiles once; its non-finite flag is checked as `sample` checks it."""
    s = check.sizes
    mixture = make_mixture(dc_config.get_config("cpu"))
    schedule = diffusion.VPSchedule.named("sd_scaled_linear")
    eps_fn = mixture.eps_fn(schedule)
    n, dim, nfe, cfg = s.dc_points, mixture.dim, s.dc_nfe, np.float32(7.5)
    options = dict(order=3, variant="bh1", spacing="linspace")
    ratios = np.array([1.0, 1.0] + [0.9, 1.1] * ((nfe - 2) // 2) + [1.0] * ((nfe - 2) % 2))
    batch = check.batch_or_none(n)
    what = f"NFE-{nfe} DC-Solver sampling, {n:,} points x {dim}, CFG {cfg}"

    config = solver_config("dc", **options)
    plan = dc_solvers.make_plan(config, schedule, config.time_steps(schedule, nfe))
    run = jax.jit(functools.partial(dc_solvers.run, dc=True))
    ratios32 = jnp.asarray(ratios, jnp.float32)
    labels_shape = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=batch)
    x_shape = jax.ShapeDtypeStruct((n, dim), jnp.float32, sharding=batch)
    sampler, info = check.compile(
        what, run, eps_fn, x_shape, plan, ratios32, dcs.Guidance(labels_shape, cfg)
    )
    key_x, key_y = jax.random.split(jax.random.key(0))
    x = jax.jit(lambda k: jax.random.normal(k, (n, dim)), out_shardings=batch)(key_x)
    draw_labels = lambda k: jax.random.randint(k, (n,), 0, mixture.num_classes)
    guidance = dcs.Guidance(jax.jit(draw_labels, out_shardings=batch)(key_y), cfg)

    def sample():
        return jax.block_until_ready(sampler(eps_fn, x, plan, ratios32, guidance))

    x0, _, _, bad = sample()
    if int(bad) >= 0 or not bool(jnp.all(jnp.isfinite(x0))):
        raise FloatingPointError(f"{what}: non-finite model output at evaluation {int(bad)}")
    t = timed_calls(sample, s, 1)
    rows = [row("DC-Solver", what, rate=n / t["seconds"], unit="points/s", **t, **info)]

    xs = jax.random.normal(jax.random.key(1), (s.search_points, dim))
    ys = jnp.arange(s.search_points) % mixture.num_classes

    def search(xs):
        return dcs.search_ratios(
            eps_fn, xs, schedule, nfe=nfe, guidance=dcs.Guidance(ys, cfg),
            gt_steps=s.search_gt_steps, num_iters=s.search_iters, **options,
        )  # fmt: skip

    start = time.perf_counter()
    searched = search(xs)
    cold = time.perf_counter() - start
    xs2 = jax.random.normal(jax.random.key(2), (s.search_points, dim))
    t = timed_calls(lambda: search(xs2), s, 1)
    rows.append(
        row("DC-Solver",
            f"NFE-{nfe} ratio search, {s.search_points} points, {s.search_gt_steps}-step DDIM ground "
            f"truth, {s.search_iters} iterations per step", **t, compile_s=cold,
            note=f"cold (with compilation) {cold:.2f} s; target < 30 s", ratios=searched)
    )  # fmt: skip
    return rows


def _dt_entry(sizes: Sizes):
    """The paper's task (b) entry (`invgamma_wide`: DT-5, 64/8/6/256), with the check's model sizes."""
    c = dt_config.get_config("invgamma_wide").tasks.invgamma_wide
    d_model, heads, layers, ff = sizes.dt_model
    c.model.update(d_model=d_model, num_heads=heads, num_layers=layers, dim_feedforward=ff)
    c.train.batch_size = sizes.dt_batch
    return c


def distribution_transformer(check: Check) -> list[dict]:
    """DT-5 posteriors for a sharded batch of problems (`make_posterior_fn`) and the training step
    (`experiments.distribution_transformer.training_setup`, the experiment's own)."""
    s = check.sizes
    c = _dt_entry(s)
    task, model = dtx.build(c)
    arch = "DT-5 ({}/{}/{}/{})".format(*s.dt_model)
    state, step = dtx.training_setup(c, task, model)
    params = jax.device_put(state["params"], check.replicated)  # weights do not change the cost

    n = s.dt_problems
    prob = jax.jit(task.sample, static_argnums=1)(jax.random.key(2024), n)
    prior, observations = prob.prior, prob.observations
    if check.batch_or_none(n) is not None:
        prior, observations = jax.device_put((prior, observations), check.batch)
    posterior_fn = dt_training.make_posterior_fn(model, **dtx.cpu_tuning())
    what = f"{arch} posteriors for {n:,} problems (task b)"
    compiled, info = check.compile(what, posterior_fn, params, prior, observations)
    t = timed_calls(lambda: jax.block_until_ready(compiled(params, prior, observations)), s, 1)
    rows = [row("distribution transformers", what, rate=n / t["seconds"], unit="problems/s",
                **t, **info)]  # fmt: skip

    what = f"{arch} training step, batch {s.dt_batch:,} (fresh draws inside the step)"
    compiled, info = check.compile(what, step, state, np.int32(0))
    t = time_train_steps(compiled, state, repeats=s.repeats, calls=s.steps)
    rows.append(row("distribution transformers", what, rate=s.dt_batch / t["seconds"],
                    unit="problems/s", **t, **info))  # fmt: skip
    return rows


def joining(system: str, module: str) -> Callable[[Check], list[dict]]:
    """A system whose bench module defines `device_workload(tiny: bool) -> dict`: its rows, once the module
    exists (until then one skipped row says so). The dict maps each workload's name to its fields (or is
    one workload's fields, named by its "workload" key); fields as `row` names them (`seconds`, `median_s`,
    `compile_s`, `rate`, `unit`, ...)."""

    def workload(check: Check) -> list[dict]:
        if importlib.util.find_spec(module) is None:
            return [row(system, "device_workload", status="skipped",
                        note=f"{module} is not in this tree yet; it joins the check when it lands")]  # fmt: skip
        result = importlib.import_module(module).device_workload(check.tiny)
        if result and all(isinstance(v, dict) for v in result.values()):
            return [row(system, name, **fields) for name, fields in result.items()]
        fields = dict(result)
        return [row(system, fields.pop("workload", "device_workload"), **fields)]

    workload.__name__ = module.rsplit(".", 1)[-1]
    return workload


# In the order they run (the PyTorch peers last: their torch.compile is the longest part of the check).
WORKLOADS: tuple[Callable[[Check], list[dict]], ...] = (
    matmul,
    scaled_mlp,
    dc_solver,
    distribution_transformer,
    joining("deep kernel machines", "theorax.experiments.bench_dkm"),
    joining("interaction basis", "theorax.experiments.bench_interaction_basis"),
    scaled_mlp_torch,
)
SYSTEMS = (
    "chip",
    "scaled MLPs",
    "DC-Solver",
    "distribution transformers",
    "deep kernel machines",
    "interaction basis",
)
_SYSTEM_OF = {"matmul": "chip", "scaled_mlp": "scaled MLPs", "scaled_mlp_torch": "scaled MLPs",
              "dc_solver": "DC-Solver", "distribution_transformer": "distribution transformers",
              "bench_dkm": "deep kernel machines", "bench_interaction_basis": "interaction basis"}  # fmt: skip


# ------------------------------------------------------------------------------------------- running


def torch_peer(backend: str) -> tuple[str | None, str]:
    """(torch's device for the peers, or None, and why not)."""
    try:
        import torch
    except ImportError:
        return None, "skipped: torch is not installed (pip install 'theorax[interop]')"
    if backend == "cpu":
        return "cpu", ""
    if backend == "gpu" and torch.cuda.is_available():
        return "cuda", ""
    return None, f"skipped: torch has no device for JAX's {backend} backend"


def devices_record(mesh) -> dict:
    devices = jax.devices()
    memory = runtime.device_memory()
    return {
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "process_count": jax.process_count(),
        "devices": [str(d) for d in devices],
        "mesh": dict(mesh.shape),
        "memory": memory,
        "jax": jax.__version__,
    }


def run_device_check(
    out: str,
    tiny: bool = False,
    *,
    torch: bool = True,
    torch_compile: bool = True,
    budget_s: float = BUDGET_S,
    memory_limit_bytes: int | None = None,
    allow_loaded: bool = False,
    workloads=WORKLOADS,
) -> dict:
    """Runs every workload (see the module docstring) and writes `out/device_check.{json,md}`.

    Args:
      out: the output directory.
      tiny: the tiny sizes (`TINY`), for the CPU; else `FULL`.
      torch: time the PyTorch peers (rows say "skipped" where torch is missing or has no such device).
      torch_compile: the peers include `torch.compile` (minutes of compilation on a CPU), not only eager.
      budget_s: workloads that would start later than this many seconds after the start are skipped.
      memory_limit_bytes: assume at most this much free device memory (see `runtime.compile_within_memory`).
      allow_loaded: on the CPU, measure even when the machine is busy (the record says so); on an
        accelerator the CPU's load is recorded, not refused.
      workloads: the workloads to run (default: all).

    Returns:
      What `device_check.json` holds: `machine`, `devices`, `sizes`, `rows`, `wall_s`.
    """
    start = time.perf_counter()
    backend = jax.default_backend()
    cpu = backend == "cpu"  # the CPU cores' contention matters to CPU timings only
    record = timing.machine(allow_loaded=allow_loaded or not cpu, probe_cores=cpu)
    mesh = runtime.data_mesh()
    torch_device, missing = torch_peer(backend) if torch else (None, "skipped: --notorch")
    modes = ("eager", "compile") if torch_compile else ("eager",)
    sizes = TINY if tiny else FULL
    check = Check(sizes, tiny, mesh, memory_limit_bytes, torch_device, missing, modes)
    result = {
        "machine": record,
        "devices": devices_record(mesh),
        "tiny": tiny,
        "sizes": dataclasses.asdict(check.sizes),
        "budget_s": budget_s,
        "rows": [],
    }
    with _torch_tf32(torch_device) as precision:
        if precision:
            result["torch_float32_matmul_precision"] = precision
        for workload in workloads:
            system = _SYSTEM_OF.get(workload.__name__, workload.__name__)
            elapsed = time.perf_counter() - start
            if elapsed > budget_s:
                rows = [row(system, workload.__name__, status="skipped",
                            note=f"the check's budget of {budget_s:.0f} s was spent ({elapsed:.0f} s)")]  # fmt: skip
            else:
                rows = _run_workload(workload, system, check)
            result["rows"] += rows
            result["wall_s"] = time.perf_counter() - start
            _write(out, result)
    return result


@contextlib.contextmanager
def _torch_tf32(device: str | None):
    """On CUDA, lets torch's float32 matmuls use TF32, as XLA's default float32 dot on a GPU does, and puts the
    setting back afterwards; yields a description of the setting (None elsewhere)."""
    if device != "cuda":
        yield None
        return
    import torch

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield "high (TF32), as XLA's default float32 dot on a GPU"
    finally:
        torch.set_float32_matmul_precision(previous)


def _run_workload(workload, system: str, check: Check) -> list[dict]:
    """A workload's rows; one that does not fit or fails becomes a row saying why, and the check goes on."""
    try:
        return workload(check)
    except runtime.DeviceMemoryError as e:
        return [row(system, workload.__name__, status="does not fit", note=str(e))]
    except Exception as e:  # noqa: BLE001 - reported in its row; the other workloads still run
        return [
            row(system, workload.__name__, status="failed", note=f"{type(e).__name__}: {e}"[:600])
        ]


# -------------------------------------------------------------------------------------------- output


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if isinstance(x, int | float) and abs(x) >= 1e4:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def _seconds(x) -> str:
    if x is None:
        return "-"
    return f"{1e3 * x:.3g} ms" if x < 1 else f"{x:.3g} s"


def table(result: dict) -> str:
    """The markdown of `device_check.md`."""
    d, rows = result["devices"], result["rows"]
    memory = d["memory"]
    mem = (
        f"{runtime.format_bytes(memory['free'])} free of {runtime.format_bytes(memory['limit'])} per device"
        if memory
        else "memory not reported by the backend"
    )
    lines = [
        "# Device check" + (" (tiny sizes)" if result["tiny"] else ""),
        "",
        f"{d['device_count']} x {d['device_kind']} ({d['backend']}, {d['process_count']} process(es), "
        f"mesh {d['mesh']}), {mem}; jax {d['jax']}. Wall time {result.get('wall_s', 0):.0f} s, compilation "
        f"included (budget {result['budget_s']:.0f} s); 1-minute CPU load {result['machine']['load_1min']:.2f}.",
        "",
        "| system | workload | status | time per call (best / median) | throughput | of the matmul rate "
        "| compile + first call | memory per device | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    order = {s: i for i, s in enumerate(SYSTEMS)}
    for r in sorted(rows, key=lambda r: order.get(r["system"], len(order))):
        best, median = r.get("seconds"), r.get("median_s")
        time_cell = _seconds(best) + (f" / {_seconds(median)}" if median is not None else "")
        rate = f"{_fmt(r['rate'])} {r['unit']}" if r.get("rate") is not None else "-"
        fraction = r.get("fraction_of_matmul_rate")
        lines.append(
            f"| {r['system']} | {r['workload']} | {r['status']} | {time_cell} | {rate} | "
            f"{'-' if fraction is None else f'{100 * fraction:.0f}%'} | {_seconds(r.get('compile_s'))} | "
            f"{runtime.format_bytes(r['memory_bytes']['total']) if r.get('memory_bytes') else '-'} | "
            f"{str(r.get('note', '')).replace('|', '/')} |"
        )
    if "torch_float32_matmul_precision" in result:
        lines += [
            "",
            f"torch float32 matmul precision: {result['torch_float32_matmul_precision']}.",
        ]
    return "\n".join(lines) + "\n"


def _write(out: str, result: dict) -> None:
    if not runtime.is_main_process():
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "device_check.json"), "w") as f:
        json.dump(runtime.jsonable(result), f, indent=1)
    with open(os.path.join(out, "device_check.md"), "w") as f:
        f.write(table(result))


# --------------------------------------------------------------------- task (d) at the paper's preset

PAPER_GP = {
    "nll_y_star": 0.81,
    "nll_lengthscale": 0.31,
}  # the paper's DT on task (d) (reference notes)


def gp_hyperprior_overrides(tiny: bool) -> dict:
    """The config overrides of the task (d) run besides its step count: no baselines (scored against the
    quadrature reference alone), and with `tiny` a model and batch sized for the CPU."""
    overrides = {
        "baselines.nuts_problems": 0,
        "baselines.svi_problems": 0,
        "baselines.is_samples": 0,
    }
    if tiny:
        overrides |= {
            "model.num_components": 2,
            "model.d_model": 16,
            "model.num_heads": 2,
            "model.num_layers": 1,
            "model.dim_feedforward": 32,
            "train.batch_size": 32,
            "eval.num_problems": 16,
            "eval.latency_repeats": 2,
            "eval.chunk": 16,
        }
    return overrides


def _apply(entry, overrides: dict) -> None:
    for key, value in overrides.items():
        *path, name = key.split(".")
        node = functools.reduce(getattr, path, entry)
        setattr(node, name, value)


def run_gp_hyperprior(
    out: str,
    budget_s: float = 300.0,
    *,
    tiny: bool = False,
    max_steps: int | None = None,
    workdir: str | None = None,
    memory_limit_bytes: int | None = None,
    probe_steps: int = 10,
) -> dict:
    """Task (d) at the paper's preset for the steps that fit `budget_s` seconds of training, then scored.

    The step count comes from this machine: the preset's training step is compiled (within the device's memory)
    and `probe_steps` steps are timed; N = budget_s / (best step time), at least 10, at most the preset's
    30,000 (and `max_steps`).
    Then the experiment runs as `experiments.distribution_transformer` does, with N steps, warm-up
    min(preset's, N / 10), one checkpoint at the end and no baselines: the transformer is scored against the
    quadrature reference (exact-posterior gap KL, NLL of y* and of the lengthscale, beside the reference's).
    Writes `out/gp_hyperprior.json` and `out/gp_hyperprior.md` (the README row); returns the JSON's dict.
    """
    config = dt_config.get_config("gp_hyperprior")
    entry = config.tasks.gp_hyperprior
    overrides = gp_hyperprior_overrides(tiny)
    _apply(entry, overrides)
    task, model = dtx.build(entry)
    state, step = dtx.training_setup(entry, task, model)
    what = f"task (d) training step, batch {entry.train.batch_size:,}"
    compiled = runtime.compile_within_memory(
        step, state, np.int32(0), what=what, limit_bytes=memory_limit_bytes
    )
    probe = time_train_steps(compiled, state, repeats=probe_steps, calls=1)
    # at least 10 steps, at most the preset's (the paper's 30,000) and `max_steps`
    num_steps = min(max(10, int(budget_s / probe["seconds"])), entry.train.num_steps)
    num_steps = min(num_steps, max_steps) if max_steps else num_steps
    steps = {
        "train.num_steps": num_steps,
        "train.warmup_steps": min(entry.train.warmup_steps, num_steps // 10),
        "train.checkpoint_every": num_steps,
        "train.log_every": max(1, min(entry.train.log_every, num_steps // 20)),
    }
    overrides |= steps
    _apply(entry, steps)
    workdir = workdir or tempfile.mkdtemp(prefix="theorax_gp_hyperprior_")
    command = [
        *("python", "-m", "theorax.experiments.distribution_transformer"),
        "--config=configs/distribution_transformer.py:gp_hyperprior",
        f"--workdir={workdir}",
        *(f"--config.tasks.gp_hyperprior.{k}={v}" for k, v in overrides.items()),
    ]
    start = time.perf_counter()
    results = dtx.run(config, workdir)["tasks"]["gp_hyperprior"]
    mesh = runtime.data_mesh()
    report = {
        "machine": timing.machine(allow_loaded=True, probe_cores=jax.default_backend() == "cpu"),
        "devices": devices_record(mesh),
        "tiny": tiny,
        "budget_s": budget_s,
        "probe_step_s": probe,
        "overrides": overrides,
        "command": shlex.join(command),
        "run_s": time.perf_counter() - start,
        "results": results,
        "paper": PAPER_GP,
    }
    if runtime.is_main_process():
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "gp_hyperprior.json"), "w") as f:
            json.dump(runtime.jsonable(report), f, indent=1)
        with open(os.path.join(out, "gp_hyperprior.md"), "w") as f:
            f.write(gp_hyperprior_row(report) + "\n")
    return report


def gp_hyperprior_row(report: dict) -> str:
    """The README's task (d) row: the transformer's gap KL and NLLs beside the quadrature reference's."""
    r, d = report["results"], report["devices"]
    dt = next(v for k, v in r["methods"].items() if k.startswith("DT"))
    ref = r["reference_nll"]
    m = report["overrides"]
    size = "tiny" if report["tiny"] else "paper DT-20 (256/16/5096, 6 layers)"
    return (
        f"| (d) GP, {size}, {m['train.num_steps']:,} steps x {r['batch_size']:,} on "
        f"{d['device_count']} x {d['device_kind']} ({r['train_s'] / 60:.1f} min) | "
        f"KL {dt['kl']['mean']:.3g} (gap, median {dt['kl']['median']:.3g}); "
        f"NLL y* {dt['nll_y_star']['mean']:.3g}, l {dt['nll_lengthscale']['mean']:.3g} | "
        f"exact (quadrature) y* {ref['nll_y_star']['mean']:.3g}, l {ref['nll_lengthscale']['mean']:.3g} | "
        f"y* {PAPER_GP['nll_y_star']}, l {PAPER_GP['nll_lengthscale']} |"
    )


# ---------------------------------------------------------------------------------------------- main


def define_flags() -> None:
    """The command line's flags; defined only when this module runs as a script."""
    flags.DEFINE_string("out", None, "Directory for device_check.{json,md} (or gp_hyperprior.*).")
    flags.DEFINE_bool("tiny", False, "Tiny sizes (any CPU, seconds); the same code path.")
    flags.DEFINE_bool("torch", True, "Time the PyTorch peers where torch is installed.")
    flags.DEFINE_bool("torch_compile", True, "The PyTorch peers include torch.compile.")
    flags.DEFINE_float("budget_s", BUDGET_S, "Skip workloads that would start after this.")
    flags.DEFINE_integer("memory_limit_bytes", None, "Assume at most this much free device memory.")
    flags.DEFINE_bool("allow_loaded_machine", False, "On the CPU, measure even under load.")
    flags.DEFINE_float(
        "gp_hyperprior_budget_s", 0.0, "Instead of the check: task (d) for this many seconds."
    )
    flags.DEFINE_integer("gp_max_steps", None, "At most this many task (d) steps.")
    flags.DEFINE_string("workdir", None, "Task (d)'s run directory (default: a fresh temp dir).")
    flags.mark_flags_as_required(["out"])


def main(argv) -> None:
    del argv
    runtime.initialize_distributed()
    if FLAGS.gp_hyperprior_budget_s > 0:
        report = run_gp_hyperprior(
            FLAGS.out,
            FLAGS.gp_hyperprior_budget_s,
            tiny=FLAGS.tiny,
            max_steps=FLAGS.gp_max_steps,
            workdir=FLAGS.workdir,
            memory_limit_bytes=FLAGS.memory_limit_bytes,
        )
        print(gp_hyperprior_row(report))
        print(f"equivalent command: {report['command']}")
        return
    try:
        result = run_device_check(
            FLAGS.out,
            FLAGS.tiny,
            torch=FLAGS.torch,
            torch_compile=FLAGS.torch_compile,
            budget_s=FLAGS.budget_s,
            memory_limit_bytes=FLAGS.memory_limit_bytes,
            allow_loaded=FLAGS.allow_loaded_machine,
        )
    except timing.LoadedMachineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(table(result))
    print(f"wrote {FLAGS.out}/device_check.json and device_check.md")
    if any(r["status"] in ("failed", "does not fit") for r in result["rows"]):
        sys.exit(1)


if __name__ == "__main__":
    runtime.tune_process()
    define_flags()
    app.run(main)
