"""On-device augmentation: area resizing against closed forms, crop statistics, flips, mixup."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from theorax.inference.scaled_mlp import augment


def images(n=6, h=8, w=8, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c)).astype(np.uint8)


def test_center_crop_same_size_is_identity():
    x = images()
    np.testing.assert_array_equal(augment.center_crop(jnp.asarray(x), 8), x)


def test_integer_upscale_replicates_pixels():  # INTER_AREA at 2x (CIFAR 32 -> 64)
    x = images(h=4, w=4)
    expected = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    np.testing.assert_array_equal(augment.center_crop(jnp.asarray(x), 8), expected)


def test_integer_downscale_averages_blocks():
    x = images(h=8, w=8).astype(np.float32)
    boxes = jnp.tile(jnp.array([0.0, 0.0, 8.0, 8.0]), (len(x), 1))
    out = augment.crop_and_resize(jnp.asarray(x), boxes, 4)
    expected = x.reshape(len(x), 4, 2, 4, 2, 3).mean((2, 4))
    np.testing.assert_allclose(out, expected, rtol=1e-5)


def test_center_crop_takes_central_square():
    x = images(h=6, w=10)
    np.testing.assert_array_equal(augment.center_crop(jnp.asarray(x), 6), x[:, :, 2:8])


def test_crop_boxes_follow_torchvision_ranges():
    h = w = 32
    boxes = np.asarray(augment.sample_crop_boxes(jax.random.key(0), 4000, h, w))
    top, left, ch, cw = boxes.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + ch <= h).all() and (left + cw <= w).all()
    frac = ch * cw / (h * w)
    full = (ch == h) & (cw == w)
    # Accepted tries: area fraction in [0.08, 1] and aspect ratio in [3/4, 4/3] up to rounding.
    tried = ~full
    assert frac[tried].min() > 0.06 and frac.max() <= 1.0
    ratio = cw[tried] / ch[tried]
    assert ratio.min() > 0.6 and ratio.max() < 1.6
    # E[U(0.08, 1)] = 0.54; rejection of too-large tries pulls the mean of accepted areas down a little.
    assert 0.40 < frac.mean() < 0.56
    assert len(np.unique(top)) > 20  # positions vary


def test_impossible_scale_falls_back_to_centre():
    boxes = np.asarray(augment.sample_crop_boxes(jax.random.key(0), 50, 10, 20, scale=(3, 4)))
    # Aspect 2 > 4/3: the fallback is the centred crop of full height and width round(10 * 4/3) = 13.
    np.testing.assert_array_equal(boxes, np.tile([0, 3, 10, 13], (50, 1)))


def test_random_flip():
    x = jnp.asarray(images(n=200))
    out = np.asarray(augment.random_flip(jax.random.key(1), x))
    flipped = np.all(out == np.asarray(x)[:, :, ::-1], axis=(1, 2, 3))
    same = np.all(out == np.asarray(x), axis=(1, 2, 3))
    assert np.all(flipped | same)
    assert 60 < flipped.sum() < 140


def test_mixup_pairs_with_previous_image_and_truncates():
    x = jnp.asarray(images(n=5))
    out, lam = augment.mixup(jax.random.key(3), x, 0.8)
    lam = float(lam)
    assert 0 <= lam <= 1
    xf = np.asarray(x, np.float64)
    expected = np.floor(lam * xf + (1 - lam) * np.roll(xf, 1, axis=0))
    np.testing.assert_allclose(out, expected, atol=1.0)  # float32 vs float64 at the floor boundary
    assert np.mean(np.asarray(out) == expected) > 0.99


def test_mixup_lambda_is_beta_distributed():
    lams = jax.vmap(lambda k: augment.mixup(k, jnp.zeros((2, 1, 1, 1)), 0.8)[1])(
        jax.random.split(jax.random.key(0), 4000)
    )
    # Beta(0.8, 0.8): mean 1/2, variance ab / ((a+b)^2 (a+b+1)) = 0.64 / (2.56 * 2.6).
    assert abs(float(lams.mean()) - 0.5) < 0.02
    assert abs(float(lams.var()) - 0.64 / (2.56 * 2.6)) < 0.01


def test_normalize():
    x = jnp.full((1, 2, 2, 3), 127.5)
    out = augment.normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0))
    np.testing.assert_allclose(out[0, 0, 0], [0.0, (127.5 - 63.75) / 63.75, 0.5], rtol=1e-6)
    assert math.isclose(float(out.mean()), float(out[0, 0, 0].mean()), rel_tol=1e-6)
