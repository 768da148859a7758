"""Saves models inside a plain `tf.Module` with `tf.saved_model.save`, the way many tutorials do,
for minigpt's SavedModel-loading tests; prints Python's validation loss of each as JSON.

    python python_export/export_module.py --data FILE --kind keras|gpt|variables --out DIR
        [--steps N] [--drop-key-of NAME]

- `keras`: the notebook's Keras 3 `MiniGPT`, trained N steps, with signatures `serving_default`
  (`tokens` → `logits`) and `train_step` (`x`, `y` → `loss`). Unlike export_savedmodel.py it does
  NOT track the Keras variables' `.value` tf.Variables, so TensorFlow's C++ loader leaves the
  variables its signatures read uninitialized (Python's `tf.saved_model.load` restores them through
  the object graph).
- `gpt`: the Keras transformer of gpt.py (2 blocks, 2 heads, width 16, 32 positions), likewise.
- `variables`: the notebook's model written with plain `tf.Variable`s (embedding, kernel, bias).

Each gets `assets.extra/vocab.json` and `assets.extra/minigpt.json` (the model's configuration).
`--drop-key-of NAME` rewrites the variables checkpoint without the value of the variable whose
checkpoint key contains NAME (for the error a missing value must give).

Printed: {"val_loss": mean cross-entropy over every validation window of the notebook's split,
"block_size": the window}.
"""

import argparse
import json
import os
import sys

import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpt as keras_gpt  # noqa: E402
import notebook as nb  # noqa: E402
from export_savedmodel import TOKENS, X_Y  # noqa: E402

GPT_SHAPE = dict(n_embd=16, n_layer=2, n_head=2, block_size=32)


class Module(tf.Module):
    """A model and its loss, with the convention's two signatures; nothing else tracked."""

    def __init__(self, model, loss_fn, optimizer):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.optimizer = optimizer

    @tf.function(input_signature=TOKENS)
    def serve(self, tokens):
        return {"logits": self.model(tokens)}

    @tf.function(input_signature=X_Y)
    def step(self, x, y):
        with tf.GradientTape() as tape:
            loss = self.loss_fn(y, self.model(x))
        variables = self.model.trainable_variables
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return {"loss": loss}


class Variables(tf.Module):
    """The notebook's model with plain tf.Variables."""

    def __init__(self, vocab_size, embedding_dim=128):
        super().__init__()
        init = tf.random.stateless_uniform
        self.embeddings = tf.Variable(init([vocab_size, embedding_dim], [1, 2], -0.05, 0.05), name="embeddings")
        self.kernel = tf.Variable(init([embedding_dim, vocab_size], [3, 4], -0.2, 0.2), name="kernel")
        self.bias = tf.Variable(init([vocab_size], [5, 6], -0.1, 0.1), name="bias")

    def __call__(self, tokens):
        x = tf.gather(self.embeddings, tokens)
        return tf.einsum("btc,cv->btv", x, self.kernel) + self.bias

    @tf.function(input_signature=TOKENS)
    def serve(self, tokens):
        return {"logits": self(tokens)}


def val_loss(logits_of, block_size):
    """Mean cross-entropy over every window of the validation split."""
    data = np.asarray(nb.val_data, np.int32)
    n = len(data) - block_size
    total = 0.0
    for start in range(0, n, 512):
        rows = range(start, min(start + 512, n))
        x = np.stack([data[i:i + block_size] for i in rows])
        y = np.stack([data[i + 1:i + block_size + 1] for i in rows])
        xent = tf.keras.losses.sparse_categorical_crossentropy(y, logits_of(tf.constant(x)), from_logits=True)
        total += float(tf.reduce_sum(xent)) / block_size
    return total / n


def drop_key(directory, name):
    """Rewrites the variables checkpoint without the value whose key contains `name`."""
    prefix = os.path.join(directory, "variables", "variables")
    reader = tf.train.load_checkpoint(prefix)
    keys = sorted(k for k in reader.get_variable_to_shape_map() if name not in k)
    assert len(keys) < len(reader.get_variable_to_shape_map()), f"no key contains {name}"
    tensors = [reader.get_tensor(k) for k in keys]
    for suffix in (".index", ".data-00000-of-00001"):
        os.remove(prefix + suffix)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=keys, shape_and_slices=[""] * len(keys), tensors=tensors)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--kind", choices=["keras", "gpt", "variables"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--drop-key-of")
    args = p.parse_args()

    tf.keras.utils.set_random_seed(args.seed)
    with open(args.data, encoding="utf-8") as f:
        nb.prepare(f.read())
    block_size = nb.block_size
    if args.kind == "variables":
        module = Variables(nb.vocab_size)
        signatures = {"serving_default": module.serve}
        model_config = {"arch": "bigram", "vocab_size": nb.vocab_size, "n_embd": 128}
        logits_of = module
    else:
        if args.kind == "keras":
            nb.instantiate()
            model = nb.model
            model_config = {"arch": "bigram", "vocab_size": nb.vocab_size, "n_embd": 128}
        else:
            model = keras_gpt.GPT(nb.vocab_size, **GPT_SHAPE)
            block_size = GPT_SHAPE["block_size"]
            model_config = {"arch": "gpt", "vocab_size": nb.vocab_size, **GPT_SHAPE, "dropout": 0.0}
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        module = Module(model, loss_fn, tf.keras.optimizers.Adam())
        data = np.asarray(nb.train_data, np.int32)
        rng = np.random.default_rng(args.seed)
        for _ in range(args.steps):
            starts = rng.integers(0, len(data) - block_size - 1, 16)
            x = np.stack([data[i:i + block_size] for i in starts])
            y = np.stack([data[i + 1:i + block_size + 1] for i in starts])
            module.step(tf.constant(x), tf.constant(y))
        signatures = {"serving_default": module.serve, "train_step": module.step}
        logits_of = model
    tf.saved_model.save(module, args.out, signatures=signatures)
    extra = os.path.join(args.out, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(nb.chars, f, ensure_ascii=False)
    with open(os.path.join(extra, "minigpt.json"), "w", encoding="utf-8") as f:
        json.dump({"model": model_config, "train": {"block_size": block_size, "batch_size": 16},
                   "steps_done": args.steps, "exported_by": "python_export/export_module.py"}, f, indent=1)
    if args.drop_key_of:
        drop_key(args.out, args.drop_key_of)
    print(json.dumps({"val_loss": val_loss(logits_of, block_size), "block_size": block_size}))


if __name__ == "__main__":
    main()
