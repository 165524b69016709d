"""The training recipe of "Scaling MLPs" (Sec. 4, App. A; official train.py / finetune.py), as jitted steps.

* Loss: cross-entropy against label-smoothed targets (1 - a) onehot + a / K, a = 0.3; under mixup
  lambda CE(y_i) + (1 - lambda) CE(y_{i-1}).
* Optimiser: Lion (b1 0.9, b2 0.99) with decoupled weight decay multiplied by the learning rate, on every
  parameter (`optax.lion` does exactly this); SGD with momentum 0.9 and AdamW as the official alternatives.
  Constant learning rate by default, or the official cosine annealing stepped once per epoch. Optional global-
  norm gradient clipping and gradient accumulation (micro-batches inside one step, one optimiser update).
* Augmentation inside the step (see `inference.scaled_mlp.augment`): random-resized crop + flip, then mixup.
* Fine-tuning: a fresh head; the body's learning rate times `body_lr_multiplier` (0.1 in the paper), or a
  frozen body (linear probe). Test-time augmentation averages softmax probabilities over N random crops, as
  the official `finetune.py` does (the paper's text says logits).

The training state is the pytree `{"params": ..., "opt_state": ...}`; the step number is an argument, and the
step's randomness is `fold_in(key, step)`, so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from theorax.inference.scaled_mlp import augment
from theorax.models.scaled_mlp import ScaledMLP


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Data-side settings of a training or evaluation step.

    Attributes:
      res: the model's input resolution; crops are resized to (res, res).
      mean, std: per-channel normalisation statistics on the 0-1 scale.
      label_smoothing: a in the smoothed targets (0.3 in the paper).
      augment: random-resized crops and flips during training.
      mixup_alpha: Beta parameter of mixup; 0 turns mixup off (mixup also needs `augment`, as officially).
      crop_scale, crop_ratio: `RandomResizedCrop` ranges (area fraction, aspect ratio).
      flip: horizontal flips during augmentation.
      accum_steps: gradient-accumulation micro-batches per step.
    """

    res: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_smoothing: float = 0.3
    augment: bool = True
    mixup_alpha: float = 0.8
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    accum_steps: int = 1


