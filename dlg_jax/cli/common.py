"""Shared pieces of the command-line tools: the attack flags and presets, one-line errors with exit code 2, and
the compilation cache."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dlg_jax.errors import UsageError


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2 (no usage dump), and no abbreviations
    (`--model res` must not silently mean `--model-seed`)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def fail(prog: str, error: Exception) -> int:
    print(f"{prog}: error: {error}", file=sys.stderr)
    return 2


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def case_from_args(args, dataset, config):
    """The attacked case the flags name: the model, its seeded weights, the client and its defenses (at their
    first strengths; a sweep gives each task its own)."""
    from dlg_jax.engine.attack import make_case as build, precision_scope

    defenses = [(d.name, d.strengths[0]) for d in getattr(args, "defenses", None) or ()]
    try:
        with precision_scope(config):
            return build(args.model, dataset.num_classes, dataset.image_shape, args.model_seed, config.dtype,
                         defenses=defenses, dp_clip=getattr(args, "dp_clip", 1.0), checkpoint=args.checkpoint,
                         local=local_training(args))
    except ValueError as error:
        raise UsageError(f"--{'checkpoint' if 'checkpoint' in str(error) else 'model'}: {error}") from None


def add_defense_flags(parser: argparse.ArgumentParser, axis: bool) -> None:
    from dlg_jax.defenses import KINDS

    group = parser.add_argument_group("defenses of the client (dlg_jax/defenses.py)")
    group.add_argument("--defense", action="append", default=[], metavar="NAME[:STRENGTH]",
                       help=f"applied to the shared gradient, in the order given (repeatable): {', '.join(KINDS)}; "
                            "e.g. gauss:1e-3 (variance), prune:0.2 (fraction zeroed), dp:1.0 (noise multiplier), fp16"
                            + ("; several strengths, prune:0.01,0.1,0.2, are an axis of the sweep" if axis else ""))
    if axis:
        group.add_argument("--defense-study", action="append", default=[], metavar="NAME[:S1,S2,...]",
                           help="a study in one command: the undefended client, then each of these defenses alone at "
                                "each of its strengths (repeatable; one compiled program per defense), DIR/<setting> "
                                "each (DIR/none: no defense)")
    group.add_argument("--adaptive", action="store_true", default=None,
                       help="the attacker models the defenses: matches only the shared entries (pruning), in the "
                            "shared precision (casts, int8), clips its dummy (dp), stops at the noise floor")
    group.add_argument("--dp-clip", type=positive_float, default=1.0, help="dp: per-example L2 clip norm C (default 1)")
    group.add_argument("--dp-steps", type=int, default=1000,
                       help="dp: steps of the training run the epsilon is stated for (default 1000)")
    group.add_argument("--dp-rate", type=float, default=0.01,
                       help="dp: the run's sampling rate, batch / dataset size (default 0.01: batch 500 of 50,000)")
    group.add_argument("--dp-delta", type=float, default=1e-5, help="dp: the run's delta (default 1e-5)")
    group.add_argument("--fedavg-lr", type=positive_float, default=0.01,
                       help="fedavg:K (K local SGD steps, the weight difference shared): their learning rate (default 0.01)")
    group.add_argument("--fedavg-batch", type=positive_int, default=None,
                       help="fedavg: examples per local step, in order (default: all of the client's at every step)")


def defenses_from_args(args, batch_size: int, axis: bool) -> list:
    """The --defense specs parsed and checked (`args.defenses`: [dlg_jax.defenses.Defense]); one strength each
    unless `axis`."""
    from dlg_jax import defenses as D

    parsed = [D.parse(spec) for spec in args.defense]
    D.check_chain([d.name for d in parsed])
    if not axis:
        for d, spec in zip(parsed, args.defense):
            if len(d.strengths) > 1:
                raise UsageError(f"--defense {spec}: one strength per run (a list of them is for dlg_jax.sweep)")
    if any(d.name == "dp" for d in parsed):
        D.check_run(dp_run(args), batch_size)
    local_batch = getattr(args, "fedavg_batch", None)
    if any(d.name == "fedavg" for d in parsed) and local_batch is not None and batch_size % local_batch:
        raise UsageError(f"--fedavg-batch {local_batch}: must divide the client's {batch_size} example(s)")
    args.defenses = parsed
    return parsed


def local_training(args):
    """FedAvg's client from the flags: --fedavg-lr, --fedavg-batch, unrolled to the largest fedavg:K asked for."""
    from dlg_jax.defenses import LocalTraining

    steps = [s for d in getattr(args, "defenses", None) or () if d.name == "fedavg" for s in d.strengths]
    return LocalTraining(getattr(args, "fedavg_lr", 0.01), getattr(args, "fedavg_batch", None),
                         int(max(steps, default=1)))


