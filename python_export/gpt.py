"""The notebook's "Scaling up" model in Keras: minigpt's `--model gpt`, layer for layer.

Token and position `Embedding`s; `n_layer` pre-LayerNorm blocks of causal `MultiHeadAttention`
and a 4x `Dense` MLP with exact GELU, each added back to the residual stream; a final
`LayerNormalization`; a `Dense` head to the vocabulary. `to_minigpt` and `from_minigpt` convert
its weights to and from minigpt's variable names (minigpt keeps the query, key and value kernels
side by side in one `[C, 3C]` matrix, Keras as three `[C, H, D]` tensors).
"""

import keras
import numpy as np
import tensorflow as tf

EPSILON = 1e-5  # minigpt's LayerNorm epsilon (and nanoGPT's)


class Block(keras.layers.Layer):
    def __init__(self, n_embd, n_head, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.ln_1 = keras.layers.LayerNormalization(epsilon=EPSILON, name="ln_1")
        self.attn = keras.layers.MultiHeadAttention(n_head, n_embd // n_head, dropout=dropout, name="attn")
        self.drop_attn = keras.layers.Dropout(dropout)
        self.ln_2 = keras.layers.LayerNormalization(epsilon=EPSILON, name="ln_2")
        self.fc = keras.layers.Dense(4 * n_embd, activation=lambda x: keras.activations.gelu(x, approximate=False), name="fc")
        self.out = keras.layers.Dense(n_embd, name="out")
        self.drop_mlp = keras.layers.Dropout(dropout)

    def call(self, x, training=False):
        h = self.ln_1(x)
        x = x + self.drop_attn(self.attn(h, h, use_causal_mask=True, training=training), training=training)
        return x + self.drop_mlp(self.out(self.fc(self.ln_2(x))), training=training)


class GPT(keras.Model):
    def __init__(self, vocab_size, n_embd=128, n_layer=4, n_head=4, block_size=64, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.config = dict(vocab_size=vocab_size, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                           block_size=block_size, dropout=dropout)
        self.wte = keras.layers.Embedding(vocab_size, n_embd, name="wte")
        self.wpe = keras.layers.Embedding(block_size, n_embd, name="wpe")
        self.drop = keras.layers.Dropout(dropout)
        self.blocks = [Block(n_embd, n_head, dropout, name=f"h{i}") for i in range(n_layer)]
        self.ln_f = keras.layers.LayerNormalization(epsilon=EPSILON, name="ln_f")
        self.head = keras.layers.Dense(vocab_size, name="head")

    def call(self, tokens, training=False):
        t = tf.shape(tokens)[1]
        x = self.drop(self.wte(tokens) + self.wpe(tf.range(t)), training=training)
        for block in self.blocks:
            x = block(x, training=training)
        return self.head(self.ln_f(x))


def minigpt_variables(model):
    """[(minigpt name, [Keras variables it is made of])], in minigpt's variable order."""
    out = [("gpt/wte/embeddings", [model.wte.embeddings]), ("gpt/wpe/embeddings", [model.wpe.embeddings])]
    for i, b in enumerate(model.blocks):
        a = b.attn
        q, k, v = a._query_dense, a._key_dense, a._value_dense
        p = f"gpt/h{i}"
        out += [
            (f"{p}/ln_1/gamma", [b.ln_1.gamma]), (f"{p}/ln_1/beta", [b.ln_1.beta]),
            (f"{p}/attn/qkv/kernel", [q.kernel, k.kernel, v.kernel]),
            (f"{p}/attn/qkv/bias", [q.bias, k.bias, v.bias]),
            (f"{p}/attn/proj/kernel", [a._output_dense.kernel]), (f"{p}/attn/proj/bias", [a._output_dense.bias]),
            (f"{p}/ln_2/gamma", [b.ln_2.gamma]), (f"{p}/ln_2/beta", [b.ln_2.beta]),
            (f"{p}/mlp/fc/kernel", [b.fc.kernel]), (f"{p}/mlp/fc/bias", [b.fc.bias]),
            (f"{p}/mlp/out/kernel", [b.out.kernel]), (f"{p}/mlp/out/bias", [b.out.bias]),
        ]
    out += [("gpt/ln_f/gamma", [model.ln_f.gamma]), ("gpt/ln_f/beta", [model.ln_f.beta]),
            ("gpt/head/kernel", [model.head.kernel]), ("gpt/head/bias", [model.head.bias])]
    return out


def to_minigpt(model, values=None):
    """minigpt's weights {name: array} from the model's variables (or from `values`, arrays or
    tensors aligned with `model`'s variables, e.g. gradients)."""
    lookup = {id(v): v for v in model.variables} if values is None else \
        {id(v): g for v, g in zip(model.trainable_variables, values)}
    out = {}
    for name, parts in minigpt_variables(model):
        arrays = [np.asarray(tf.convert_to_tensor(lookup[id(p)])) for p in parts]
        if name.endswith("attn/qkv/kernel") or name.endswith("attn/qkv/bias"):
            # [C, H, D] x 3 -> [C, 3C];  [H, D] x 3 -> [3C]
            arrays = [a.reshape(a.shape[0], -1) if a.ndim == 3 else a.reshape(-1) for a in arrays]
            out[name] = np.concatenate(arrays, axis=-1)
        elif name.endswith("attn/proj/kernel"):
            out[name] = arrays[0].reshape(-1, arrays[0].shape[-1])  # [H, D, C] -> [C, C]
        else:
            out[name] = arrays[0]
    return out


def from_minigpt(model, weights):
    """Sets the model's variables from minigpt's weights {name: array}."""
    for name, parts in minigpt_variables(model):
        value = np.asarray(weights[name])
        if len(parts) == 3:
            for part, piece in zip(parts, np.split(value, 3, axis=-1)):
                part.assign(piece.reshape(part.shape))
        else:
            parts[0].assign(value.reshape(parts[0].shape))
