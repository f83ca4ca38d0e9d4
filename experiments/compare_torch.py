"""Compare the PyTorch original of DLG with dlg_jax, image by image.

    python experiments/compare_torch.py --data ../shared/data/cifar100_train_0-49.npz --indices 0:50 --out runs/compare

For every private image it runs three attacks on the same single-image gradient:

- torch: the published reference (dlg_jax.reference.torch_dlg): LeNet with torch.manual_seed(1234) weights,
  dummy from torch.randn, torch.optim.LBFGS with defaults, --steps `optimizer.step` calls;
- jax_torch_lbfgs: dlg_jax's `--optimizer torch-lbfgs` as preset `reference` sets it up (the attack's objective;
  TorchLBFGS, dlg_jax.solvers.torch_lbfgs, with torch's max_iter, max_eval and history; one attempt, every step
  run) from the same weights and the same initial dummy as torch (transferred), the same number of outer steps:
  the same algorithm in JAX;
- jax_default: `dlg_jax.engine.single.attack_one` with preset `dlg` (the engine's L-BFGS with a backtracking
  line search, convergence test and retries; Flax-initialised weights from --seed), as `python -m dlg_jax.run`
  attacks: what dlg_jax does out of the box.

The first two run in --precision (float32 by default, as the published script). Each returns its best
iterate (lowest finite gradient distance seen); the torch reference's final iterate is reported too.
Writes to --out: compare.csv (one row per image, appended as each image finishes, so an interrupted run
keeps its rows), compare.md (the table and a summary: success rate at PSNR >= --threshold dB, median PSNR,
median time, speed ratios against torch) and psnr.png (PSNR per image, one series per method).
Seconds exclude compilation (reported separately for JAX).
"""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from dlg_jax import data as data_lib  # noqa: E402
from dlg_jax.cli.common import ArgumentParser, enable_compilation_cache, fail, positive_int  # noqa: E402
from dlg_jax.errors import UsageError  # noqa: E402
from dlg_jax.ranges import parse_range  # noqa: E402

METHODS = ("torch", "jax_torch_lbfgs", "jax_default")
METHOD_FLAGS = {"torch": "torch", "torch-lbfgs": "jax_torch_lbfgs", "default": "jax_default"}
FIELDS = ["index", "label"] + [f"{m}_{k}" for m in METHODS for k in ("psnr", "label_ok", "evaluations", "seconds",
                                                                      "grad_distance")] + [
    "torch_final_psnr", "jax_torch_lbfgs_compile_seconds", "jax_default_compile_seconds", "jax_default_status"]


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="compare_torch", description=__doc__.splitlines()[0])
    src = p.add_argument_group("private data")
    src.add_argument("--data", default=None, help="local npz (images uint8 NHWC/NHW, labels[, label_names]); replaces tfds")
    src.add_argument("--dataset", default="cifar100", choices=sorted(data_lib.TFDS_DATASETS),
                     help="tensorflow-datasets dataset when --data is not given (default cifar100)")
    src.add_argument("--split", default="train", help="tfds split (default train)")
    src.add_argument("--tfds-dir", default=None, help="tfds data_dir")
    src.add_argument("--indices", default="0:50", help="images to attack: START:STOP, or I,J,K (default 0:50)")
    p.add_argument("--steps", type=positive_int, default=300, help="outer LBFGS steps (default 300, as the reference)")
    p.add_argument("--precision", default="float32", choices=("float32", "float64"),
                   help="arithmetic of the torch reference and of jax_torch_lbfgs (default float32, the published one)")
    p.add_argument("--methods", default="torch,torch-lbfgs,default",
                   help="comma-separated subset of torch, torch-lbfgs, default (default: all three)")
    p.add_argument("--torch-threads", type=positive_int, default=None,
                   help="torch.set_num_threads for the reference (default: torch's own choice, all cores). On a "
                        "machine shared with other jobs use 1: busy cores starve torch's OpenMP threads (10x+ slower)")
    p.add_argument("--seed", type=int, default=1234, help="torch.manual_seed of the reference, and dlg_jax's seeds (1234)")
    p.add_argument("--threshold", type=float, default=30.0, help="PSNR (dB) counted as a successful attack (30)")
    p.add_argument("--out", required=True, help="output directory")
    return p


def parse_methods(text: str) -> list[str]:
    chosen = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in chosen if t not in METHOD_FLAGS]
    if unknown or not chosen:
        raise UsageError(f"--methods {text!r}: choose from {', '.join(METHOD_FLAGS)}")
    return [METHOD_FLAGS[t] for t in chosen]


