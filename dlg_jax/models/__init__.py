"""Models by name. Nothing else in dlg_jax builds a network: it asks `get_model(name, num_classes, input_shape)`.

An entry is a function `(num_classes, input_shape) -> Model`; a new model is one module with such a function
and one line in `MODELS`. A `Model` says what its input is (`"image"`: NHWC in [0, 1]; `"tokens"`: token ids
or input embeddings, dlg_jax.models.text), how to draw its weights
from a seed, how to apply them and what the client's training loss is.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from dlg_jax.models.lenet import KERNEL, Conv, LeNet, conv2d, hidden_size, init_params, uniform_init  # noqa: F401

Params = Any


def cross_entropy(logits: jax.Array, soft_labels: jax.Array) -> jax.Array:
    """Soft-label cross entropy  mean_n sum_c -t_nc log softmax(z_n)_c  (the DLG reference's loss)."""
    return jnp.mean(jnp.sum(-soft_labels * jax.nn.log_softmax(logits), axis=-1))


class Model(NamedTuple):
    name: str
    input: str  # what the model reads: "image" (NHWC in [0, 1])
    input_shape: tuple  # one example's shape, e.g. (32, 32, 3)
    num_classes: int
    init: Callable[[int, Any], Params]  # (seed, dtype) -> params
    apply: Callable[[Params, jax.Array], jax.Array]  # (params, inputs) -> logits
    loss: Callable[[jax.Array, jax.Array], jax.Array]  # (logits, soft labels) -> the client's training loss
    text: Any = None  # "tokens" models: their TextTransformer (vocab, max_len, width, causal, tied); else None


def lenet_model(num_classes: int, input_shape: Sequence[int]) -> Model:
    """The DLG paper's LeNet: sigmoid convolutions, every weight U(-0.5, 0.5)."""
    module = LeNet(num_classes=num_classes)
    shape = tuple(input_shape)

    def init(seed: int, dtype=jnp.float32) -> Params:
        return jax.tree.map(lambda p: jnp.asarray(p, dtype), init_params(module, seed, shape))

    return Model("lenet", "image", shape, num_classes, init, lambda p, x: module.apply({"params": p}, x), cross_entropy)


def text_model(name: str, causal: bool, tied: bool) -> Callable[[int, Sequence[int]], Model]:
    """A tiny random-init language model (dlg_jax.models.text): `num_classes` is the vocabulary size and
    `input_shape` is `(max_len,)`; it reads token ids or input embeddings (N, L, D), L <= max_len."""
    from dlg_jax.models.text import TextTransformer, init_text_params, text_apply, weighted_cross_entropy

    def make(num_classes: int, input_shape: Sequence[int]) -> Model:
        module = TextTransformer(vocab=num_classes, max_len=int(input_shape[0]), causal=causal, tied=tied)
        return Model(name, "tokens", (module.max_len,), num_classes, lambda seed, dtype=jnp.float32: init_text_params(
            module, seed, dtype), text_apply(module), weighted_cross_entropy, module)

    return make


MODELS: dict[str, Callable[[int, Sequence[int]], Model]] = {
    "lenet": lenet_model,
    # Text (input "tokens"): BERT-like masked-LM encoder and GPT-like causal decoder, 2 layers x 64, post-LN.
    "bert": text_model("bert", causal=False, tied=False),
    "bert-tied": text_model("bert-tied", causal=False, tied=True),
    "gpt": text_model("gpt", causal=True, tied=False),
    "gpt-tied": text_model("gpt-tied", causal=True, tied=True),
}
TEXT_MODELS = tuple(name for name in MODELS if name != "lenet")


def get_model(name: str, num_classes: int, input_shape: Sequence[int]) -> Model:
    try:
        make = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODELS)}") from None
    return make(num_classes, input_shape)