# ------------------------------------------------------------------------------------------ optimiser


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Optimiser-side settings of the recipe; the learning rate (or schedule) goes beside it.

    Attributes:
      name: 'lion', 'sgd' or 'adamw'.
      weight_decay: decoupled (Lion, AdamW: multiplied by the learning rate) or L2 (SGD) weight decay.
      clip: global-norm clipping threshold; 0 turns it off.
      body_lr_multiplier: the body's learning rate is this times the head's (paper: 0.1 when fine-tuning).
      linear_probe: freeze the body (only `linear_out` trains).
      b1, b2: the Lion / AdamW betas (official 0.9, 0.99).
      momentum: SGD's momentum.
    """

    name: str = "lion"
    weight_decay: float = 0.0
    clip: float = 0.0
    body_lr_multiplier: float = 1.0
    linear_probe: bool = False
    b1: float = 0.9
    b2: float = 0.99
    momentum: float = 0.9


def learning_rate_schedule(
    base_lr: float, kind: str, steps_per_epoch: int, epochs: int, warmup_steps: int = 0
) -> optax.Schedule:
    """`constant` (the official default) or `cosine`: CosineAnnealingLR(T_max=epochs) stepped per epoch."""
    if kind == "constant":
        schedule = lambda step: jnp.asarray(base_lr, jnp.float32)
    elif kind == "cosine":

        def schedule(step):
            epoch = jnp.floor_divide(step, steps_per_epoch)
            return base_lr * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(epoch, epochs) / epochs))
    else:
        raise ValueError(f"schedule={kind!r} is not one of ['constant', 'cosine']")
    if warmup_steps > 0:
        warm = optax.linear_schedule(0.0, base_lr, warmup_steps)
        return optax.join_schedules([warm, schedule], [warmup_steps])
    return schedule


def base_optimizer(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """Lion (decoupled wd x lr), SGD with momentum (coupled L2 wd, as torch.optim.SGD), or AdamW."""
    c = config
    if c.name == "lion":
        return optax.lion(learning_rate, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay)
    if c.name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(c.weight_decay) if c.weight_decay else optax.identity(),
            optax.sgd(learning_rate, momentum=c.momentum),
        )
    if c.name == "adamw":
        return optax.adamw(learning_rate, b1=c.b1, b2=c.b2, weight_decay=c.weight_decay)
    raise ValueError(f"optimizer={c.name!r} is not one of ['lion', 'sgd', 'adamw']")


def head_or_body(params) -> dict:
    """Labels every parameter 'head' (linear_out) or 'body', for per-group optimisers."""
    return {
        "params": {
            k: jax.tree.map(lambda _, k=k: "head" if k == "linear_out" else "body", v)
            for k, v in params["params"].items()
        }
    }


def make_optimizer(config: OptimizerConfig, learning_rate) -> optax.GradientTransformation:
    """The full optimiser: optional clipping, then the base optimiser per parameter group.

    Args:
      config: the optimiser's settings (`OptimizerConfig`).
      learning_rate: a float or an optax schedule (the head's rate when fine-tuning).

    Example: fine-tuning with plain SGD, the body (here `linear_in`) at a tenth of the head's rate.

      >>> opt = make_optimizer(OptimizerConfig("sgd", momentum=0.0, body_lr_multiplier=0.1), 0.5)
      >>> params = {"params": {"linear_in": {"kernel": jnp.ones(2)}, "linear_out": {"kernel": jnp.ones(2)}}}
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, _ = opt.update(grads, opt.init(params), params)
      >>> [round(float(updates["params"][k]["kernel"][0]), 6) for k in ("linear_in", "linear_out")]
      [-0.05, -0.5]
    """
    make = lambda lr: base_optimizer(config, lr)
    multiplier = config.body_lr_multiplier
    if config.linear_probe:
        opt = optax.multi_transform(
            {"head": make(learning_rate), "body": optax.set_to_zero()}, head_or_body
        )
    elif multiplier != 1.0:
        body_lr = (
            (lambda s: multiplier * learning_rate(s))
            if callable(learning_rate)
            else multiplier * learning_rate
        )
        opt = optax.multi_transform(
            {"head": make(learning_rate), "body": make(body_lr)}, head_or_body
        )
    else:
        opt = make(learning_rate)
    return optax.chain(optax.clip_by_global_norm(config.clip), opt) if config.clip > 0 else opt


# ------------------------------------------------------------------------------------------------ loss


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float) -> jax.Array:
    """Per-example CE against (1 - a) onehot + a / K (torch's `CrossEntropyLoss(label_smoothing=a)`)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def train_inputs(key: jax.Array, images: jax.Array, labels: jax.Array, recipe: Recipe):
    """Augments a uint8-valued batch on the device: (normalised images, labels, partner labels, lambda)."""
    k_crop, k_flip, k_mix = jax.random.split(key, 3)
    if recipe.augment:
        x = augment.random_resized_crop(
            k_crop, images, recipe.res, recipe.crop_scale, recipe.crop_ratio
        )
        if recipe.flip:
            x = augment.random_flip(k_flip, x)
    else:
        x = augment.center_crop(images, recipe.res)
    lam = jnp.ones((), jnp.float32)
    partner = labels
    if recipe.augment and recipe.mixup_alpha > 0:
        x, lam = augment.mixup(k_mix, x, recipe.mixup_alpha)
        partner = jnp.roll(labels, 1, axis=0)
    return augment.normalize(x, recipe.mean, recipe.std), labels, partner, lam


# ------------------------------------------------------------------------------------------------ steps


def _logits(model: ScaledMLP, params, x, linear_probe: bool):
    if not linear_probe:
        return model.apply(params, x)
    feats = jax.lax.stop_gradient(model.apply(params, x, features=True))
    head = params["params"]["linear_out"]
    return feats @ head["kernel"] + head["bias"]


def make_train_step(
    model: ScaledMLP,
    optimizer: optax.GradientTransformation,
    recipe: Recipe,
    key: jax.Array,
    *,
    linear_probe: bool = False,
    compiler_options: Mapping[str, str | bool | int] | None = None,
) -> Callable:
    """Returns `step(state, images, labels, step) -> (state, metrics)`, jitted with `state` donated.

    `images` are uint8-valued (N, H, W, C) (sharded over the data axis), `labels` int (N,), `step` the global
    step number (its randomness is `fold_in(key, step)`). Metrics: loss, train accuracy (a hit matches either
    mixup label), gradient norm. `compiler_options` are XLA options for this one program
    (`jax.jit(..., compiler_options=...)`); none by default. The experiment passes its machine's
    (`experiments.scaled_mlp.cpu_tuning`); they change how the step is compiled, never what it computes.
    """

    def loss_fn(params, x, y, y2, lam):
        logits = _logits(model, params, x, linear_probe)
        loss = lam * smoothed_cross_entropy(logits, y, recipe.label_smoothing) + (
            1 - lam
        ) * smoothed_cross_entropy(logits, y2, recipe.label_smoothing)
        pred = jnp.argmax(logits, -1)
        return loss.mean(), ((pred == y) | (pred == y2)).mean()

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, images, labels, step):
        x, y, y2, lam = train_inputs(jax.random.fold_in(key, step), images, labels, recipe)
        params = state["params"]
        if recipe.accum_steps == 1:
            (loss, acc), grads = grad_fn(params, x, y, y2, lam)
        else:
            split = lambda a: a.reshape(recipe.accum_steps, -1, *a.shape[1:])

            def micro(carry, batch):
                (loss, acc), g = grad_fn(params, *batch, lam)
                return jax.tree.map(jnp.add, carry, (loss, acc, g)), None

            zero = (jnp.zeros(()), jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
            (loss, acc, grads), _ = jax.lax.scan(micro, zero, (split(x), split(y), split(y2)))
            loss, acc, grads = jax.tree.map(lambda t: t / recipe.accum_steps, (loss, acc, grads))
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        params = optax.apply_updates(params, updates)
        metrics = {"loss": loss, "train_accuracy": acc, "grad_norm": optax.tree.norm(grads)}
        return {"params": params, "opt_state": opt_state}, metrics

    options = dict(compiler_options) if compiler_options else None
    return jax.jit(step, donate_argnums=0, compiler_options=options)


def make_eval_step(model: ScaledMLP, recipe: Recipe) -> Callable:
    """`eval(params, images, labels, mask) -> sums` of top-1 / top-5 hits, loss and count (centre crops)."""

    def evaluate(params, images, labels, mask):
        x = augment.normalize(augment.center_crop(images, recipe.res), recipe.mean, recipe.std)
        logits = model.apply(params, x).astype(jnp.float32)
        return topk_sums(logits, labels, mask)

    return jax.jit(evaluate)


def make_tta_step(model: ScaledMLP, recipe: Recipe, num_crops: int, key: jax.Array) -> Callable:
    """Like `make_eval_step`, averaging softmax probabilities over `num_crops` random crops + flips
    (train-style crops with the recipe's crop_scale and crop_ratio, no mixup), as the official TTA."""

    def evaluate(params, images, labels, mask):
        def one(probs, k):
            k_crop, k_flip = jax.random.split(k)
            x = augment.random_resized_crop(
                k_crop, images, recipe.res, recipe.crop_scale, recipe.crop_ratio
            )
            x = augment.normalize(augment.random_flip(k_flip, x), recipe.mean, recipe.std)
            return probs + jax.nn.softmax(model.apply(params, x).astype(jnp.float32)), None

        zeros = jnp.zeros((images.shape[0], model.num_classes), jnp.float32)
        probs, _ = jax.lax.scan(one, zeros, jax.random.split(key, num_crops))
        return topk_sums(jnp.log(probs / num_crops), labels, mask)

    return jax.jit(evaluate)


def topk_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array) -> dict:
    """Masked sums of top-1 and top-5 hits, cross-entropy and the example count."""
    k = min(5, logits.shape[-1])
    top = jax.lax.top_k(logits, k)[1]
    hit5 = (top == labels[:, None]).any(-1)
    hit1 = top[:, 0] == labels
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    m = mask.astype(jnp.float32)
    return {
        "top1": (hit1 * m).sum(),
        "top5": (hit5 * m).sum(),
        "loss": (ce * m).sum(),
        "count": m.sum(),
    }


def compute_flops(forward_macs: int, examples_seen: int) -> float:
    """The paper's compute C = FLOP(f) x 3 x examples seen (Sec. 4.4), FLOP(f) counted as MACs (fvcore)."""
    return float(forward_macs) * 3.0 * float(examples_seen)