def dp_run(args):
    from dlg_jax.defenses import TrainingRun

    return TrainingRun(args.dp_steps, args.dp_rate, args.dp_delta)


def defense_record(args, names, strengths) -> dict:
    """What a row says of its client's defenses: `defense` (the setting's name, '' for none), each defense and
    strength, and for DP-SGD the clip, the training run and its epsilon (RDP accountant)."""
    from dlg_jax import defenses as D

    record = dict(defense=D.label(names, strengths), defenses=[dict(name=n, strength=float(s))
                                                               for n, s in zip(names, strengths)], epsilon=None)
    if "dp" in names:
        run = dp_run(args)
        record.update(epsilon=D.epsilon(float(strengths[0]), run), dp_clip=args.dp_clip,
                      dp_run=dict(steps=run.steps, rate=run.rate, delta=run.delta))
    if "fedavg" in names:
        local = local_training(args)
        record.update(fedavg_lr=local.learning_rate, fedavg_batch=local.batch)
    return record


def exit_with(code: int) -> None:
    """Leave with `code`; after Ctrl-C (130) without tearing down JAX's threads, which can crash on the way out
    (seen: exit -11 after the one-line message)."""
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def enable_compilation_cache() -> Path:
    """Persist compiled XLA programs so a second run of the same attack skips compilation.

    The cache lives in $DLG_JAX_CACHE_DIR, else ~/.cache/dlg_jax/xla.
    """
    import jax

    path = Path(os.environ.get("DLG_JAX_CACHE_DIR", Path.home() / ".cache" / "dlg_jax" / "xla"))
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


MAX_SEED = 2**31 - 1


