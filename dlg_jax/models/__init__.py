"""Models by name. Nothing else in dlg_jax builds a network: it asks `get_model(name, num_classes, input_shape)`.

An entry is a function `(num_classes, input_shape, state=None) -> Model`; a new model is one module with such a
function and one line in `MODELS`. A `Model` says what its input is (`"image"`: NHWC in [0, 1]; `"tokens"`: token
ids or input embeddings, dlg_jax.models.text), how to draw its weights from a seed, how to apply them and what
the client's training loss is. Its `state` is what it holds besides the weights the gradient is taken of
(BatchNorm's running statistics: a fresh model's, or a checkpoint's, dlg_jax.models.checkpoint).

The image models: `lenet` (the paper's), `lenet-relu`, `convnet` (inversefed's, width 64), `resnet20`, `resnet18`
(dlg_jax.models.vision). A `-train` name is the same weights with BatchNorm in train mode: the client's gradient
is taken through its own batch's statistics, and the attacker, who knows the architecture, the weights, the
running statistics and the mode (an honest-but-curious server that sent the model), normalises its dummy with
the dummy's statistics; it does not know the client's.
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
    state: Any = None  # what `apply` reads besides params: BatchNorm's running statistics ({} when none)
    train_apply: Callable | None = None  # (params, state, inputs) -> (logits, new state): a training step's forward


def lenet_model(num_classes: int, input_shape: Sequence[int], state=None) -> Model:
    """The DLG paper's LeNet: sigmoid convolutions, every weight U(-0.5, 0.5). It has no state."""
    module = LeNet(num_classes=num_classes)
    shape = tuple(input_shape)

    def init(seed: int, dtype=jnp.float32) -> Params:
        return jax.tree.map(lambda p: jnp.asarray(p, dtype), init_params(module, seed, shape))

    def apply(params, x):
        return module.apply({"params": params}, x)

    return Model("lenet", "image", shape, num_classes, init, apply, cross_entropy, state={},
                 train_apply=lambda params, state, x: (apply(params, x), state))


def flax_image_model(name: str, build: Callable[[int, bool], Any], train: bool = False):
    """A registry entry for a Flax image module `build(num_classes, train)` that may hold BatchNorm statistics;
    `train`: BatchNorm normalises with the batch's statistics when the client takes its gradient."""

    def make(num_classes: int, input_shape: Sequence[int], state=None) -> Model:
        shape = tuple(input_shape)
        module, trainer = build(num_classes, train), build(num_classes, True)
        example = jnp.zeros((1, *shape), jnp.float32)
        try:  # an input the model cannot take (too small for its pooling, say) fails here, not when compiled
            fresh = jax.eval_shape(module.init, jax.random.key(0), example)
        except Exception as error:
            raise ValueError(f"{name} cannot take inputs of shape {shape}: {str(error).splitlines()[0]}") from None
        if state is None:  # a fresh model's running statistics (mean 0, variance 1): known without drawing
            state = jax.jit(module.init)(jax.random.key(0), example).get("batch_stats", {})
        stats = {"batch_stats": state} if fresh.get("batch_stats") else {}

        def init(seed: int, dtype=jnp.float32) -> Params:
            params = jax.jit(module.init)(jax.random.key(seed), example)["params"]  # drawn in float32 whatever the dtype
            return jax.tree.map(lambda p: jnp.asarray(p, dtype), params)

        def variables(params, x):
            return {"params": params, **jax.tree.map(lambda v: jnp.asarray(v, x.dtype), stats)}

        def apply(params, x):
            if train and stats:
                return module.apply(variables(params, x), x, mutable=["batch_stats"])[0]
            return module.apply(variables(params, x), x)

        def train_apply(params, running, x):
            if not stats:
                return trainer.apply({"params": params}, x), running
            logits, updates = trainer.apply({"params": params, "batch_stats": running}, x, mutable=["batch_stats"])
            return logits, updates["batch_stats"]

        return Model(name, "image", shape, num_classes, init, apply, cross_entropy, state=state, train_apply=train_apply)

    return make


def _vision(kind: str):
    from dlg_jax.models import vision

    builds = {
        "lenet-relu": lambda classes, train: LeNet(num_classes=classes, activation=jax.nn.relu),
        "convnet": lambda classes, train: vision.ConvNet(num_classes=classes, width=64, train=train),
        "resnet20": lambda classes, train: vision.ResNet((3, 3, 3), 16, classes, train),
        "resnet18": lambda classes, train: vision.ResNet((2, 2, 2, 2), 64, classes, train),
    }
    return builds[kind]


def text_model(name: str, causal: bool, tied: bool) -> Callable[[int, Sequence[int]], Model]:
    """A tiny random-init language model (dlg_jax.models.text): `num_classes` is the vocabulary size and
    `input_shape` is `(max_len,)`; it reads token ids or input embeddings (N, L, D), L <= max_len."""
    from dlg_jax.models.text import TextTransformer, init_text_params, text_apply, weighted_cross_entropy

    def make(num_classes: int, input_shape: Sequence[int], state=None) -> Model:
        module = TextTransformer(vocab=num_classes, max_len=int(input_shape[0]), causal=causal, tied=tied)
        return Model(name, "tokens", (module.max_len,), num_classes, lambda seed, dtype=jnp.float32: init_text_params(
            module, seed, dtype), text_apply(module), weighted_cross_entropy, module)

    return make


MODELS: dict[str, Callable[[int, Sequence[int]], Model]] = {
    "lenet": lenet_model,
    "lenet-relu": flax_image_model("lenet-relu", _vision("lenet-relu")),
    # ReLU + BatchNorm (dlg_jax.models.vision); -train: BatchNorm on the batch's own statistics.
    **{name + mode: flax_image_model(name + mode, _vision(name), train=mode == "-train")
       for name in ("convnet", "resnet20", "resnet18") for mode in ("", "-train")},
    # Text (input "tokens"): BERT-like masked-LM encoder and GPT-like causal decoder, 2 layers x 64, post-LN.
    "bert": text_model("bert", causal=False, tied=False),
    "bert-tied": text_model("bert-tied", causal=False, tied=True),
    "gpt": text_model("gpt", causal=True, tied=False),
    "gpt-tied": text_model("gpt-tied", causal=True, tied=True),
}
TEXT_MODELS = ("bert", "bert-tied", "gpt", "gpt-tied")
IMAGE_MODELS = tuple(name for name in MODELS if name not in TEXT_MODELS)


def get_model(name: str, num_classes: int, input_shape: Sequence[int], state=None) -> Model:
    """The model `name` for `num_classes` and one example's `input_shape`; `state`: its running statistics
    (a checkpoint's), else a fresh model's."""
    try:
        make = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}: choose from {', '.join(MODELS)}") from None
    if state is None:
        return make(num_classes, input_shape)
    return make(num_classes, input_shape, state=state)
