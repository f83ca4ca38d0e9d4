"""Run one DLG attack and save what it recovered: `python -m dlg_jax.run --index 25`.

By default the private image is CIFAR-100 train[25] (label 84, 'table'), the original demo. The attack
prints the gradient distance every 10 steps, as the original does, and writes to --out:
history.png (the dummy every 10 steps), reconstruction.png (truth beside reconstruction) and result.json.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from dlg_jax import data as data_lib
from dlg_jax.attack import LABEL_STRATEGIES, OPTIMIZERS, PIXEL_RANGES, STATUS_NAMES, AttackConfig
from dlg_jax.cli import ArgumentParser, enable_compilation_cache, fail, non_negative_float, positive_int
from dlg_jax.errors import UsageError
from dlg_jax.ranges import parse_range

SNAPSHOT_EVERY = 10  # steps between printed values and history snapshots, as in the original


def build_parser() -> ArgumentParser:
    defaults = AttackConfig()
    p = ArgumentParser(prog="dlg_jax.run", description=__doc__.splitlines()[0])
    src = p.add_argument_group("private data (default: tfds cifar100 train)")
    src.add_argument("--index", type=int, default=25, help="index of the private image in the data (default 25)")
    src.add_argument("--batch-size", type=positive_int, default=1,
                     help="attack the mean gradient of N images: --index I .. I+N-1 (default 1)")
    src.add_argument("--indices", default=None, help="the images of the batch instead: 3,7,9 or START:STOP")
    src.add_argument("--dataset", default="cifar100", choices=sorted(data_lib.TFDS_DATASETS),
                     help="tensorflow-datasets dataset; also fixes the model shape for --image (default cifar100)")
    src.add_argument("--split", default="train", help="tfds split (default train)")
    src.add_argument("--tfds-dir", default=None, help="tfds data_dir (default: tfds's, ~/tensorflow_datasets)")
    src.add_argument("--data", default=None, help="local npz with images (uint8 NHWC/NHW), labels[, label_names]; replaces tfds")
    src.add_argument("--image", nargs="+", default=None,
                     help="image file(s) (any format/size/mode PIL reads), converted to the model input; several = a batch")
    src.add_argument("--label", type=int, nargs="+", default=None,
                     help="true label(s) of --image (default: the model's own prediction, as a client would label it)")
    att = p.add_argument_group("attack")
    att.add_argument("--label-strategy", default=defaults.label_strategy, choices=LABEL_STRATEGIES,
                     help="joint: optimise softmax(dummy logits) with the images (the paper); idlg: read the labels "
                          "off the last layer's gradient (exact for one image, counted for a batch), optimise images only")
    att.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS,
                     help="lbfgs: jaxopt LBFGS with the measured settings (default); torch-lbfgs: the semantics of "
                          "torch.optim.LBFGS as the reference uses it (20 iterations a step, no line search, all steps)")
    att.add_argument("--steps", type=positive_int, default=defaults.steps, help="steps (default 300, as the reference)")
    att.add_argument("--iterations-per-step", type=positive_int, default=defaults.iterations_per_step,
                     help=f"LBFGS iterations per step (default {defaults.iterations_per_step})")
    att.add_argument("--precision", default=defaults.precision, choices=("float64", "float32"),
                     help=f"arithmetic of the attack (default {defaults.precision})")
    att.add_argument("--pixel-range", default=defaults.pixel_range, choices=PIXEL_RANGES,
                     help="free: optimise pixels directly (the paper); sigmoid: images = sigmoid(dummy), kept in "
                          "(0, 1) (an image prior, for batches)")
    att.add_argument("--tv-weight", type=non_negative_float, default=defaults.tv_weight,
                     help="weight of a total-variation prior, divided by 10 per stage and 0 in the last "
                          "(default 0: none; 1e-5 for batches, README 'Batches')")
    att.add_argument("--tv-stages", type=positive_int, default=defaults.tv_stages,
                     help=f"equal stages of the steps over which the TV weight falls (default {defaults.tv_stages})")
    att.add_argument("--seed", type=int, default=1234, help="seed of the dummy image and label (default 1234, the reference's)")
    att.add_argument("--model-seed", type=int, default=1234, help="seed of the U(-0.5,0.5) model weights (default 1234)")
    p.add_argument("--out", default=None, help="output directory (default runs/<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="do not print the gradient distance every 10 steps")
    return p


def attack_config(args) -> AttackConfig:
    """The AttackConfig the attack flags ask for; a contradiction among them is a usage error."""
    try:
        return AttackConfig(steps=args.steps, iterations_per_step=args.iterations_per_step,
                            label_strategy=args.label_strategy, optimizer=args.optimizer, precision=args.precision,
                            pixel_range=args.pixel_range, tv_weight=args.tv_weight, tv_stages=args.tv_stages)
    except ValueError as error:
        raise UsageError(str(error)) from None


def load_private_data(args) -> tuple[data_lib.Dataset, list[int], list[int]]:
    """The dataset, the positions of the private images in it, and their indices as the user names them."""
    if args.data and args.image:
        raise UsageError("--data and --image are exclusive: give one source")
    if args.image:
        if args.label is not None and len(args.label) != len(args.image):
            raise UsageError(f"--label: {len(args.label)} label(s) for {len(args.image)} image(s)")
        spec = data_lib.TFDS_DATASETS[args.dataset]
        names = [str(c) for c in range(spec["num_classes"])]
        dataset = data_lib.load_images(args.image, spec["shape"], args.label, names)
        positions = list(range(len(dataset)))
        return dataset, positions, positions
    if args.label is not None:
        raise UsageError("--label applies to --image only (datasets carry their labels)")
    if args.indices is not None and args.batch_size != 1:
        raise UsageError("give either --indices or --index with --batch-size")
    wanted = parse_range(args.indices) if args.indices is not None else list(
        range(args.index, args.index + args.batch_size))
    if args.data:
        dataset = data_lib.load_npz(args.data)
        dataset.check_indices(wanted)
        return dataset, wanted, wanted
    dataset = data_lib.load_tfds(args.dataset, args.split, wanted, args.tfds_dir)
    return dataset, list(range(len(wanted))), wanted


def attack_images(images: np.ndarray, labels: np.ndarray, num_classes: int, config: AttackConfig, seed: int = 1234,
                  model_seed: int = 1234, on_step: Callable[[dict], None] | None = None,
                  snapshot_every: int = SNAPSHOT_EVERY) -> dict:
    """Attack the gradient of a batch of private images (uint8 NHWC); labels -1 = the model's prediction.

    Returns the reconstruction (float NHWC), predicted labels, the true labels used, the gradient
    distance, status, counts and timings, and snapshots every `snapshot_every` steps; `on_step` gets
    {step, value, evaluations, best_images} after each snapshot.
    """
    import jax
    import jax.numpy as jnp

    from dlg_jax.attack import Attack, dummy_images, make_problem, precision_scope, predicted_labels
    from dlg_jax.models import LeNet, init_params

    model = LeNet(num_classes=num_classes)
    with precision_scope(config):
        params = init_params(model, model_seed, images.shape[1:])
        apply_fn = lambda p, x: model.apply({"params": p}, x)  # noqa: E731
        pixels = jnp.asarray(images, config.dtype) / 255.0
        unknown = labels < 0
        if unknown.any():  # a client labels an unlabelled image as its model predicts it
            labels = np.where(unknown, np.asarray(jnp.argmax(apply_fn(params, pixels), -1)), labels)
        problem = make_problem(apply_fn, params, pixels, jnp.asarray(labels), num_classes, config, seed)
        if config.optimizer == "torch-lbfgs":
            return _torch_lbfgs_outcome(apply_fn, problem, config, labels, on_step, snapshot_every)
        attack = Attack(apply_fn, config)
        attack.compile(problem)
        start = time.perf_counter()
        state = attack.init(problem)
        snapshots = []
        for step in range(0, config.steps, snapshot_every):
            state = attack.advance(state, problem, step + 1)
            snapshots.append((step, np.asarray(dummy_images(state.dummy, config))))
            if on_step:
                on_step(dict(step=step, value=float(state.solver_state.value), evaluations=int(state.evaluations),
                             best_images=np.asarray(dummy_images(state.best_dummy, config))))
        state = jax.block_until_ready(attack.advance(state, problem, config.steps))
        seconds = time.perf_counter() - start
        iterations = int(state.iterations)
        return dict(
            reconstruction=np.asarray(dummy_images(state.best_dummy, config), np.float64),
            label_pred=np.asarray(predicted_labels(state, problem)),
            label_true=np.asarray(labels),
            grad_distance=float(state.best_value),
            status=STATUS_NAMES[int(state.status)],
            attempts=int(state.attempt) + 1,
            iterations=iterations,
            steps=-(-iterations // config.iterations_per_step),
            evaluations=int(state.evaluations),
            seconds=seconds,
            compile_seconds=attack.compile_seconds,
            snapshots=snapshots,
        )


def _torch_lbfgs_outcome(apply_fn, problem, config: AttackConfig, labels, on_step, snapshot_every: int) -> dict:
    """The reference's optimiser: `config.steps` torch-LBFGS steps, all of them, as the published script runs."""
    import functools

    import jax
    import jax.numpy as jnp

    from dlg_jax.attack import compiler_options, gradient_distance
    from dlg_jax.torch_lbfgs import make_torch_lbfgs_runner

    runner = make_torch_lbfgs_runner(functools.partial(gradient_distance, apply_fn=apply_fn), steps=config.steps,
                                     keep_iterates=True, max_iter=config.iterations_per_step,
                                     history_size=config.history_size)
    start = time.perf_counter()
    runner = runner.lower(problem.init, *problem.solver_args).compile(compiler_options=compiler_options())
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = jax.block_until_ready(runner(problem.init, *problem.solver_args))
    seconds = time.perf_counter() - start
    iterates = np.asarray(result.iterates["images"])
    snapshots = [(step, iterates[step]) for step in range(0, config.steps, snapshot_every)]
    if on_step:  # after the fact: the whole run is one compiled program
        for step, images in snapshots:
            on_step(dict(step=step, value=float(result.values[min(step + 1, config.steps - 1)]),
                         evaluations=int(result.evaluations[step]), best_images=images))
    labels_pred = jnp.argmax(result.x.get("label_logits", problem.known_labels), axis=-1)
    target = config.tolerance * sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(problem.shared_grads))
    final = float(result.final_value)
    status = ("converged" if float(result.value) <= target
              else "diverged" if not np.isfinite(final) or final > float(result.values[0]) else "max_steps")
    return dict(reconstruction=np.asarray(result.x["images"], np.float64), label_pred=np.asarray(labels_pred),
                label_true=np.asarray(labels), grad_distance=float(result.value), status=status, attempts=1,
                iterations=int(result.state.n_iter), steps=config.steps, evaluations=int(result.evaluations[-1]),
                seconds=seconds, compile_seconds=compile_seconds, snapshots=snapshots)


