"""Writes what the Keras transformer (`gpt.py`) computes, for minigpt's `--model gpt` parity
(`tests/parity.rs`, `make parity`).

    python python_export/make_gpt_fixtures.py --data ../shared/data/tinyshakespeare.txt --out DIR

Layout of DIR (arrays are `.npy`, float32 / int32, little-endian; `<var>` is minigpt's variable
name with `/` written as `.`):
  manifest.json         configuration, vocabulary, corpus SHA-256, loss
  init/<var>.npy        Keras' initial weights in minigpt's layout
  x.npy, y.npy          [B, T] int32: the first B windows of the training split, one per T+1 chars
  logits.npy            [B, T, vocab] from the initial weights
  grad/<var>.npy        d loss / d var (tf.GradientTape), in minigpt's layout
  steps/x.npy, y.npy    [S, B, T] int32: the batches of S training steps (windows after x's)
  step<S>/<var>.npy     after S steps of keras.optimizers.AdamW: weights, and Adam's m (.m.npy)
                        and v (.v.npy), in minigpt's layout; manifest.json has each step's loss,
                        learning rate and global gradient norm (before clipping)
  overflow/...          with --overflow-steps K (mixed_float16): the weights after the S steps with
                        the head's kernel multiplied by --overflow-factor (init/), K batches
                        (x.npy, y.npy) on which the step continues with the same optimizer, and
                        the state after them (step/); manifest.json has each step's loss scale,
                        whether it was applied, and its loss

With --precision mixed_bfloat16 or mixed_float16 the model is built under that Keras dtype policy
(`keras.mixed_precision.set_global_policy`); arrays are still written as float32. Under
mixed_float16 the optimizer is Keras' LossScaleOptimizer around the AdamW, and gradients are those
of the loss times the scale, divided by it, as the LossScaleOptimizer computes them; each step's
loss scale is in the manifest.

The optimizer is minigpt's `--weight-decay W --warmup-steps N --lr-decay-steps D --min-lr L
--grad-clip G`: Keras' AdamW with `global_clipnorm`, excluding biases, LayerNorm scales and
offsets and embedding tables from the decay, on Keras' CosineDecay with a linear warm-up from
lr/(N+1) to lr over N steps (which is nanoGPT's lr·(it+1)/(N+1)), then a cosine over D - N steps
down to L.
"""

import argparse
import hashlib
import os
import sys

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt  # noqa: E402
from make_fixtures import file_name, save, write_manifest  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--n-embd", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--lr-decay-steps", type=int, default=20)
    p.add_argument("--min-lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--precision", default="float32", choices=["float32", "mixed_bfloat16", "mixed_float16"])
    p.add_argument("--overflow-steps", type=int, default=0)
    p.add_argument("--overflow-factor", type=float, default=30.0)
    args = p.parse_args()
    keras.utils.set_random_seed(args.seed)
    keras.mixed_precision.set_global_policy(args.precision)

    with open(args.data, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    chars = sorted(set(text))
    t, b = args.block_size, args.batch_size
    index = {c: i for i, c in enumerate(chars)}
    n = (args.steps + 1) * b * (t + 1)
    ids = np.array([index[c] for c in text[:n]], dtype=np.int32)
    windows = ids.reshape(args.steps + 1, b, t + 1)
    x, y = windows[0, :, :-1], windows[0, :, 1:]

    model = gpt.GPT(len(chars), args.n_embd, args.n_layer, args.n_head, args.block_size)
    model(tf.constant(x))
    # Keras starts biases (MultiHeadAttention's are [H, D]) and LayerNorm offsets at 0 and scales
    # at 1; move them, so that every weight's use is tested.
    rng = np.random.default_rng(args.seed)
    for v in model.trainable_variables:
        if v.path.split("/")[-1] in ("bias", "gamma", "beta"):
            v.assign(v.numpy() + rng.normal(0.0, 0.1, v.shape).astype(np.float32))
    for name, value in gpt.to_minigpt(model).items():
        save(args.out, f"init/{file_name(name)}.npy", value)

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    scale = keras.optimizers.LossScaleOptimizer(keras.optimizers.AdamW()).initial_scale \
        if args.precision == "mixed_float16" else 1.0
    with tf.GradientTape() as tape:
        logits = model(tf.constant(x))
        loss = loss_fn(tf.constant(y), logits)
        scaled = loss * scale
    # (The scale is a power of 2: dividing by it is exact.)
    grads = [tf.convert_to_tensor(g) / scale for g in tape.gradient(scaled, model.trainable_variables)]
    save(args.out, "x.npy", x)
    save(args.out, "y.npy", y)
    save(args.out, "logits.npy", tf.cast(logits, tf.float32).numpy())
    for name, g in gpt.to_minigpt(model, grads).items():
        save(args.out, f"grad/{file_name(name)}.npy", g)

    optimizer = make_optimizer(args)
    steps = train(model, optimizer, loss_fn, windows[1:], args)
    for name, value in steps.pop("state").items():
        save(args.out, f"step{args.steps}/{file_name(name)}", value)
    save(args.out, "steps/x.npy", windows[1:, :, :-1])
    save(args.out, "steps/y.npy", windows[1:, :, 1:])
    if args.overflow_steps:
        steps["overflow"] = overflow(model, optimizer, loss_fn, text, index, n, args)

    flags = {k: getattr(args, k) for k in ("lr", "warmup_steps", "lr_decay_steps", "min_lr", "weight_decay",
                                           "grad_clip")}
    manifest = dict(model.config, vocab=chars, data_sha256=hashlib.sha256(raw).hexdigest(),
                    loss=float(loss.numpy()), optimizer=flags, precision=args.precision, **steps,
                    tensorflow=tf.__version__, keras=keras.__version__)
    write_manifest(args.out, manifest)


def make_optimizer(args):
    """minigpt's AdamW flags as Keras' AdamW on a CosineDecay with warm-up; under mixed_float16
    inside a LossScaleOptimizer, as `Model.compile` wraps it."""
    w = args.warmup_steps
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=args.lr / (w + 1), warmup_target=args.lr, warmup_steps=w,
        decay_steps=args.lr_decay_steps - w, alpha=args.min_lr / args.lr)
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=args.weight_decay,
                                       global_clipnorm=args.grad_clip, epsilon=1e-7)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta", "embeddings"])
    if args.precision == "mixed_float16":
        return keras.optimizers.LossScaleOptimizer(optimizer)
    return optimizer