def seed(text: str) -> int:
    """A seed in 0 .. 2^31 - 1 (what every engine lane holds as int32)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must lie in 0..{MAX_SEED}, got {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")
    return text == "on"


def positive_float(text: str) -> float:
    value = non_negative_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# Attack flags: each sets one field of the AttackConfig (dlg_jax.config) over the preset's value; flags left out
# keep the preset's. (flag, field, type, help)
ATTACK_FLAGS = (
    ("--label-strategy", "labels", dict(choices=("joint", "idlg")),
     "joint: optimise softmax(dummy logits) with the images (the paper); idlg: read the labels off the last layer's "
     "gradient (exact for one image, counted for a batch), optimise images only"),
    ("--optimizer", "optimizer", dict(choices=("lbfgs", "torch-lbfgs", "adam", "jaxopt-lbfgs")),
     "lbfgs: the engine's L-BFGS (Armijo backtracking, default); torch-lbfgs: torch.optim.LBFGS's semantics as the "
     "reference uses it; adam: optax Adam; jaxopt-lbfgs: jaxopt's own LBFGS (one attack at a time: dlg_jax.run only)"),
    ("--steps", "steps", dict(type=positive_int), "steps (default 300, as the reference; 600 in preset batch)"),
    ("--iterations-per-step", "iterations_per_step", dict(type=positive_int),
     "solver iterations per step (default 20, torch's max_iter)"),
    ("--precision", "precision", dict(choices=("float32", "float64")), "arithmetic of the attack (default float32)"),
    ("--pixel-range", "dummy", dict(choices=("free", "sigmoid", "box")),
     "free: optimise pixels directly (the paper); sigmoid: images = sigmoid(dummy), kept in (0, 1) (an image "
     "prior); box: free pixels projected onto [0, 1] after every step (Inverting Gradients; adam only)"),
    ("--tv-weight", "tv_weight", dict(type=non_negative_float),
     "weight of a total-variation prior, divided by 10 per stage and 0 in the last (default 0; 1e-5 in preset batch)"),
    ("--tv-stages", "tv_stages", dict(type=non_negative_int),
     "equal stages of the steps over which the TV weight falls (default 4; 0: constant, as Inverting Gradients)"),
    ("--prior", "prior", dict(choices=("tv", "tv-anisotropic")),
     "the image prior --tv-weight weighs: tv (colour TV, smoothed; default), tv-anisotropic (Inverting Gradients')"),
    ("--distance", "distance", dict(choices=("l2", "cosine", "l2+l1")),
     "gradient distance: l2 (the paper, default), cosine (Inverting Gradients), l2+l1 (TAG)"),
    ("--learning-rate", "learning_rate", dict(type=positive_float), "Adam's learning rate (default 0.1)"),
    ("--schedule", "schedule", dict(choices=("constant", "step", "cosine")), "Adam's learning-rate schedule"),
    ("--tolerance", "tolerance", dict(type=non_negative_float),
     "converged when D <= tolerance x ||shared gradient||^2 (default 1e-7, ~36-40 dB; 0: run every step)"),
    ("--plateau-reduction", "plateau_reduction", dict(type=non_negative_float),
     "after the stall probe, an attempt must cut D to this fraction every 25 steps or start afresh (default 0.5; "
     "0: off, as in preset batch)"),
    ("--float64-retry", "float64_retry", dict(type=on_off, metavar="{on,off}"),
     "an attack that float32 leaves unconverged when its budget ends runs again in float64, and the lower gradient "
     "distance is kept (default on; off in preset batch)"),
    ("--retries", "retries", dict(type=int), "fresh random starts after a stalled or diverged attempt (default: as many as the budget has room for, "
     "steps // 25 - 1; 3 in preset batch)"),
)


def add_attack_flags(parser: argparse.ArgumentParser, text: bool = False) -> None:
    """The attack flags; `text`: the text presets (dlg_jax.text.attacks) are choices of --preset too."""
    from dlg_jax.config import PRESETS

    text_presets = []
    if text:
        from dlg_jax.text.attacks import PRESETS as TEXT_PRESETS

        text_presets = sorted(TEXT_PRESETS)
    group = parser.add_argument_group("attack (flags override the preset)")
    group.add_argument("--preset", default=None, choices=sorted(PRESETS) + text_presets,
                       help="dlg (default; batch for --batch-size >= 2 when no attack flag is given), idlg, batch, "
                            "reference (torch-lbfgs, one attempt, every step), inverting-gradients (cosine + TV + "
                            "signed Adam in a box, 4,800 iterations; for ReLU/BatchNorm models)" + (
                                "; text models: rows (default), lamp-cos, tag, dlg-text (the paper's)" if text else ""))
    for flag, field, kind, text in ATTACK_FLAGS:
        group.add_argument(flag, dest=field, default=None, help=text, **kind)
    group.add_argument("--signed", action="store_true", default=None, help="Adam on the gradient's sign")
    model = parser.add_argument_group("model")
    model.add_argument("--model", default="lenet",
                       help="model by name: lenet (default, the paper's), lenet-relu, convnet, resnet20, resnet18 "
                            "(BatchNorm in eval mode; NAME-train: in train mode)" + (", bert, gpt, ..." if text else ""))
    model.add_argument("--model-seed", type=seed, default=1234, help="seed of the model weights (default 1234)")
    model.add_argument("--checkpoint", default=None,
                       help="the model's weights from this file (python -m dlg_jax.train writes them) instead of a seed")


def attack_config(args, batch_size: int = 1):
    """The preset the flags name (or the default), with every attack flag given applied over it. Returns the
    config and a note to show when a preset was chosen for the user."""
    from dlg_jax.config import get_config

    given = {field: getattr(args, field) for _, field, _, _ in ATTACK_FLAGS if getattr(args, field) is not None}
    if args.signed:
        given["signed"] = True
    if getattr(args, "adaptive", None):
        given["adaptive"] = True
    preset, note = args.preset, None
    if preset is None:
        preset = "batch" if batch_size >= 2 and not given else "dlg"
        if preset == "batch":
            note = (f"a batch of {batch_size} with no attack flags: using preset 'batch' (idlg labels, sigmoid "
                    "pixels, TV 1e-5 in 4 stages, 600 steps); --preset dlg for the paper's plain attack")
    try:
        return get_config(preset).override(**given), note
    except ValueError as error:
        raise UsageError(str(error)) from None


__all__ = ["ATTACK_FLAGS", "add_defense_flags", "defense_record", "defenses_from_args", "ArgumentParser", "exit_with", "add_attack_flags", "attack_config", "positive_float", "UsageError", "enable_compilation_cache", "fail", "non_negative_float", "positive_int"]
