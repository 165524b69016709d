"""The shared value checks: concrete values are checked, traced ones are left to compiled guards."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from theorax.models.validation import check_finite, is_concrete


def test_is_concrete_outside_and_inside_jit():
    assert is_concrete(1.0) and is_concrete(np.ones(2)) and is_concrete(jnp.ones(2))
    seen = []
    jax.jit(lambda x: seen.append(is_concrete(x)) or x)(jnp.ones(2))
    assert seen == [False]


def test_check_finite_names_the_value_and_the_first_bad_index():
    check_finite(np.ones(3), "ratios")
    with pytest.raises(ValueError, match=r"ratios must be finite.*first at index \(1, 0\)"):
        check_finite(np.array([[1.0, 2.0], [np.nan, 1.0]]), "ratios")
    with pytest.raises(KeyError, match="x must be finite"):
        check_finite(float("inf"), "x", KeyError)
    # traced values pass: inside jit there is nothing to check yet
    jax.jit(lambda x: check_finite(x, "x") or x)(jnp.array([jnp.nan]))
