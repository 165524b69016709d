"""The experiment's CPU tuning of the train step changes how it compiles, never what it computes."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from theorax.experiments.scaled_mlp import cpu_tuning
from theorax.inference.scaled_mlp import training as lib
from theorax.models.scaled_mlp import ScaledMLP


def test_tuned_train_step_is_bitwise_the_library_default():
    model = ScaledMLP(num_classes=5, depth=2, width=16, input_shape=(8, 8, 3))
    params = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (16, 8, 8, 3)), jnp.uint8)
    labels = jnp.asarray(rng.integers(0, 5, 16), jnp.int32)
    recipe = lib.Recipe(res=8, mean=(0.5,) * 3, std=(0.25,) * 3)
    opt = lib.make_optimizer(lib.OptimizerConfig("lion", weight_decay=0.1), 1e-3)
    options = cpu_tuning()["compiler_options"]
    if jax.default_backend() == "cpu":
        assert options  # the CPU build knows the option
    outs = []
    for compiler_options in (None, options):
        step = lib.make_train_step(
            model, opt, recipe, jax.random.key(1), compiler_options=compiler_options
        )
        state = jax.tree.map(jnp.copy, {"params": params, "opt_state": opt.init(params)})
        for i in range(3):  # donated state, updated in place
            state, metrics = step(state, images, labels, np.int32(i))
        outs.append((state, metrics))
    chex.assert_trees_all_equal(*outs)