def write_outputs(out: Path, dataset: data_lib.Dataset, positions: Sequence[int], indices: Sequence[int],
                  outcome: dict, config: AttackConfig, args) -> dict:
    """Save figures and result.json (written last, atomically: its presence means the run finished); a batch's
    images are shown and judged in the order `judge` matches them to the private images."""
    from dlg_jax.plots import save_history, save_reconstruction

    truth = dataset.images[list(positions)] / 255.0
    result, order = judge(truth, outcome["reconstruction"], outcome["label_pred"], outcome["label_true"], indices,
                          dataset.label_names)
    per_image = result.get("images", [result])
    out.mkdir(parents=True, exist_ok=True)
    save_history(out / "history.png", [(step, images[order]) for step, images in outcome["snapshots"]])
    captions = [(f"truth #{r['index']}: {r['label_true']} {r['label_name_true']}",
                 f"DLG: {r['label_pred']} {r['label_name_pred']}, {r['psnr']:.1f} dB") for r in per_image]
    save_reconstruction(out / "reconstruction.png", truth, outcome["reconstruction"][order], captions)
    result.update({k: outcome[k] for k in ("grad_distance", "steps", "iterations", "evaluations", "seconds",
                                           "compile_seconds", "status", "attempts")})
    result.update(source=dataset.source, seed=args.seed, model_seed=args.model_seed, config=dataclasses.asdict(config))
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out / "result.json")
    return result


