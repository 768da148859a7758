"""Writes what the notebook computes, for minigpt's parity tests (`tests/parity.rs`, `make parity`).

Everything comes from the notebook's own code in `notebook.py` (`MiniGPT`, `loss_fn`, `optimizer`,
`train_step`, `make_dataset`, `generate_text`), run by the pinned TensorFlow. Arrays are `.npy`
files (float32 / int32, little-endian); `manifest.json` holds the scalars and the vocabulary.

    python python_export/make_fixtures.py --data ../shared/data/tinyshakespeare.txt --out DIR

Layout of DIR:
  manifest.json                 seed, sizes, vocabulary, losses, generated text, digests
  init/<var>.npy                initial weights (<var>: embedding.embeddings, dense.kernel, dense.bias)
  batches/x.npy, y.npy          [STEPS, 32, 64] int32: the first STEPS batches of the notebook's
                                shuffled training pipeline (seeded), fed in this order
  batch0/logits.npy             [32, 64, vocab] on batches[0] from the initial weights
  batch0/grad/<var>.npy         d loss / d var on batches[0] (the embedding's IndexedSlices made dense)
  step1/, step100/              after 1 and STEPS train_step calls: <var>.npy, <var>.m.npy, <var>.v.npy
  none/x.npy, y.npy             the first 200 batches of the pipeline without shuffle (train split);
                                the manifest's `none_val` has the count and SHA-256 of all the
                                validation split's batches (x then y of each, int32 little-endian)
  shuffled/x.npy, y.npy         one shuffled epoch of the pipeline over the first 20000 characters
                                of the validation split (19936 windows: 623 whole batches)
  curve/losses.npy              [20] loss at steps 0, 100, ..., 1900 of `train` over 2000 steps,
                                from init/, windows in text order (`make_dataset(train_data, None)`)

Sampling seeds: `tf.random.categorical` without an op seed draws a fresh op seed per call in eager
mode (from `random.Random(global_seed)`), so every character comes from a newly seeded kernel. With an
op seed, eager mode keeps one kernel per (global seed, op seed) whose random stream advances from call
to call, exactly as one `Multinomial` op does in a graph. `generate_text` is therefore run under
`tf.random.set_seed(SEED)` with `tf.random.categorical` given `seed=1`, the attributes of minigpt's
sampler (`Multinomial` seed = SEED, seed2 = 1): the same stream, so the same text is expected.
"""

import argparse
import contextlib
import functools
import hashlib
import json
import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import notebook as nb  # noqa: E402

VARS = ["embedding/embeddings", "dense/kernel", "dense/bias"]


def file_name(var):
    return var.replace("/", ".")


def save(out, rel, array):
    path = os.path.join(out, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, np.ascontiguousarray(array))