def step(model, optimizer, loss_fn, window):
    """One train step as Keras' `train_step`: the loss (scaled under a LossScaleOptimizer), its
    gradients, the optimizer's update. Returns the loss, the learning rate and loss scale the step
    ran with, and the global norm of the (unscaled) gradients."""
    x, y = tf.constant(window[:, :-1]), tf.constant(window[:, 1:])
    scaling = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True))
        scaled = optimizer.scale_loss(loss) if scaling else loss
    grads = tape.gradient(scaled, model.trainable_variables)
    inner = optimizer.inner_optimizer if scaling else optimizer
    if scaling and not optimizer.built:
        optimizer.build(model.trainable_variables)
    scale = float(optimizer.dynamic_scale) if scaling else 1.0
    rate = float(inner.learning_rate)
    norm = float(tf.linalg.global_norm(grads)) / scale
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return float(loss), rate, scale, norm


def state(model, optimizer):
    """{"<var>.npy", "<var>.m.npy", "<var>.v.npy": array}: the weights and Adam's slots."""
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    variables = model.trainable_variables
    slots = {suffix: [slot[inner._get_variable_index(v)] for v in variables]
             for suffix, slot in ((".m", inner._momentums), (".v", inner._velocities))}
    out = {f"{name}.npy": value for name, value in gpt.to_minigpt(model).items()}
    for suffix, values in slots.items():
        out.update({f"{name}{suffix}.npy": value for name, value in gpt.to_minigpt(model, values).items()})
    return out


def train(model, optimizer, loss_fn, windows, args):
    """`len(windows)` steps of AdamW on the windows' batches; each step's loss, learning rate,
    loss scale and gradient norm, and the final state."""
    losses, rates, scales, norms = [], [], [], []
    for window in windows:
        loss, rate, scale, norm = step(model, optimizer, loss_fn, window)
        losses.append(loss)
        rates.append(rate)
        scales.append(scale)
        norms.append(norm)
    return dict(step_losses=losses, step_learning_rates=rates, step_loss_scales=scales, step_grad_norms=norms,
                state=state(model, optimizer))


def overflow(model, optimizer, loss_fn, text, index, start, args):
    """The head's kernel multiplied by --overflow-factor, then --overflow-steps steps on the next
    batches: float16 gradients overflow at first, the scale halves with each such step (which is
    skipped) until they fit, and the steps go on. Written to overflow/; returns what the manifest
    keeps."""
    kernel = model.head.kernel
    kernel.assign(kernel.numpy() * args.overflow_factor)
    for name, value in gpt.to_minigpt(model).items():
        save(args.out, f"overflow/init/{file_name(name)}.npy", value)
    b, t, k = args.batch_size, args.block_size, args.overflow_steps
    ids = np.array([index[c] for c in text[start:start + k * b * (t + 1)]], dtype=np.int32)
    windows = ids.reshape(k, b, t + 1)
    save(args.out, "overflow/x.npy", windows[:, :, :-1])
    save(args.out, "overflow/y.npy", windows[:, :, 1:])
    scales, applied, losses = [], [], []
    for window in windows:
        before = int(optimizer.iterations)
        loss, _, scale, _ = step(model, optimizer, loss_fn, window)
        scales.append(scale)
        applied.append(int(optimizer.iterations) > before)
        losses.append(loss)
    for name, value in state(model, optimizer).items():
        save(args.out, f"overflow/step/{file_name(name)}", value)
    return dict(factor=args.overflow_factor, loss_scales=scales, applied=applied, losses=losses,
                final_scale=float(optimizer.dynamic_scale), iterations=int(optimizer.iterations))


if __name__ == "__main__":
    main()
