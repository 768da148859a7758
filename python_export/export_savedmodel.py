"""Trains the notebook's Keras `MiniGPT` and exports it as a SavedModel minigpt reads.

    python python_export/export_savedmodel.py --data FILE --steps 200 --out DIR [--keras-export DIR2]

DIR follows minigpt's SavedModel convention (DESIGN.md §4): signature `serving_default`
(`tokens` int32 [batch, seq] → `logits` float32 [batch, seq, vocab]), signature `train_step`
(`x`, `y` → `loss`, one step of the notebook's `train_step`), `assets.extra/vocab.json` (the
vocabulary, a JSON array of one-character strings in id order) and `assets.extra/minigpt.json`
(the model's configuration).

DIR2, if given, is Keras 3's own `model.export()` of the same model (given an int32
`[batch, seq]` input signature): signatures `serve` and `serving_default`, one input, output
`output_0`, no vocabulary (minigpt takes it from `--vocab`).
"""

import argparse
import json
import os
import sys

import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import notebook as nb  # noqa: E402


# The convention's two signatures (DESIGN.md §4): `tokens` → `logits`; `x`, `y` → `loss`.
TOKENS = [tf.TensorSpec([None, None], tf.int32, name="tokens")]
X_Y = [tf.TensorSpec([None, None], tf.int32, name="x"), tf.TensorSpec([None, None], tf.int32, name="y")]


class Exported(tf.Module):
    """The trained model and optimizer, with the convention's two signatures."""

    def __init__(self, model, optimizer):
        super().__init__()
        self.model = model
        self.optimizer = optimizer
        # The tf.Variables under Keras 3's variables, tracked as such, so that the variables the
        # signatures capture are the ones the SavedModel's restore op writes: without this, a
        # loader that follows the MetaGraph (TensorFlow's C API) finds them uninitialized.
        self.tf_variables = [v.value for v in model.variables + optimizer.variables]

    @tf.function(input_signature=TOKENS)
    def serve(self, tokens):
        return {"logits": self.model(tokens)}

    @tf.function(input_signature=X_Y)
    def step(self, x, y):
        return {"loss": nb.train_step(x, y)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keras-export", help="also write Keras' own model.export() here")
    args = p.parse_args()

    tf.keras.utils.set_random_seed(args.seed)
    with open(args.data, encoding="utf-8") as f:
        nb.prepare(f.read())
    nb.instantiate()
    nb.train(nb.make_dataset(nb.train_data), epochs=1, max_steps=args.steps)

    module = Exported(nb.model, nb.optimizer)
    tf.saved_model.save(module, args.out, signatures={"serving_default": module.serve, "train_step": module.step})
    extra = os.path.join(args.out, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    with open(os.path.join(extra, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(nb.chars, f, ensure_ascii=False)
    with open(os.path.join(extra, "minigpt.json"), "w", encoding="utf-8") as f:
        json.dump({"model": {"arch": "bigram", "vocab_size": nb.vocab_size, "n_embd": 128},
                   "train": {"block_size": nb.block_size, "batch_size": nb.batch_size},
                   "steps_done": args.steps, "exported_by": "python_export/export_savedmodel.py"}, f, indent=1)
    if args.keras_export:
        # The notebook's model has no Input layer: without a signature Keras would export a
        # float32 input of the shape it was built with.
        nb.model.export(args.keras_export, input_signature=TOKENS)


if __name__ == "__main__":
    main()