def write_manifest(out, manifest):
    """`out/manifest.json`, written under a temporary name and renamed into place."""
    tmp = os.path.join(out, "manifest.json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    os.replace(tmp, os.path.join(out, "manifest.json"))


def weights():
    m = nb.model
    return dict(zip(VARS, [m.embedding.embeddings, m.dense.kernel, m.dense.bias]))


def save_state(out, folder):
    opt = nb.optimizer
    for name, var in weights().items():
        i = opt._get_variable_index(var)
        save(out, f"{folder}/{file_name(name)}.npy", var.numpy())
        save(out, f"{folder}/{file_name(name)}.m.npy", opt._momentums[i].numpy())
        save(out, f"{folder}/{file_name(name)}.v.npy", opt._velocities[i].numpy())


def take(dataset, n=None):
    xs, ys = [], []
    for x, y in dataset if n is None else dataset.take(n):
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.stack(xs), np.stack(ys)


@contextlib.contextmanager
def categorical_op_seed(seed):
    """Gives `tf.random.categorical` an op seed while inside (see the module's docstring)."""
    original = tf.random.categorical
    tf.random.categorical = functools.partial(original, seed=seed)
    try:
        yield
    finally:
        tf.random.categorical = original


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--curve-steps", type=int, default=2000)
    p.add_argument("--prompt", default="To be, or not to be")
    p.add_argument("--chars", type=int, default=200)
    args = p.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)

    tf.keras.utils.set_random_seed(args.seed)
    with open(args.data, "rb") as f:
        raw = f.read()
    nb.prepare(raw.decode("utf-8"))
    manifest = {
        "seed": args.seed,
        "data_sha256": hashlib.sha256(raw).hexdigest(),
        "block_size": nb.block_size,
        "batch_size": nb.batch_size,
        "embedding_dim": 128,
        "vocab": nb.chars,
        "steps": args.steps,
        "tensorflow": tf.__version__,
    }

    # The given batches: the notebook's shuffled pipeline, seeded by the global seed.
    bx, by = take(nb.make_dataset(nb.train_data), args.steps)
    save(out, "batches/x.npy", bx)
    save(out, "batches/y.npy", by)

    # Initial weights, logits, loss and gradients on batch 0.
    nb.instantiate()
    x0, y0 = tf.constant(bx[0]), tf.constant(by[0])
    nb.model(x0)
    init = {name: var.numpy() for name, var in weights().items()}
    for name, value in init.items():
        save(out, f"init/{file_name(name)}.npy", value)
    with tf.GradientTape() as tape:
        logits = nb.model(x0)
        loss = nb.loss_fn(y0, logits)
    grads = tape.gradient(loss, nb.model.trainable_variables)
    save(out, "batch0/logits.npy", logits.numpy())
    manifest["batch0_loss"] = float(loss.numpy())
    for name, g in zip(VARS, grads):
        save(out, f"batch0/grad/{file_name(name)}.npy", tf.convert_to_tensor(g).numpy())

    # Adam steps with the notebook's train_step.
    losses = []
    for i in range(args.steps):
        losses.append(float(nb.train_step(tf.constant(bx[i]), tf.constant(by[i])).numpy()))
        if i == 0:
            save_state(out, "step1")
    save_state(out, f"step{args.steps}")
    manifest["step_losses"] = losses

    # Generation from the trained weights, with the seed handling described above.
    gen_seed = args.seed + 1
    tf.random.set_seed(gen_seed)
    with categorical_op_seed(1):
        text = nb.generate_text(args.prompt, args.chars)
    manifest["generate"] = {"seed": gen_seed, "prompt": args.prompt, "chars": args.chars, "text": text}

    # The pipeline itself: in text order, and one shuffled epoch.
    nx, ny = take(nb.make_dataset(nb.train_data, None), 200)
    save(out, "none/x.npy", nx)
    save(out, "none/y.npy", ny)
    digest, count = hashlib.sha256(), 0
    for x, y in nb.make_dataset(nb.val_data, None):
        digest.update(x.numpy().astype("<i4").tobytes())
        digest.update(y.numpy().astype("<i4").tobytes())
        count += 1
    manifest["none_val"] = {"batches": count, "sha256": digest.hexdigest()}
    sx, sy = take(nb.make_dataset(nb.val_data[:20000]))
    save(out, "shuffled/x.npy", sx)
    save(out, "shuffled/y.npy", sy)

    # The loss curve: the notebook's training loop from the same initial weights, fresh optimizer.
    nb.instantiate()
    nb.model(x0)
    nb.model.set_weights([init[name] for name in VARS])
    nb.train_step = tf.function(nb.train_step.python_function)  # traced anew for the new model
    logged = nb.train(nb.make_dataset(nb.train_data, None), epochs=1, max_steps=args.curve_steps,
                      log_every=100)
    save(out, "curve/losses.npy", np.array([loss for _, loss in logged], dtype=np.float32))
    manifest["curve_steps"] = args.curve_steps

    write_manifest(out, manifest)


if __name__ == "__main__":
    main()
