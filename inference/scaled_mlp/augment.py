"""On-device data augmentation of the Scaling-MLPs recipe (Sec. 4, official code's FFCV pipeline).

Everything here is a pure function of a PRNG key and a uint8-valued image batch, so it runs inside the jitted
training step (no host round trip, no per-image Python):

* `random_resized_crop`: torchvision/FFCV `RandomResizedCrop`: scale ~ U(0.08, 1) of the area, log-aspect ~
  U(log 3/4, log 4/3), 10 tries per image and the centre fallback, then a resize to (res, res).
* `center_crop`: the test-time crop: the central min(h, w) square resized to (res, res).
* resizing is area-weighted (each output pixel averages the source pixels its footprint covers, weighted by
  overlap), which is OpenCV's INTER_AREA when shrinking and pixel replication for an integer upscale. For
  non-integer upscales OpenCV's INTER_AREA switches to bilinear; we keep the area weights (a small deviation).
* `random_flip`: horizontal flip with probability 1/2.
* `mixup`: FFCV's `ImageMixup(alpha, same_lambda=True)`: one lambda ~ Beta(alpha, alpha) per batch, image i
  mixed with image i-1 (a roll by one), on the 0-255 images before normalisation, truncated to integers.
* `normalize`: (x - 255 mean) / (255 std), per channel.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

NUM_TRIES = 10


def _area_weights(start: Array, length: Array, size_in: int, size_out: int) -> Array:
    """(size_out, size_in) matrix: output pixel o averages source interval [start + o l / n, +l / n)."""
    o = jnp.arange(size_out, dtype=jnp.float32)
    lo = start + o * length / size_out
    hi = lo + length / size_out
    p = jnp.arange(size_in, dtype=jnp.float32)
    overlap = jnp.clip(jnp.minimum(p[None] + 1, hi[:, None]) - jnp.maximum(p[None], lo[:, None]), 0)
    return overlap / (length / size_out)


def crop_and_resize(images: Array, boxes: Array, res: int) -> Float[Array, "n res res c"]:
    """Crops boxes (top, left, height, width) in pixels from (N, H, W, C) images and area-resizes to res."""
    _, h, w, _ = images.shape

    def one(image, box):
        wy = _area_weights(box[0], box[2], h, res)
        wx = _area_weights(box[1], box[3], w, res)
        return jnp.einsum("oh,hwc,pw->opc", wy, image.astype(jnp.float32), wx)

    return jax.vmap(one)(images, boxes.astype(jnp.float32))


def sample_crop_boxes(
    key: Array,
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Array:
    """torchvision's `RandomResizedCrop.get_params` for `n` images at once: (n, 4) integer boxes.

    Up to 10 tries per image; the first whose rounded (h, w) fits wins. Otherwise the whole image is cropped to
    the nearest allowed aspect ratio, centred.
    """
    k_area, k_ratio, k_i, k_j = jax.random.split(key, 4)
    area = height * width
    target = area * jax.random.uniform(k_area, (n, NUM_TRIES), minval=scale[0], maxval=scale[1])
    log_r = jax.random.uniform(
        k_ratio, (n, NUM_TRIES), minval=math.log(ratio[0]), maxval=math.log(ratio[1])
    )
    aspect = jnp.exp(log_r)
    cw = jnp.round(jnp.sqrt(target * aspect))
    ch = jnp.round(jnp.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    first = jnp.argmax(ok, axis=1)
    any_ok = ok.any(axis=1)
    pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]
    ch, cw = pick(ch), pick(cw)
    top = jnp.floor(jax.random.uniform(k_i, (n,)) * (height - ch + 1))
    left = jnp.floor(jax.random.uniform(k_j, (n,)) * (width - cw + 1))
    # Centre fallback (torchvision): clamp the aspect ratio into [ratio[0], ratio[1]].
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    fallback = jnp.array([(height - fh) // 2, (width - fw) // 2, fh, fw], jnp.float32)
    boxes = jnp.stack([top, left, ch, cw], axis=1)
    return jnp.where(any_ok[:, None], boxes, fallback[None])


def random_resized_crop(
    key: Array,
    images: Array,
    res: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Float[Array, "n res res c"]:
    """Random-resized crops of a uint8-valued (N, H, W, C) batch to (N, res, res, C), rounded to integers."""
    n, h, w, _ = images.shape
    boxes = sample_crop_boxes(key, n, h, w, scale, ratio)
    return jnp.round(crop_and_resize(images, boxes, res))


def center_crop(images: Array, res: int) -> Float[Array, "n res res c"]:
    """The central min(H, W) square of each image, area-resized to (res, res) (FFCV's centre-crop decoder)."""
    n, h, w, _ = images.shape
    side = min(h, w)
    if side == res and h == w:
        return images.astype(jnp.float32)
    box = jnp.array([(h - side) // 2, (w - side) // 2, side, side], jnp.float32)
    return jnp.round(crop_and_resize(images, jnp.broadcast_to(box, (n, 4)), res))


def random_flip(key: Array, images: Array) -> Array:
    """Horizontal flip of each image with probability 1/2."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def mixup(key: Array, images: Array, alpha: float) -> tuple[Array, Array]:
    """One lambda ~ Beta(alpha, alpha) for the batch; image i mixed with image i-1, truncated to integers.

    Returns (mixed images, lambda). The loss is lambda CE(y_i) + (1 - lambda) CE(y_{i-1}).
    """
    lam = jax.random.beta(key, alpha, alpha)
    partner = jnp.roll(images, 1, axis=0)
    return jnp.floor(lam * images + (1 - lam) * partner), lam


def normalize(images: Array, mean, std) -> Float[Array, "n h w c"]:
    """(x - 255 mean) / (255 std) per channel; `mean`, `std` on the 0-1 scale."""
    mean = 255.0 * jnp.asarray(mean, jnp.float32)
    std = 255.0 * jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std