def judge(truth: np.ndarray, reconstruction: np.ndarray, label_pred, label_true, indices: Sequence[int],
          names: Sequence[str]) -> tuple[dict, np.ndarray]:
    """Judge a reconstruction of private images (truth in [0, 1], NHWC): result.json's image keys, and the order
    that matches the reconstructions to the truth (`reconstruction[order]`).

    A batch comes back in any order: its reconstructions are matched to the private images first
    (minimum-cost assignment on MSE), then judged pair by pair; the result then has a row per image, the
    means and the label accuracy as multisets. One image gives its row alone.
    """
    from dlg_jax.metrics import image_metrics, match_to_truth

    order = match_to_truth(truth, reconstruction)
    metrics = image_metrics(truth, np.asarray(reconstruction)[order])
    label_pred, label_true = np.asarray(label_pred).reshape(-1), np.asarray(label_true).reshape(-1)
    name = lambda c: names[c] if 0 <= c < len(names) else str(c)  # noqa: E731
    per_image = [
        dict(index=int(i), label_true=int(t), label_pred=int(p), label_name_true=name(int(t)),
             label_name_pred=name(int(p)), mse=float(m), psnr=float(q), ssim=float(s))
        for i, t, p, m, q, s in zip(indices, label_true, label_pred[order], metrics["mse"], metrics["psnr"],
                                    metrics["ssim"])
    ]
    if len(per_image) == 1:
        return dict(per_image[0]), order
    return dict(indices=[int(i) for i in indices], batch_size=len(per_image),
                **{k: float(np.mean(metrics[k])) for k in ("mse", "psnr", "ssim")},
                label_accuracy=multiset_accuracy(label_pred, label_true), images=per_image), order


