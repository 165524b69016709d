"""Parity with diffusers' UniPC and DPM-Solver++ schedulers, driven by the same analytic model in float64.

diffusers casts its betas and sigmas to float32; to compare in float64 the test recomputes the scheduler's sigmas
in float64 from the same betas after `set_timesteps` (the algorithm is untouched). `final_sigmas_type` is
"sigma_min", the behaviour the DC-Solver fork and our continuous-time grid share (see
`models.diffusion.time_steps`). DPM-Solver++'s `step` rounds the state to float32 once per step (an upstream
upcast meant for fp16), so its agreement is limited to about float32 round-off accumulated over the steps.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
schedulers = pytest.importorskip("diffusers.schedulers")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from theorax.inference import dc_solver  # noqa: E402
from theorax.models import diffusion  # noqa: E402
from theorax.third_party.dc_solver import TorchMixtureEps  # noqa: E402

pytestmark = pytest.mark.interop


def _setup(seed=0, d=6, batch=8):
    rng = np.random.default_rng(seed)
    betas = diffusion.sd_scaled_linear_betas().astype(np.float32).astype(np.float64)
    schedule = diffusion.VPSchedule.discrete(betas)
    means = rng.normal(size=(6, d))
    mixture = diffusion.GaussianMixture.class_conditional(
        means, rng.uniform(0.2, 0.6, size=6), np.kron(np.eye(3), np.ones((1, 2)))
    )
    x_T = rng.normal(size=(batch, d))
    labels = rng.integers(0, 3, size=batch)
    return betas, schedule, mixture, x_T, labels


def _diffusers_loop(scheduler_cls, betas, eps, x_T, nfe, **options):
    """diffusers' multistep `scheduler_cls` (final sigma = sigma_min, as our grid ends) stepped with eps."""
    scheduler = scheduler_cls(trained_betas=betas, final_sigmas_type="sigma_min", **options)
    scheduler.set_timesteps(nfe)
    acp = np.cumprod(1.0 - betas)
    sig = np.sqrt((1.0 - acp) / acp)
    k = scheduler.timesteps.numpy()
    scheduler.sigmas = torch.from_numpy(np.concatenate([sig[k], sig[:1]]))  # float64, same values
    x = torch.from_numpy(x_T.copy())
    for t in scheduler.timesteps:
        x = scheduler.step(eps(x, t), t, x).prev_sample
    return x.numpy()


def _ours(mixture, schedule, x_T, nfe, solver, **options):
    """Our sampler in float64 on diffusers' "linspace" timesteps (then sigma_min)."""
    with jax.enable_x64(True):
        x0 = dc_solver.sample(
            mixture.eps_fn(schedule), jnp.asarray(x_T), schedule, nfe=nfe, solver=solver,
            spacing="linspace", **options,
        )  # fmt: skip
        assert x0.dtype == jnp.float64
    return x0


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize(
    "order,variant,nfe",
    [(1, "bh2", 6), (2, "bh2", 5), (2, "bh1", 8), (3, "bh1", 7), (3, "bh2", 10)],
)
def test_unipc_matches_diffusers(order, variant, nfe, guided):
    betas, schedule, mixture, x_T, labels = _setup()
    twin = TorchMixtureEps(mixture, schedule, dtype=torch.float64)
    scale = 4.0
    lab = torch.from_numpy(labels)
    eps = (lambda x, t: twin.guided(x, t, lab, scale)) if guided else twin
    theirs = _diffusers_loop(
        schedulers.UniPCMultistepScheduler, betas, eps, x_T, nfe,
        solver_order=order, solver_type=variant, lower_order_final=True,
    )  # fmt: skip
    guidance = dc_solver.Guidance(labels, scale) if guided else None
    ours = _ours(
        mixture, schedule, x_T, nfe, "unipc", order=order, variant=variant, guidance=guidance
    )
    assert _rel(ours, theirs) < 1e-6


def test_unipc_disable_corrector_matches_diffusers():
    betas, schedule, mixture, x_T, _ = _setup(seed=1)
    twin = TorchMixtureEps(mixture, schedule, dtype=torch.float64)
    theirs = _diffusers_loop(
        schedulers.UniPCMultistepScheduler,
        betas,
        twin,
        x_T,
        6,
        solver_order=2,
        disable_corrector=[0],
    )
    ours = _ours(mixture, schedule, x_T, 6, "unipc", order=2, variant="bh2", disable_corrector=(0,))
    assert _rel(ours, theirs) < 1e-6


@pytest.mark.parametrize(
    "order,solver_type,nfe",
    [(1, "midpoint", 6), (2, "midpoint", 8), (2, "heun", 6), (3, "midpoint", 10)],
)
def test_dpm_solver_pp_matches_diffusers(order, solver_type, nfe):
    betas, schedule, mixture, x_T, _ = _setup(seed=2)
    twin = TorchMixtureEps(mixture, schedule, dtype=torch.float64)
    theirs = _diffusers_loop(
        schedulers.DPMSolverMultistepScheduler, betas, twin, x_T, nfe,
        solver_order=order, solver_type=solver_type, algorithm_type="dpmsolver++",
        lower_order_final=True,
    )  # fmt: skip
    ours = _ours(
        mixture, schedule, x_T, nfe, "dpmsolver++", order=order, dpm_solver_type=solver_type
    )
    assert _rel(ours, theirs) < 1e-6


def test_ddim_matches_diffusers_ddim():
    """Our DDIM (first-order DPM-Solver++) is diffusers' DDIMScheduler (eta = 0) on the same timesteps."""
    betas, schedule, mixture, x_T, _ = _setup(seed=3)
    twin = TorchMixtureEps(mixture, schedule, dtype=torch.float64)
    sched = schedulers.DDIMScheduler(
        trained_betas=betas,
        clip_sample=False,
        set_alpha_to_one=False,
        timestep_spacing="leading",
        steps_offset=1,
    )
    sched.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - betas))
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]
    sched.set_timesteps(10)
    x = torch.from_numpy(x_T.copy())
    for t in sched.timesteps:
        x = sched.step(twin(x, t), t, x).prev_sample
    k = sched.timesteps.numpy()
    with jax.enable_x64(True):
        ts = np.concatenate([(k + 1.0) / 1000, [1.0 / 1000]])
        ours, _ = dc_solver.sample_with_trajectory(
            mixture.eps_fn(schedule), jnp.asarray(x_T), schedule, ts=ts
        )
    assert _rel(ours, x.numpy()) < 1e-6
