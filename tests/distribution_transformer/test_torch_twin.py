"""The PyTorch twin of a feature-prior DT (the bench's peer) equals our model on the same weights."""

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.interop


def test_torch_twin_of_dt5_matches_ours_on_the_same_weights():
    torch = pytest.importorskip("torch")
    from theorax.experiments.torch_peers import TorchDistributionTransformer
    from theorax.inference.distribution_transformer.tasks import TASKS
    from theorax.models.distribution_transformer import DistributionTransformer, init_params

    task = TASKS["invgamma_wide"]()
    prob = task.sample(jax.random.key(0), 64)
    model = DistributionTransformer(
        **task.model_kwargs(5), d_model=64, num_heads=8, num_layers=6, dim_feedforward=256
    )
    params = init_params(model, jax.random.key(0), prob.prior, prob.observations)
    # Perturb every parameter (the zero-initialised output layers too), so every path carries signal.
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(0)
    params = jax.tree.unflatten(
        tree, [a + 0.1 * rng.normal(size=a.shape).astype(np.float32) for a in leaves]
    )
    ours = model.apply(params, prob.prior, prob.observations)
    twin = TorchDistributionTransformer(model, params)
    with torch.inference_mode():
        theirs = twin(
            torch.from_numpy(np.array(prob.prior)),
            torch.from_numpy(np.array(prob.observations["z"])),
        )
    for a, b in zip((ours.logits, ours.means, ours.scale_tril), theirs, strict=True):
        assert np.abs(np.asarray(a)).max() > 0.1  # not a trivially zero output
        np.testing.assert_allclose(b.numpy(), np.asarray(a), atol=1e-5, rtol=1e-5)