def load(args, indices: list[int]) -> data_lib.Dataset:
    """The images to attack, in the order of `indices`."""
    if args.data:
        dataset = data_lib.load_npz(args.data)
        dataset.check_indices(indices)
        return data_lib.Dataset(dataset.images[indices], dataset.labels[indices], dataset.label_names, dataset.source)
    try:
        return data_lib.load_tfds(args.dataset, args.split, indices, args.tfds_dir)
    except KeyError as error:  # tfds on a dataset that was never prepared: "splits is empty"
        raise UsageError(f"tfds {args.dataset}[{args.split}]: {error.args[0] if error.args else error}; "
                         "pass --data FILE.npz (keys images, labels) instead") from None


# ----------------------------------------------------------------------------------------------------------
# The attacks


class JaxTorchLBFGS:
    """Preset `reference` (dlg_jax's torch-lbfgs attack) run by TorchLBFGS from the reference's weights and dummy;
    compiled once."""

    def __init__(self, image_shape, num_classes: int, steps: int, precision: str):
        import jax

        from dlg_jax.config import get_config
        from dlg_jax.engine.attack import make_attack, make_case, make_problem, precision_scope
        from dlg_jax.solvers.torch_lbfgs import make_torch_lbfgs_runner

        self.config = config = get_config("reference").override(steps=steps, precision=precision)
        self.dtype = config.dtype
        with precision_scope(config):  # the weights are the torch net's, passed at each call
            attack = make_attack(make_case("lenet", num_classes, image_shape, 0, config.dtype), config, batch_size=1)
        rules = config.rules
        runner = make_torch_lbfgs_runner(lambda z, problem, params: attack.objective(z, 0.0, problem, params),
                                         rules.steps, max_iter=rules.iterations_per_step,
                                         max_eval=rules.step_evaluations, history_size=config.solver.history_size)

        def run(z0, params, pixels, labels):
            client = attack._replace(case=attack.case._replace(params=params))
            problem = make_problem(client, pixels, labels, 0)  # the shared gradient (its own dummy is not used)
            return runner(z0, problem, params)

        self.attack = attack
        self._attack = jax.jit(run)
        self.compile_seconds = None

    def __call__(self, image_uint8: np.ndarray, label: int, net, dummy_image, dummy_label) -> dict:
        import jax
        import jax.numpy as jnp

        from dlg_jax.engine.attack import precision_scope
        from dlg_jax.reference import nchw_to_nhwc, torch_to_flax

        layout = self.attack.layout
        with precision_scope(self.config):
            params = jax.tree.map(lambda a: jnp.asarray(a, self.dtype), torch_to_flax(net))
            pixels = jnp.asarray(image_uint8[None], self.dtype) / 255.0
            labels = jnp.asarray([label], jnp.int32)
            z0 = layout.ravel({"inputs": jnp.asarray(nchw_to_nhwc(dummy_image), self.dtype),
                               "label_logits": jnp.asarray(dummy_label.numpy(), self.dtype)})
            compile_seconds = 0.0
            if self.compile_seconds is None:
                start = time.perf_counter()
                self._attack = self._attack.lower(z0, params, pixels, labels).compile()
                compile_seconds = self.compile_seconds = time.perf_counter() - start
            start = time.perf_counter()
            result = jax.block_until_ready(self._attack(z0, params, pixels, labels))
            seconds = time.perf_counter() - start
            best = layout.unravel(result.x)
        return dict(reconstruction=np.asarray(self.attack.inputs(result.x), np.float64),
                    label_pred=int(np.argmax(np.asarray(best["label_logits"]))),
                    evaluations=int(result.state.num_fun_eval), seconds=seconds, grad_distance=float(result.value),
                    compile_seconds=compile_seconds)


class JaxDefault:
    """`python -m dlg_jax.run`'s attack of one image: preset `dlg`, LeNet with weights from `model_seed`."""

    def __init__(self, image_shape, num_classes: int, steps: int, model_seed: int):
        from dlg_jax.config import get_config
        from dlg_jax.engine.attack import make_case, precision_scope

        self.config = get_config("dlg").override(steps=steps)
        with precision_scope(self.config):
            self.case = make_case("lenet", num_classes, image_shape, model_seed, self.config.dtype)

    def __call__(self, image_uint8: np.ndarray, label: int, seed: int) -> dict:
        from dlg_jax.engine.single import attack_one as dlg_jax_attack

        out, _ = dlg_jax_attack(self.case, self.config, image_uint8[None], np.asarray([label]), seed,
                                snapshot_every=self.config.rules.steps)
        return dict(reconstruction=out.reconstruction, label_pred=int(out.label_pred[0]), evaluations=out.evaluations,
                    seconds=out.seconds, grad_distance=out.grad_distance, compile_seconds=out.compile_seconds,
                    status=out.status)


