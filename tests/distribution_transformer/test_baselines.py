"""inference.baselines' SVI guides against exact posteriors: a Gaussian-mixture guide must capture a bimodal
exact posterior (a GMM prior under a weak linear-Gaussian observation) that a full-rank Gaussian guide cannot,
and both guides must recover an exact Gaussian posterior's mean and covariance."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from theorax.inference.distribution_transformer import baselines, exact
from theorax.inference.distribution_transformer.tasks import GMMLinearGaussianTask
from theorax.models.gmm import GMM, kl_gmm

MODEL = GMMLinearGaussianTask.numpyro_model

# Three problems of task (a)'s numpyro model, batched so each guide compiles once: a 2-D bimodal prior
# (two problems, observations of different sides) and a prior of two identical components (a Gaussian, so
# the exact posterior is Gaussian), all observed once through z = H x + N(0, R).
_COV = jnp.array([[[1.0, 0.3], [0.3, 1.0]], [[1.0, -0.3], [-0.3, 1.0]]])
_GAUSS_COV = jnp.array([[1.5, 0.4], [0.4, 0.8]])
PRIOR = GMM.from_covariance(
    jnp.log(jnp.array([[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]])),
    jnp.array([[[-2.5, 0.0], [2.5, 0.0]]] * 2 + [[[0.5, -1.0], [0.5, -1.0]]]),
    jnp.stack([_COV, _COV, jnp.stack([_GAUSS_COV, _GAUSS_COV])]),
)
H = jnp.array([[1.0, 0.0], [0.5, 1.0]])
R = jnp.diag(jnp.array([4.0, 4.0]))
Z = jnp.array([[0.3, 0.2], [-0.5, 1.0], [1.5, 0.0]])
BIMODAL, GAUSSIAN = slice(0, 2), 2


STEPS = 4000


@pytest.fixture(scope="module")
def fits():
    p = Z.shape[0]
    lr = optax.cosine_decay_schedule(0.05, STEPS)  # decays the ELBO gradients' noise away
    args = (PRIOR.logits, PRIOR.means, PRIOR.scale_tril)
    args = args + (jnp.broadcast_to(H, (p, 2, 2)), jnp.broadcast_to(R, (p, 2, 2)), Z[:, None])
    loc, tril, _ = baselines.svi_gaussian(
        MODEL,
        args,
        jax.random.key(0),
        num_steps=STEPS,
        learning_rate=lr,
        num_particles=10,
    )
    q_gmm, timing = baselines.svi_gmm(
        MODEL,
        args,
        jax.random.key(1),
        num_steps=STEPS,
        guide=baselines.MixtureGuide(num_components=2),
        learning_rate=lr,
        num_particles=5,
    )
    exact_post = exact.linear_gaussian_posterior(PRIOR, H, R, Z)
    return exact_post, GMM.gaussian(loc, tril), q_gmm, timing


def test_gmm_guide_captures_a_bimodal_posterior_that_a_gaussian_guide_cannot(fits):
    p, q_gauss, q_gmm, timing = fits
    assert timing["nonfinite_problems"] == 0
    assert q_gmm.logits.shape == (3, 2) and q_gmm.scale_tril.shape == (3, 2, 2, 2)
    # the exact posteriors really are bimodal with substantial weight on both modes
    assert np.all(np.asarray(p.weights[BIMODAL]) > 0.3)
    kl = jax.jit(kl_gmm, static_argnums=3)
    kl_gauss = np.asarray(kl(jax.random.key(2), p, q_gauss, 20_000))[BIMODAL]
    kl_mix = np.asarray(kl(jax.random.key(2), p, q_gmm, 20_000))[BIMODAL]
    assert np.all(kl_gauss > 0.2), kl_gauss
    assert np.all(kl_mix < 0.02), kl_mix
    # and it puts its components on the two modes with roughly the exact weights
    order = jnp.argsort(q_gmm.means[BIMODAL, :, 0], axis=-1)
    w = np.take_along_axis(np.asarray(q_gmm.weights[BIMODAL]), np.asarray(order), -1)
    np.testing.assert_allclose(w, np.asarray(p.weights[BIMODAL]), atol=0.1)


def test_both_guides_recover_an_exact_gaussian_posterior(fits):
    p, q_gauss, q_gmm, _ = fits
    mean, cov = p.mean()[GAUSSIAN], p.covariance()[GAUSSIAN]
    for q in (q_gauss, q_gmm):
        np.testing.assert_allclose(q.mean()[GAUSSIAN], mean, atol=0.05)
        np.testing.assert_allclose(q.covariance()[GAUSSIAN], cov, atol=0.05)


def test_svi_gmm_refuses_bad_settings_before_compiling():
    args = (PRIOR.logits, PRIOR.means)
    banded, empty = baselines.MixtureGuide(covariance="banded"), baselines.MixtureGuide(0)
    with pytest.raises(ValueError, match="covariance='banded'"):
        baselines.svi_gmm(MODEL, args, jax.random.key(0), num_steps=1, guide=banded)
    with pytest.raises(ValueError, match="num_components"):
        baselines.svi_gmm(MODEL, args, jax.random.key(0), num_steps=1, guide=empty)
    with pytest.raises(ValueError, match="leading problem axis"):
        baselines.svi_gmm(MODEL, (PRIOR.logits, Z[:2]), jax.random.key(0), num_steps=1)
