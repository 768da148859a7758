"""The transformer section of `make bench`, Keras' side: python_export/gpt.py's GPT run the
notebook's way (a `tf.function` train step with `tf.GradientTape` and Adam, the notebook's
`generate_text` loop with the context cropped to the block, the mean loss over every validation
window in batches of 512), timed as `examples/bench_gpt.rs` times minigpt. Prints JSON.

    python python_export/bench_gpt.py --data FILE
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from gpt import GPT  # noqa: E402

LAYERS, HEADS, WIDTH, BLOCK, BATCH = 4, 4, 128, 64, 12
EVAL_WINDOWS = 512


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args()
    text = open(args.data, encoding="utf-8").read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    ids = np.array([index[c] for c in text], dtype=np.int32)
    n = int(0.9 * len(ids))
    train, val = ids[:n], ids[n:]

    model = GPT(len(chars), WIDTH, LAYERS, HEADS, BLOCK)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = keras.optimizers.Adam()

    @tf.function
    def train_step(x, y):
        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x, training=True))
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    rng = np.random.default_rng(1337)
    starts = rng.integers(0, len(train) - BLOCK - 1, BATCH)
    x = tf.constant(np.stack([train[s:s + BLOCK] for s in starts]))
    y = tf.constant(np.stack([train[s + 1:s + BLOCK + 1] for s in starts]))
    for _ in range(args.warmup):
        train_step(x, y)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(x, y)
    loss.numpy()
    figures = {"gpt_train_steps_per_s": args.steps / (time.perf_counter() - start)}

    def generate_text(prompt, num_chars):
        input_eval = tf.expand_dims([index[c] for c in prompt], 0)
        generated = []
        for _ in range(num_chars):
            predictions = model(input_eval[:, -BLOCK:])[:, -1, :]
            predicted_id = tf.random.categorical(predictions, num_samples=1)[-1, 0].numpy()
            input_eval = tf.concat([input_eval, [[predicted_id]]], axis=1)
            generated.append(predicted_id)
        return generated

    generate_text("To be, or not to be", 10)
    for count in (200, 2000):
        start = time.perf_counter()
        generate_text("To be, or not to be", count)
        figures[f"gpt_generate_{count}_chars_per_s"] = count / (time.perf_counter() - start)

    @tf.function
    def batch_loss(x, y):
        return loss_fn(y, model(x))

    windows = len(val) - BLOCK
    start = time.perf_counter()
    total = 0.0
    for first in range(0, windows, EVAL_WINDOWS):
        rows = np.arange(first, min(first + EVAL_WINDOWS, windows))
        xb = val[rows[:, None] + np.arange(BLOCK)]
        yb = val[rows[:, None] + np.arange(1, BLOCK + 1)]
        total += float(batch_loss(xb, yb)) * len(rows)
    figures["gpt_eval_full_s"] = time.perf_counter() - start
    figures["gpt_val_loss"] = total / windows
    json.dump(figures, sys.stdout)
    print()


if __name__ == "__main__":
    main()
