"""Train any image model of the registry for some steps and save a checkpoint the attacks can load:

    python -m dlg_jax.train --model resnet20 --data ../shared/data/cifar10_train_0-199.npz --indices 8:200 \\
        --steps 500 --out runs/resnet20.npz
    python -m dlg_jax.run --model resnet20 --checkpoint runs/resnet20.npz --data ... --index 0

No weights can be downloaded here, so "trained" means trained by this script: SGD with Nesterov momentum 0.9,
weight decay 5e-4 and a cosine learning rate (the CIFAR ResNet recipe), the gradient clipped to norm
`--clip-norm` (without it the paper's U(-0.5, 0.5) weights with ReLU blow up at the first step and every ReLU
dies: lenet-relu at lr 0.05, 0.01 and 0.002 ended at 13% train accuracy on CIFAR-10, predicting one class, its
gradient zero; clipped at 1, 27% after 300 steps and alive), random crops (padding 4) and flips,
BatchNorm's running statistics updated as in training. The checkpoint is written atomically every
`--save-every` steps and at the end, with the step and the training loss and accuracy in its info; an
interrupted run keeps its last checkpoint.
"""

from __future__ import annotations

import sys
import time

from dlg_jax.cli.common import ArgumentParser, fail, positive_float, positive_int, seed
from dlg_jax.errors import UsageError


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="dlg_jax.train", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", help="image model by name (dlg_jax.models; default resnet20)")
    p.add_argument("--data", required=True, help="npz with images (uint8 NHWC/NHW) and labels")
    p.add_argument("--indices", default=None, help="the training images: START:STOP or 3,7,9 (default all)")
    p.add_argument("--steps", type=positive_int, default=500, help="SGD steps (default 500)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="images per step (default 32)")
    p.add_argument("--learning-rate", type=positive_float, default=0.05, help="peak learning rate (default 0.05)")
    p.add_argument("--clip-norm", type=positive_float, default=1.0,
                   help="clip each step's gradient to this global norm (default 1)")
    p.add_argument("--model-seed", type=seed, default=1234, help="seed of the initial weights (default 1234)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the batches and augmentation (default 0)")
    p.add_argument("--save-every", type=positive_int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--out", required=True, help="the checkpoint file to write (.npz)")
    return p


def train(model, params, images, labels, steps: int, batch_size: int, learning_rate: float, seed: int,
          on_step=None, clip_norm: float = 1.0):
    """SGD on the model's loss; returns (params, state, history). `images` float NHWC in [0, 1], `labels` int.
    `on_step(step, params, state, loss, accuracy)` after every step (progress, checkpoints)."""
    import jax
    import jax.numpy as jnp
    import optax

    schedule = optax.cosine_decay_schedule(learning_rate, steps)
    optimizer = optax.chain(optax.clip_by_global_norm(clip_norm), optax.add_decayed_weights(5e-4),
                            optax.sgd(schedule, momentum=0.9, nesterov=True))
    classes = model.num_classes
    images, labels = jnp.asarray(images, jnp.float32), jnp.asarray(labels)

    def augment(key, batch):
        if batch.shape[1] < 8:  # nothing to crop on tiny inputs
            return batch
        crop_key, flip_key = jax.random.split(key)
        padded = jnp.pad(batch, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
        h, w = batch.shape[1:3]
        offsets = jax.random.randint(crop_key, (batch.shape[0], 2), 0, 9)
        crops = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(padded, offsets)
        flip = jax.random.bernoulli(flip_key, 0.5, (batch.shape[0], 1, 1, 1))
        return jnp.where(flip, crops[:, :, ::-1], crops)

    @jax.jit
    def step(params, state, opt_state, key):
        batch_key, augment_key = jax.random.split(key)
        picked = jax.random.choice(batch_key, images.shape[0], (batch_size,), replace=images.shape[0] < batch_size)
        x, y = augment(augment_key, images[picked]), labels[picked]

        def loss_fn(p):
            logits, new_state = model.train_apply(p, state, x)
            return model.loss(logits, jax.nn.one_hot(y, classes)), (logits, new_state)

        (loss, (logits, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == y)
        return optax.apply_updates(params, updates), new_state, opt_state, loss, accuracy

    state, opt_state = model.state, optimizer.init(params)
    key = jax.random.key(seed)
    for i in range(steps):
        params, state, opt_state, loss, accuracy = step(params, state, opt_state, jax.random.fold_in(key, i))
        if on_step is not None:
            on_step(i + 1, params, state, float(loss), float(accuracy))
    return params, state


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return run(args)
    except UsageError as error:
        return fail("dlg_jax.train", error)
    except KeyboardInterrupt:
        print("dlg_jax.train: interrupted (the last checkpoint written is kept)", file=sys.stderr)
        return 130


def run(args) -> int:
    from pathlib import Path

    import numpy as np

    from dlg_jax import data as data_lib
    from dlg_jax.models import IMAGE_MODELS, get_model
    from dlg_jax.models import checkpoint
    from dlg_jax.ranges import parse_range
    from dlg_jax.results.files import check_writable

    if args.model not in IMAGE_MODELS:
        raise UsageError(f"--model {args.model!r}: choose an image model: {', '.join(IMAGE_MODELS)}")
    dataset = data_lib.load_npz(args.data)
    indices = parse_range(args.indices) if args.indices is not None else list(range(len(dataset)))
    dataset.check_indices(indices)
    out = Path(args.out)
    check_writable(out.parent if str(out.parent) else Path("."))
    try:
        model = get_model(args.model, dataset.num_classes, dataset.image_shape)
    except ValueError as error:
        raise UsageError(f"--model: {error}") from None
    params = model.init(args.model_seed)
    images, labels = dataset.images[indices] / 255.0, dataset.labels[indices]
    started, window, last = time.time(), [], [0.0]

    def on_step(step, params, state, loss, accuracy):
        window.append((loss, accuracy))
        if step % args.save_every == 0 or step == args.steps:
            mean_loss = sum(v[0] for v in window) / len(window)
            mean_accuracy = sum(v[1] for v in window) / len(window)
            window.clear()
            checkpoint.save(out, model, params, dict(steps=step, data=dataset.source, indices=args.indices,
                                                     train_loss=mean_loss, train_accuracy=mean_accuracy,
                                                     model_seed=args.model_seed, seed=args.seed,
                                                     learning_rate=args.learning_rate, batch_size=args.batch_size,
                                                     clip_norm=args.clip_norm),
                            state=state)
            print(f"step {step}/{args.steps}: loss {mean_loss:.3f}, accuracy {mean_accuracy:.3f} "
                  f"({time.time() - started:.0f} s) -> {out}", flush=True)
            last[0] = mean_accuracy

    print(f"training {args.model} on {len(indices)} images of {dataset.source} for {args.steps} steps", flush=True)
    train(model, params, images, labels, args.steps, args.batch_size, args.learning_rate, args.seed, on_step,
          args.clip_norm)
    majority = max(np.bincount(labels)) / len(labels)
    if last[0] <= majority + 0.02:
        print(f"dlg_jax.train: warning: training accuracy {last[0]:.3f} is no better than always predicting the "
              f"commonest class ({majority:.3f}): the model may have died (dead ReLUs, a zero gradient); try a "
              "smaller --learning-rate or --clip-norm, or more --steps", file=sys.stderr)
    return 0
