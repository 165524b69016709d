"""The SGLD local learning coefficient: a regular model's is d / 2; parity with devinterp's SGLD (interop)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from theorax.inference.interaction_basis import default_nbeta, llc


def _regression(d=4, n=4000, seed=0):
    key_x, key_noise = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(key_x, (n, d))
    y = x @ jnp.linspace(-1.0, 1.0, d) + jax.random.normal(key_noise, (n,))
    return x, y


def _mse(w, batch):
    return 0.5 * jnp.mean((batch[1] - batch[0] @ w) ** 2)


def test_llc_of_a_regular_quadratic_model_is_half_its_dimension():
    d = 4
    x, y = _regression(d)
    w_star = jnp.linalg.lstsq(x, y)[0]
    est = llc(_mse, w_star, (x, y), jax.random.key(1), num_chains=4, num_draws=4000, num_burnin=500,
              step_size=2e-4, localization=1.0)  # fmt: skip
    assert abs(est.llc_mean - d / 2) < 0.1 * d / 2, est.llc_per_chain
    assert est.loss_trace.shape == (4, 4000)
    assert np.isclose(est.nbeta, default_nbeta(len(y)))


def test_llc_rejects_bad_input():
    x, y = _regression(2, n=10)
    with pytest.raises(ValueError, match="batch_size=20"):
        llc(_mse, jnp.zeros(2), (x, y), jax.random.key(0), batch_size=20)
    with pytest.raises(ValueError, match="same number of examples"):
        llc(_mse, jnp.zeros(2), (x, y[:5]), jax.random.key(0))
    with pytest.raises(ValueError, match="empty"):
        llc(_mse, jnp.zeros(2), (), jax.random.key(0))


def test_llc_raises_when_sgld_diverges():
    # n beta * step * curvature / 2 = 482 * 1.0 / 2 >> 2: every chain blows up within a few hundred steps.
    x, y = _regression(2, n=4000)
    with pytest.raises(FloatingPointError, match=r"diverged .* chains \[0, 1\] of 2"):
        llc(
            _mse,
            jnp.zeros(2),
            (x, y),
            jax.random.key(0),
            num_chains=2,
            num_draws=400,
            step_size=1.0,
        )


@pytest.mark.interop
def test_llc_agrees_with_devinterps_sgld_on_a_small_mlp():
    """Our estimator and devinterp's SGLD optimiser (same update, same n beta, step size, localisation,
    batch size, chains and draws; llc = n beta (mean batch loss - L_n(w*))) on the same trained MLP."""
    torch = pytest.importorskip("torch")
    sgld_mod = pytest.importorskip("devinterp.optim.sgld")
    rng = np.random.default_rng(0)
    n, d_in, hidden = 1000, 3, 8
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    y = (np.sin(x @ np.array([1.0, -1.0, 0.5])) + 0.1 * rng.normal(size=n)).astype(np.float32)
    w1 = rng.normal(size=(d_in, hidden)).astype(np.float32) / np.sqrt(d_in)
    w2 = rng.normal(size=(hidden, 1)).astype(np.float32) / np.sqrt(hidden)
    params = {"w1": jnp.asarray(w1), "w2": jnp.asarray(w2)}

    def loss(p, batch):
        return jnp.mean((jnp.tanh(batch[0] @ p["w1"]) @ p["w2"] - batch[1][:, None]) ** 2)

    # Train to a minimum first (full-batch gradient descent), so both start from the same w*.
    grad = jax.jit(jax.grad(loss))
    for _ in range(3000):
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grad(params, (x, y)))
    kw = dict(num_chains=8, num_draws=300, num_burnin=100, step_size=1e-4, localization=100.0,
              batch_size=100)  # fmt: skip
    nbeta = default_nbeta(n)
    ours = llc(loss, params, (jnp.asarray(x), jnp.asarray(y)), jax.random.key(0), nbeta=nbeta, **kw)

    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    init = {k: torch.tensor(np.asarray(v)) for k, v in params.items()}
    init_loss = float(torch.mean((torch.tanh(xt @ init["w1"]) @ init["w2"] - yt[:, None]) ** 2))
    gen = torch.Generator().manual_seed(0)
    per_chain = []
    for _ in range(kw["num_chains"]):
        w = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
        opt = sgld_mod.SGLD(list(w.values()), lr=kw["step_size"], localization=kw["localization"],
                            nbeta=nbeta)  # fmt: skip
        losses = []
        for step in range(kw["num_burnin"] + kw["num_draws"]):
            idx = torch.randperm(n, generator=gen)[: kw["batch_size"]]
            opt.zero_grad()
            batch_loss = torch.mean((torch.tanh(xt[idx] @ w["w1"]) @ w["w2"] - yt[idx, None]) ** 2)
            batch_loss.backward()
            opt.step(noise_generator=gen)
            if step >= kw["num_burnin"]:
                losses.append(float(batch_loss))
        per_chain.append(nbeta * (np.mean(losses) - init_loss))
    theirs = np.asarray(per_chain)
    sem = np.hypot(
        ours.llc_std / np.sqrt(len(ours.llc_per_chain)), theirs.std() / np.sqrt(len(theirs))
    )
    assert abs(ours.llc_mean - theirs.mean()) < 3 * sem, (ours.llc_per_chain, theirs)
    assert ours.llc_mean > 0
