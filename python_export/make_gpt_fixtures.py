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
    args = p.parse_args()
    keras.utils.set_random_seed(args.seed)

    with open(args.data, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    chars = sorted(set(text))
    t, b = args.block_size, args.batch_size
    ids = np.array([chars.index(c) for c in text[: b * (t + 1)]], dtype=np.int32)
    windows = ids.reshape(b, t + 1)
    x, y = windows[:, :-1], windows[:, 1:]

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
    with tf.GradientTape() as tape:
        logits = model(tf.constant(x))
        loss = loss_fn(tf.constant(y), logits)
    grads = tape.gradient(loss, model.trainable_variables)
    save(args.out, "x.npy", x)
    save(args.out, "y.npy", y)
    save(args.out, "logits.npy", logits.numpy())
    for name, g in gpt.to_minigpt(model, grads).items():
        save(args.out, f"grad/{file_name(name)}.npy", g)

    manifest = dict(model.config, vocab=chars, data_sha256=hashlib.sha256(raw).hexdigest(),
                    loss=float(loss.numpy()), tensorflow=tf.__version__, keras=keras.__version__)
    write_manifest(args.out, manifest)


if __name__ == "__main__":
    main()
