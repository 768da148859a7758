"""The notebook minigpt ports, as a runnable script: the reference for parity and benchmarks.

The code is the notebook's (same names, same statements); only what a script needs is added:
the text comes from a path instead of the datasets hub, and flags set the seed, the step count and
the shuffle. Everything else (model, loss, optimizer, train_step, generate_text) is unchanged, and
`make_fixtures.py` and the benchmark import it from here.

    python python_export/notebook.py --data ../shared/data/tinyshakespeare.txt
    python python_export/notebook.py --data FILE --max-steps 2000 --seed 1 --shuffle none
"""

import argparse
import time

import numpy as np
import tensorflow as tf
from tensorflow.keras import layers

# ## 2. Load and Prepare Dataset ------------------------------------------------------------
# The vocabulary is module state, as in the notebook; `prepare(text)` sets it.
text = None
chars = vocab_size = char2idx = idx2char = None
encoded_text = train_data = val_data = None


def prepare(corpus):
    global text, chars, vocab_size, char2idx, idx2char, encoded_text, train_data, val_data
    text = corpus
    chars = sorted(list(set(text)))
    vocab_size = len(chars)
    char2idx = {ch: i for i, ch in enumerate(chars)}
    idx2char = {i: ch for i, ch in enumerate(chars)}
    encoded_text = np.array(encode(text), dtype=np.int32)
    split_idx = int(0.9 * len(encoded_text))
    train_data = encoded_text[:split_idx]
    val_data = encoded_text[split_idx:]


def encode(s): return [char2idx[c] for c in s]
def decode(l): return ''.join([idx2char[i] for i in l])


# ## 3. Create Dataset Batches ---------------------------------------------------------------
block_size = 64
batch_size = 32


def make_dataset(data, shuffle=10000):
    """The notebook's pipeline; `shuffle=None` leaves out the shuffle (windows in text order)."""
    sequences = tf.data.Dataset.from_tensor_slices(data)
    sequences = sequences.window(block_size + 1, shift=1, drop_remainder=True)
    sequences = sequences.flat_map(lambda window: window.batch(block_size + 1))
    sequences = sequences.map(lambda seq: (seq[:-1], seq[1:]))
    if shuffle:
        sequences = sequences.shuffle(shuffle)
    return sequences.batch(batch_size, drop_remainder=True)


# ## 4. Define a Simple GPT-Style Model ------------------------------------------------------
class MiniGPT(tf.keras.Model):
    def __init__(self, vocab_size, embedding_dim=128):
        super().__init__()
        self.embedding = layers.Embedding(vocab_size, embedding_dim)
        self.dense = layers.Dense(vocab_size)

    def call(self, x):
        x = self.embedding(x)  # [batch, seq, embedding]
        return self.dense(x)   # [batch, seq, vocab_size]


model = loss_fn = optimizer = None


def instantiate(embedding_dim=128):
    """The notebook's "Instantiate" cell."""
    global model, loss_fn, optimizer
    model = MiniGPT(vocab_size, embedding_dim)
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    optimizer = tf.keras.optimizers.Adam()


# ## 5. Train the Model ----------------------------------------------------------------------
@tf.function
def train_step(x, y):
    with tf.GradientTape() as tape:
        logits = model(x)
        loss = loss_fn(y, logits)
    grads = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    return loss


def train(dataset, epochs=3, max_steps=None, log_every=100, on_log=None):
    """The notebook's loop, stopping after `max_steps` steps in all if given.

    Returns the losses printed (one per `log_every` steps of each epoch) as (step, loss) pairs,
    `step` counted over the whole run."""
    logged = []
    done = 0
    for epoch in range(epochs):
        print(f"\nEpoch {epoch+1}")
        for step, (x_batch, y_batch) in enumerate(dataset):
            if max_steps is not None and done >= max_steps:
                return logged
            loss = train_step(x_batch, y_batch)
            if step % log_every == 0:
                print(f"Step {step}: Loss {loss.numpy():.4f}")
                logged.append((done, float(loss.numpy())))
                if on_log:
                    on_log(done, loss)
            done += 1
    return logged


# ## 6. Generate Text ------------------------------------------------------------------------
def generate_text(start_string, num_chars=100):
    input_eval = tf.expand_dims(encode(start_string), 0)
    generated = []

    for _ in range(num_chars):
        predictions = model(input_eval)
        predictions = predictions[:, -1, :]
        predicted_id = tf.random.categorical(predictions, num_samples=1)[-1, 0].numpy()

        input_eval = tf.concat([input_eval, [[predicted_id]]], axis=1)
        generated.append(predicted_id)

    return start_string + decode(generated)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the corpus, a UTF-8 text file")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all")
    p.add_argument("--seed", type=int, default=None, help="tf.keras.utils.set_random_seed(SEED)")
    p.add_argument("--shuffle", choices=["buffer", "none"], default="buffer",
                   help="buffer: the notebook's shuffle(10000); none: windows in text order")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--prompt", default="To be, or not to be")
    p.add_argument("--chars", type=int, default=200, help="characters to generate after training")
    args = p.parse_args()

    if args.seed is not None:
        tf.keras.utils.set_random_seed(args.seed)
    with open(args.data, encoding="utf-8") as f:
        prepare(f.read())
    print("Num GPUs Available: ", len(tf.config.list_physical_devices('GPU')))
    train_dataset = make_dataset(train_data, 10000 if args.shuffle == "buffer" else None)
    instantiate()
    start = time.perf_counter()
    train(train_dataset, args.epochs, args.max_steps, args.log_every)
    print(f"\ntraining took {time.perf_counter() - start:.1f} s")
    print(generate_text(args.prompt, args.chars))


if __name__ == "__main__":
    main()