def _warm_up_torch(net, dummy_image, dummy_label) -> None:
    """One uncounted, untimed evaluation, so that torch's one-off kernel set-up is not timed as the attack."""
    from dlg_jax.reference.torch_dlg import gradient_distance, shared_gradient

    data, label = dummy_image.clone().requires_grad_(True), dummy_label.clone().requires_grad_(True)
    gradient_distance(net, data, label, shared_gradient(net, data.detach(), label.detach().softmax(-1))).backward()
    net.zero_grad(set_to_none=True)


def attack_one(image_uint8: np.ndarray, label: int, num_classes: int, methods: Sequence[str], args,
               jax_torch: JaxTorchLBFGS | None, jax_default: JaxDefault | None = None) -> dict:
    """All chosen attacks on one image: {method: outcome}."""
    outcomes = {}
    if "torch" in methods or "jax_torch_lbfgs" in methods:
        import torch

        from dlg_jax.reference import labels_to_torch, nhwc_to_nchw, reference_setup, torch_dlg

        dtype = torch.float64 if args.precision == "float64" else torch.float32
        net, dummy_image, dummy_label = reference_setup(image_uint8.shape, num_classes, args.seed, dtype)
        if "torch" in methods:
            pixels = nhwc_to_nchw(image_uint8[None] / 255.0, dtype)
            _warm_up_torch(net, dummy_image, dummy_label)
            out = torch_dlg(net, pixels, labels_to_torch([label], num_classes, dtype), dummy_image, dummy_label,
                            steps=args.steps)
            outcomes["torch"] = dict(reconstruction=out["reconstruction"], label_pred=int(out["label_pred"][0]),
                                     evaluations=out["evaluations"], seconds=out["seconds"],
                                     grad_distance=out["grad_distance"], final_reconstruction=out["final_reconstruction"])
        if "jax_torch_lbfgs" in methods:
            outcomes["jax_torch_lbfgs"] = jax_torch(image_uint8, label, net, dummy_image, dummy_label)
    if "jax_default" in methods:
        if jax_default is None:
            jax_default = JaxDefault(image_uint8.shape, num_classes, args.steps, model_seed=args.seed)
        outcomes["jax_default"] = jax_default(image_uint8, label, args.seed)
    return outcomes


def psnr(truth: np.ndarray, reconstruction: np.ndarray) -> float:
    from dlg_jax.results.metrics import image_metrics

    return float(image_metrics(truth, reconstruction)["psnr"][0])


def row_of(index: int, image_uint8: np.ndarray, label: int, outcomes: dict) -> dict:
    truth = image_uint8[None] / 255.0
    row = {k: "" for k in FIELDS}
    row.update(index=index, label=label)
    for method, out in outcomes.items():
        row.update({f"{method}_psnr": f"{psnr(truth, out['reconstruction']):.3f}",
                    f"{method}_label_ok": int(out["label_pred"] == label),
                    f"{method}_evaluations": out["evaluations"],
                    f"{method}_seconds": f"{out['seconds']:.3f}",
                    f"{method}_grad_distance": f"{out['grad_distance']:.6g}"})
    if "torch" in outcomes:
        row["torch_final_psnr"] = f"{psnr(truth, outcomes['torch']['final_reconstruction']):.3f}"
    for method in ("jax_torch_lbfgs", "jax_default"):
        if method in outcomes:
            row[f"{method}_compile_seconds"] = f"{outcomes[method]['compile_seconds']:.2f}"
    if "jax_default" in outcomes:
        row["jax_default_status"] = outcomes["jax_default"]["status"]
    return row


# ----------------------------------------------------------------------------------------------------------
# Reports


def column(rows: list[dict], key: str) -> np.ndarray:
    return np.asarray([float(r[key]) if r.get(key, "") != "" else math.nan for r in rows])


def summary(rows: list[dict], methods: Sequence[str], threshold: float) -> list[dict]:
    torch_seconds = np.nanmedian(column(rows, "torch_seconds")) if "torch" in methods else math.nan
    torch_total = np.nansum(column(rows, "torch_seconds")) if "torch" in methods else math.nan
    out = []
    for m in methods:
        p, seconds = column(rows, f"{m}_psnr"), column(rows, f"{m}_seconds")
        out.append(dict(
            method=m, images=len(rows), successes=int(np.sum(p >= threshold)),
            success_rate=float(np.mean(p >= threshold)), median_psnr=float(np.nanmedian(p)),
            label_accuracy=float(np.nanmean(column(rows, f"{m}_label_ok"))),
            median_evaluations=float(np.nanmedian(column(rows, f"{m}_evaluations"))),
            median_seconds=float(np.nanmedian(seconds)), total_seconds=float(np.nansum(seconds)),
            speedup_median=float(torch_seconds / np.nanmedian(seconds)),
            speedup_total=float(torch_total / np.nansum(seconds)),
        ))
    return out