def multiset_accuracy(predicted: Sequence[int], true: Sequence[int]) -> float:
    """Fraction of the batch's labels recovered, as multisets (order-free, repeats counted)."""
    from collections import Counter

    hits = Counter(int(p) for p in predicted) & Counter(int(t) for t in true)
    return sum(hits.values()) / len(true)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        config = attack_config(args)
        dataset, positions, indices = load_private_data(args)
        out = Path(args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory")
    except UsageError as error:
        return fail(prog, error)
    enable_compilation_cache()

    def show(progress: dict) -> None:
        if not args.quiet:
            print(f"{progress['step']} {progress['value']:.4f}", flush=True)

    outcome = attack_images(dataset.images[positions], dataset.labels[positions], dataset.num_classes, config,
                            args.seed, args.model_seed, on_step=show)
    result = write_outputs(out, dataset, positions, indices, outcome, config, args)
    labels = (f"label {result['label_pred']} (true {result['label_true']})" if "label_pred" in result
              else f"labels {100 * result['label_accuracy']:.0f}% right")
    print(f"{outcome['status']}: PSNR {result['psnr']:.2f} dB{' (batch mean)' if 'images' in result else ''}, "
          f"{labels}, {outcome['seconds']:.2f} s + {outcome['compile_seconds']:.2f} s compile, "
          f"{outcome['evaluations']} evaluations -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
