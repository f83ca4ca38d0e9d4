"""Run one DLG attack and save what it recovered: `python -m dlg_jax.run --index 25`.

By default the private image is CIFAR-100 train[25] (label 84, 'table'), the original demo. The attack
prints the gradient distance every 10 steps, as the original does, until it stops, and writes to --out:
history.png and history.gif (the dummy every 10 steps and where it stopped), reconstruction.png (truth beside
reconstruction), trace.png (D and PSNR per step) and result.json (metrics, status, the per-step trace).
`--defense NAME:STRENGTH` (repeatable) defends the client's gradient (dlg_jax/defenses.py); `--adaptive` has the
attacker model the defenses.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Sequence

from dlg_jax import data as data_lib
from dlg_jax.cli.common import (ArgumentParser, add_attack_flags, add_defense_flags, attack_config, case_from_args,
                                defense_record, defenses_from_args, enable_compilation_cache, fail, positive_int, seed)
from dlg_jax.errors import UsageError
from dlg_jax.ranges import parse_range

SNAPSHOT_EVERY = 10  # steps between printed values and history snapshots, as in the original (300 steps: 30)
MAX_SNAPSHOTS = 60  # longer attacks snapshot less often (every 20 steps for 600, ...): the figure stays readable


def build_parser() -> ArgumentParser:
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
    src.add_argument("--text", action="append", default=None,
                     help="a private sentence for a text model (--model bert or gpt; repeat for more); "
                          "--data FILE.txt: one a line; neither: the paper's NeurIPS 2019 demo sentences")
    src.add_argument("--label", type=int, nargs="+", default=None,
                     help="true label(s) of --image (default: the model's own prediction, as a client would label it)")
    add_attack_flags(p, text=True)
    add_defense_flags(p, axis=False)
    p.add_argument("--seed", type=seed, default=1234, help="seed of the dummy image and label (default 1234, the reference's)")
    p.add_argument("--out", default=None, help="output directory (default runs/<timestamp>)")
    p.add_argument("--quiet", action="store_true", help="do not print the gradient distance every 10 steps")
    return p


def snapshot_every(steps: int) -> int:
    """Every 10 steps, as the original, or a multiple of 10 that keeps at most MAX_SNAPSHOTS snapshots."""
    return SNAPSHOT_EVERY * max(1, -(-steps // (SNAPSHOT_EVERY * MAX_SNAPSHOTS)))


def load_private_data(args) -> tuple[data_lib.Dataset, list[int], list[int]]:
    """The dataset, the positions of the private images in it, and their indices as the user names them."""
    if args.data and args.image:
        raise UsageError("--data and --image are exclusive: give one source")
    if args.image:
        if args.label is not None and len(args.label) != len(args.image):
            raise UsageError(f"--label: {len(args.label)} label(s) for {len(args.image)} image(s)")
        spec = data_lib.TFDS_DATASETS[args.dataset]
        dataset = data_lib.load_images(args.image, spec["shape"], args.label, spec["names"])
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


def write_outputs(out: Path, dataset: data_lib.Dataset, positions: Sequence[int], indices: Sequence[int],
                  outcome, trace, config, args) -> dict:
    """Save figures and result.json (written last, atomically: its presence means the run finished); a batch's
    images are shown and judged in the order `judge` matches them to the private images."""
    from dlg_jax.results.files import dumps, write_atomic
    from dlg_jax.results.judge import judge
    from dlg_jax.results.plots import save_gif, save_history, save_reconstruction, save_trace

    truth = dataset.images[list(positions)] / 255.0
    result, order = judge(truth, outcome.reconstruction, outcome.label_pred, outcome.label_true, indices,
                          dataset.label_names)
    per_image = result.get("images", [result])
    out.mkdir(parents=True, exist_ok=True)
    history = [(step, images[order]) for step, images in trace.snapshots]
    save_history(out / "history.png", history, stop=outcome.status)
    save_gif(out / "history.gif", history)
    save_trace(out / "trace.png", trace.values, trace.scores, stop=outcome.status)
    files = [Path(f).name for f in args.image] if args.image else None
    captions = [(f"truth {files[n] if files else '#' + str(r['index'])}: {r['label_true']} {r['label_name_true']}",
                 f"DLG: {r['label_pred']} {r['label_name_pred']}, {r['psnr']:.1f} dB") for n, r in enumerate(per_image)]
    save_reconstruction(out / "reconstruction.png", truth, outcome.reconstruction[order], captions)
    result.update(outcome.result(), **trace.result())
    result.update(defense_record(args, [d.name for d in args.defenses], [d.strengths[0] for d in args.defenses]))
    result.update(source=dataset.source, seed=args.seed, model=args.model, model_seed=args.model_seed,
                  checkpoint=args.checkpoint,
                  preset=args.preset, config=config.to_dict())
    write_atomic(out / "result.json", dumps(result, indent=2) + "\n")
    return result


OUTPUTS = ("history.png", "history.gif", "trace.png", "reconstruction.png", "result.json")


def prepare_out(path: str | None) -> tuple[Path, bool]:
    """The output folder, made now (before the attack) so that an unwritable one is a one-line error first; a
    planted symlink where an output goes is refused. Returns the folder and whether this run created it."""
    from dlg_jax.results.files import check_writable, refuse_links

    if path == "":
        raise UsageError("--out: an empty path")
    out = Path(path or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a directory")
    created = not out.exists()
    refuse_links(out, OUTPUTS)
    check_writable(out)
    return out, created


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    from dlg_jax.cli.text import is_text, text_main

    if is_text(args):  # text models: a path of their own (dlg_jax/cli/text.py)
        return text_main(args, prog)
    try:
        batch = len(args.image) if args.image else len(parse_range(args.indices)) if args.indices else args.batch_size
        config, note = attack_config(args, batch_size=batch)  # before the data: a bad flag costs no download
        defenses_from_args(args, batch, axis=False)
        dataset, positions, indices = load_private_data(args)
        case = case_from_args(args, dataset, config)
        out, created = prepare_out(args.out)
    except UsageError as error:
        return fail(prog, error)
    try:
        return _attack(args, prog, config, note, dataset, positions, indices, case, out)
    except KeyboardInterrupt:
        _discard(out, created)
        print(f"{prog}: interrupted; nothing written to {out}", file=sys.stderr, flush=True)
        return 130
    except OSError as error:  # a full disk while writing: one line, and no half-written outputs
        _discard(out, created)
        print(f"{prog}: error: {error.strerror or error}: {error.filename or out}", file=sys.stderr)
        return 2


def _discard(out: Path, created: bool) -> None:
    """Remove what this run wrote (result.json is written last: without it the run did not finish)."""
    import contextlib

    if (out / "result.json").exists() and not created:
        return
    for name in OUTPUTS:
        with contextlib.suppress(OSError):
            (out / name).unlink()
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()


def _attack(args, prog, config, note, dataset, positions, indices, case, out: Path) -> int:
    if note:
        print(f"{prog}: {note}", flush=True)
    enable_compilation_cache()
    from dlg_jax.engine.single import attack_one

    def show(progress: dict) -> None:
        if not args.quiet:
            print(f"{progress['step']} {progress['value']:.4f}", flush=True)

    def compiling() -> None:
        if not args.quiet:
            print(f"compiling the attack ({config.solver.optimizer}, {len(positions)} image(s)) ...", flush=True)

    def retrying(first) -> None:
        if not args.quiet:
            print(f"{first.status} in float32 at D = {first.grad_distance:.3g}: the attack again in float64 "
                  "(--float64-retry off: not)", flush=True)

    outcome, trace = attack_one(case, config, dataset.images[positions], dataset.labels[positions], args.seed,
                                on_step=show, snapshot_every=snapshot_every(config.rules.steps), on_compile=compiling,
                                on_retry=retrying)
    result = write_outputs(out, dataset, positions, indices, outcome, trace, config, args)
    labels = (f"label {result['label_pred']} (true {result['label_true']})" if "label_pred" in result
              else f"labels {100 * result['label_accuracy']:.0f}% right")
    print(f"{outcome.status} at step {trace.stopped_at} (D = {outcome.grad_distance:.3g}): PSNR {result['psnr']:.2f} dB{' (batch mean)' if 'images' in result else ''}, "
          f"{labels}, {outcome.seconds:.2f} s + {outcome.compile_seconds:.2f} s compile, "
          f"{outcome.evaluations} evaluations -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