def write_markdown(path: Path, rows: list[dict], methods: Sequence[str], args, source: str) -> None:
    stats = summary(rows, methods, args.threshold)
    lines = [
        "# DLG: PyTorch reference vs dlg_jax", "",
        f"{len(rows)} images from {source}, {args.steps} steps, reference precision {args.precision}, seed {args.seed}, "
        f"torch threads {args.torch_threads or 'default'}. "
        f"Success: PSNR >= {args.threshold:g} dB. Seconds exclude compilation; speedup = torch seconds / method seconds.",
        "", "## Summary", "",
        "| method | success | median PSNR (dB) | label accuracy | median evaluations | median s | total s | "
        "speedup (median) | speedup (total) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in stats:
        lines.append(f"| {s['method']} | {s['successes']}/{s['images']} ({100 * s['success_rate']:.0f}%) | "
                     f"{s['median_psnr']:.2f} | {100 * s['label_accuracy']:.0f}% | {s['median_evaluations']:.0f} | "
                     f"{s['median_seconds']:.2f} | {s['total_seconds']:.1f} | {s['speedup_median']:.2f}x | "
                     f"{s['speedup_total']:.2f}x |")
    if "torch" in methods:
        final = column(rows, "torch_final_psnr")
        lines += ["", f"torch's final iterate (what the published script shows): {int(np.sum(final >= args.threshold))}"
                      f"/{len(rows)} successes, median PSNR {np.nanmedian(final):.2f} dB."]
    head = ["index", "label"] + [f"{m} PSNR / label / evals / s" for m in methods]
    lines += ["", "## Per image", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["index"]), str(r["label"])]
        for m in methods:
            ok = "ok" if str(r[f"{m}_label_ok"]) == "1" else "wrong"
            cells.append(f"{float(r[f'{m}_psnr']):.2f} / {ok} / {r[f'{m}_evaluations']} / {float(r[f'{m}_seconds']):.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(path: Path, rows: list[dict], methods: Sequence[str], threshold: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    positions = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.22 * len(rows) + 2), 3.6))
    for m, marker in zip(methods, "os^"):
        ax.plot(positions, column(rows, f"{m}_psnr"), marker=marker, linestyle="none", label=m, alpha=0.8)
    ax.axhline(threshold, color="gray", linestyle="--", linewidth=0.8, label=f"{threshold:g} dB")
    ax.set_xticks(positions, [str(r["index"]) for r in rows], fontsize=6, rotation=90)
    ax.set_xlabel("image index")
    ax.set_ylabel("PSNR (dB)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        indices = parse_range(args.indices)
        methods = parse_methods(args.methods)
        if {"torch", "jax_torch_lbfgs"} & set(methods):
            try:
                import dlg_jax.reference  # noqa: F401
            except ImportError as error:
                raise UsageError(f"{error} (or run --methods default)") from None
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out}: exists and is not a directory")
        dataset = load(args, indices)
    except UsageError as error:
        return fail(parser.prog, error)

    from tqdm import tqdm

    enable_compilation_cache()
    if args.torch_threads and {"torch", "jax_torch_lbfgs"} & set(methods):
        import torch

        torch.set_num_threads(args.torch_threads)
    methods = [m for m in METHODS if m in methods]
    out.mkdir(parents=True, exist_ok=True)
    jax_torch = None
    if "jax_torch_lbfgs" in methods:
        jax_torch = JaxTorchLBFGS(dataset.image_shape, dataset.num_classes, args.steps, args.precision)
    jax_default = None
    if "jax_default" in methods:
        jax_default = JaxDefault(dataset.image_shape, dataset.num_classes, args.steps, args.seed)
    rows: list[dict] = []
    with open(out / "compare.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, FIELDS)
        writer.writeheader()
        handle.flush()
        try:
            progress = tqdm(list(zip(indices, dataset.images, dataset.labels)), desc="images", unit="image")
            for index, image, label in progress:
                outcomes = attack_one(image, int(label), dataset.num_classes, methods, args, jax_torch, jax_default)
                row = row_of(index, image, int(label), outcomes)
                writer.writerow(row)
                handle.flush()
                rows.append(row)
                progress.set_postfix({m: row[f"{m}_psnr"] for m in methods})
        except KeyboardInterrupt:
            print(f"interrupted: {len(rows)} of {len(indices)} images done, their rows kept", file=sys.stderr)
            return 130
        finally:  # a summary of what finished, even after Ctrl-C
            if rows:
                write_markdown(out / "compare.md", rows, methods, args, dataset.source)
                write_plot(out / "psnr.png", rows, methods, args.threshold)
    print(f"{len(rows)} images -> {out}/compare.csv, compare.md, psnr.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
