"""The Python API, for notebooks and scripts: the CLIs' attacks as functions that return results.

    import dlg_jax

    data = dlg_jax.load_npz("../shared/data/cifar100_train_0-49.npz")
    result = dlg_jax.attack(data, index=25)                        # dlg_jax.run --index 25
    result.psnr, result.status, result.reconstruction, result.trace["grad_distance"]
    table = dlg_jax.run_sweep(data, indices=range(8), seeds=[0, 1], out="runs/sweep")   # dlg_jax.sweep
    table.summary["success_rate"], table.rows[0]["psnr"]

Both run exactly what the command lines run (the same presets, flags as keyword arguments: `steps=600`,
`label_strategy="idlg"`, ...) and set up JAX as they do: the persistent compilation cache (a second run skips the
compile), and on CPU one device per core (only possible before JAX's first computation in the process; call
`dlg_jax.setup()` first thing in a notebook to be sure). A sweep with `out` writes and resumes the same results
directory as `python -m dlg_jax.sweep`, so `python -m dlg_jax.report DIR` reads it too. (`run_sweep`, not
`sweep`: `dlg_jax.sweep` is the command line's module, and importing it would shadow a function of that name.)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from dlg_jax.data import Dataset, load_images, load_npz  # noqa: F401  (part of the API)


def setup() -> int:
    """One CPU device per core (before JAX starts its backends; later calls keep what is there) and the
    persistent compilation cache. Returns the number of devices JAX has."""
    from dlg_jax.cli.common import enable_compilation_cache
    from dlg_jax.engine.devices import use_all_cpu_cores

    use_all_cpu_cores()
    enable_compilation_cache()
    import jax

    return len(jax.local_devices())


def make_config(preset: str | None = None, batch_size: int = 1, **overrides):
    """The attack's `AttackConfig`: the preset (default 'dlg', or 'batch' for a batch with no overrides, as
    the CLIs choose) with the keyword overrides applied (`AttackConfig.override`'s names, the CLI flags';
    `label_strategy` is the config's `labels`, since `labels` are the private images' own in this API)."""
    from dlg_jax.config import get_config

    if "label_strategy" in overrides:
        overrides["labels"] = overrides.pop("label_strategy")
    if preset is None:
        preset = "batch" if batch_size >= 2 and not overrides else "dlg"
    return get_config(preset).override(**overrides)


def as_dataset(data, labels=None, label_names: Sequence[str] | None = None, num_classes: int | None = None) -> Dataset:
    """A `Dataset` from one (a loaded npz), or from images: uint8 (N, H, W, C) / (N, H, W), or floats in [0, 1]
    (rounded to uint8, the precision the attacks see), one image without its batch axis too. The classes (the
    model's outputs): `label_names`, else `num_classes`, else 100 for 32x32 colour images (CIFAR-100's, the
    paper's) and 10 otherwise, or more if the labels need it."""
    if isinstance(data, Dataset):
        if labels is not None:
            raise ValueError("labels: a Dataset has its own (labels= names the images' labels; the attack's "
                             "label strategy is label_strategy=)")
        return data
    images = np.asarray(data)
    if images.dtype != np.uint8:
        if not np.all((images >= 0) & (images <= 1)):
            raise ValueError("images: uint8, or floats in [0, 1]")
        images = np.round(images * 255.0).astype(np.uint8)
    if images.ndim == 2 or (images.ndim == 3 and images.shape[-1] in (1, 3)):
        images = images[None]
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images: expected (N, H, W, C), got shape {np.shape(data)}")
    labels = np.full(len(images), -1) if labels is None else np.atleast_1d(np.asarray(labels, np.int64))
    if len(labels) != len(images):
        raise ValueError(f"labels: {len(labels)} for {len(images)} images")
    if label_names is None:
        if num_classes is None:
            num_classes = max(100 if images.shape[1:] == (32, 32, 3) else 10, int(labels.max(initial=0)) + 1)
        label_names = [str(c) for c in range(num_classes)]
    return Dataset(images, labels, tuple(label_names), "python")


@dataclasses.dataclass
class AttackResult:
    """One attack: what it recovered, how well (against the private images), and how it went."""

    reconstruction: np.ndarray  # (N, H, W, C) in [0, 1], matched to `truth`'s order
    truth: np.ndarray  # (N, H, W, C) in [0, 1]
    metrics: dict  # dlg_jax.run's result.json: psnr, ssim, mse, labels, status, D, steps, evaluations, seconds...
    trace: dict  # per step: step, grad_distance, evaluations, psnr
    snapshots: list  # [(step, images (N, H, W, C))]: the dummy every few steps and where it stopped

    @property
    def psnr(self) -> float:
        return self.metrics["psnr"]

    @property
    def status(self) -> str:
        return self.metrics["status"]

    def figure(self):
        """Truth above reconstruction for each image, with the PSNR (a matplotlib figure)."""
        import matplotlib.pyplot as plt  # pyplot here: a notebook displays the figure it returns

        from dlg_jax.results.plots import show_image

        n = len(self.truth)
        fig, axes = plt.subplots(2, n, squeeze=False, figsize=(2.0 * n, 4.2))
        rows = self.metrics.get("images", [self.metrics])
        for k in range(n):
            for ax, image, title in ((axes[0, k], self.truth[k], f"truth: {rows[k]['label_name_true']}"),
                                     (axes[1, k], self.reconstruction[k], f"{rows[k]['psnr']:.1f} dB")):
                show_image(ax, image)
                ax.set_title(title, fontsize=8)
        fig.tight_layout()
        return fig


def attack(data, labels=None, *, index: int | Sequence[int] | None = None, seed: int = 1234,
           preset: str | None = None, model: str = "lenet", model_seed: int = 1234, snapshot_every: int = 10,
           label_names: Sequence[str] | None = None, num_classes: int | None = None, checkpoint: str | None = None,
           defenses: Sequence[str] = (), dp_clip: float = 1.0, dp_steps: int = 1000, dp_rate: float = 0.01,
           dp_delta: float = 1e-5, fedavg_lr: float = 0.01, fedavg_batch: int | None = None,
           **overrides) -> AttackResult:
    """Attack the gradient a client shares for private images, as `python -m dlg_jax.run` does.

    `data`: a `Dataset` (then `index`: one index or a batch's indices) or images (see `as_dataset`); labels
    -1 or None: the model's own prediction; `checkpoint`: the model's weights from that file (dlg_jax.train's)
    instead of `model_seed`; `defenses`: the client's, as `--defense` specs applied in order (one strength
    each), with `dp_*` and `fedavg_*` as the CLI's flags (the result's `metrics` carry them, and epsilon).
    Returns an `AttackResult`."""
    from dlg_jax.cli.common import defense_record, local_training
    from dlg_jax.engine.attack import make_case, precision_scope
    from dlg_jax.engine.single import attack_one
    from dlg_jax.results.judge import judge

    setup()
    dataset = as_dataset(data, labels, label_names, num_classes)
    positions = list(range(len(dataset))) if index is None else list(np.atleast_1d(index).astype(int))
    dataset.check_indices(positions)
    cfg = make_config(preset, len(positions), **overrides)
    flags = _defense_flags(defenses, len(positions), axis=False, dp_clip=dp_clip, dp_steps=dp_steps, dp_rate=dp_rate,
                           dp_delta=dp_delta, fedavg_lr=fedavg_lr, fedavg_batch=fedavg_batch)
    chosen = [(d.name, d.strengths[0]) for d in flags.defenses]
    with precision_scope(cfg):
        case = make_case(model, dataset.num_classes, dataset.image_shape, model_seed, cfg.dtype, checkpoint=checkpoint,
                         defenses=chosen, dp_clip=dp_clip, local=local_training(flags))
    outcome, trace = attack_one(case, cfg, dataset.images[positions], dataset.labels[positions], seed,
                                snapshot_every=snapshot_every)
    truth = dataset.images[positions] / 255.0
    metrics, order = judge(truth, outcome.reconstruction, outcome.label_pred, outcome.label_true, positions,
                           dataset.label_names)
    metrics.update(outcome.result(), **trace.result())
    metrics.update(seed=seed, model=model, model_seed=model_seed, checkpoint=checkpoint, config=cfg.to_dict())
    if chosen:
        metrics.update(defense_record(flags, [n for n, _ in chosen], [v for _, v in chosen]))
    return AttackResult(np.clip(outcome.reconstruction[order], 0.0, 1.0), truth, metrics, metrics["trace"],
                        [(step, images[order]) for step, images in trace.snapshots])


def _defense_flags(specs: Sequence[str], batch_size: int, axis: bool, **options):
    """The CLI's defense flags from keyword arguments, parsed and checked as the CLI checks them (`.defenses`)."""
    import types

    from dlg_jax.cli.common import defenses_from_args

    flags = types.SimpleNamespace(defense=list(specs), **options)
    defenses_from_args(flags, batch_size, axis=axis)
    return flags


@dataclasses.dataclass
class SweepResult:
    """A sweep's rows (the keys of `dlg_jax.sweep`'s results.jsonl) and their summary."""

    rows: list
    summary: dict
    out: Path | None

    def table(self):
        """The rows as a pandas DataFrame, one line per private image (results.csv's columns); needs pandas."""
        import io

        try:
            import pandas as pd
        except ImportError:
            raise ImportError("SweepResult.table() needs pandas (pip install pandas); the rows are in .rows") from None

        from dlg_jax.results.report import csv_text

        return pd.read_csv(io.StringIO(csv_text(self.rows)))


class _InMemory:
    """Where a sweep without `out` keeps its rows (ResultsDir's `append` and `rows`, nothing on disk)."""

    def __init__(self):
        self._rows, self.images = [], {}

    def append(self, rows, images):
        self._rows += rows
        self.images.update(images)

    def rows(self):
        return list(self._rows)


def run_sweep(data, labels=None, *, indices: Iterable[int] | None = None, seeds: Iterable[int] = (1234,),
          restarts: int = 1, lanes: int = 64, batch_size: int = 1, out: str | Path | None = None,
          progress: bool = True, preset: str | None = None, model: str = "lenet", model_seed: int = 1234,
          label_names: Sequence[str] | None = None, num_classes: int | None = None, checkpoint: str | None = None,
          defenses: Sequence[str] = (), dp_clip: float = 1.0, dp_steps: int = 1000, dp_rate: float = 0.01,
          dp_delta: float = 1e-5, fedavg_lr: float = 0.01, fedavg_batch: int | None = None,
          **overrides) -> SweepResult:
    """Many attacks (every index x seed; consecutive `batch_size` indices per gradient) in one compiled program,
    sharded over all local devices, as `python -m dlg_jax.sweep` runs them.

    With `out`, the rows go to that results directory as they finish (resumable: call again to continue; another
    configuration there is refused) and the summary files are written at the end; without it they stay in
    memory. `defenses`: the client's, as `--defense` specs (`["prune:0.01,0.1"]`: a list of strengths is an axis,
    every setting in the same compiled program; rows carry `defense`, and with `out` each setting has its own
    `out/<setting>/`); `dp_*`, `fedavg_*` as the CLI's `--dp-*`, `--fedavg-*`; `adaptive=True` (an override) models them. With defenses the
    summary is a dict setting -> summary. Returns a `SweepResult`."""
    import jax

    from dlg_jax.cli import sweep as cli
    from dlg_jax.engine.attack import make_case, precision_scope
    from dlg_jax.engine.scheduler import Sweep
    from dlg_jax.results import report
    from dlg_jax.cli.common import local_training
    from dlg_jax.results.files import dumps, write_atomic
    from dlg_jax.results.store import ResultsDir

    setup()
    dataset = as_dataset(data, labels, label_names, num_classes)
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    seeds = [int(s) for s in seeds]
    dataset.check_indices(indices)
    cfg = make_config(preset, batch_size, **overrides)
    flags = _defense_flags(defenses, batch_size, axis=True, dp_clip=dp_clip, dp_steps=dp_steps, dp_rate=dp_rate,
                           dp_delta=dp_delta, fedavg_lr=fedavg_lr, fedavg_batch=fedavg_batch)
    parsed = flags.defenses
    with precision_scope(cfg):
        case = make_case(model, dataset.num_classes, dataset.image_shape, model_seed, cfg.dtype, checkpoint=checkpoint,
                         defenses=[(d.name, d.strengths[0]) for d in parsed], dp_clip=dp_clip,
                         local=local_training(flags))
    runner = Sweep(case, cfg, restarts=restarts, batch_size=batch_size)
    identity = cli.sweep_identity(dataset.source, dataset, cfg, model, model_seed, restarts, batch_size,
                                  len(jax.local_devices()), checkpoint)
    provenance = dict(data=dataset.source, out=str(out))

    def results_for(record):
        if out is None:
            return _InMemory()
        if record is None:
            return ResultsDir(Path(out), identity, provenance=provenance)
        return ResultsDir(Path(out) / record["defense"], dict(identity, defense=record), provenance=provenance)

    route = cli.defended_route(flags, results_for) if parsed else {None: (results_for(None), {})}
    members = cli.batches(indices, batch_size)
    pending = []
    for strengths, (results, _) in route.items():
        if out is not None:
            results.open()  # locked until close(): a second sweep in `out` meanwhile is refused
        done = {(r["index"], r["seed"]) for r in results.rows()}
        pending += [(i, s, strengths) for i in members for s in seeds if (i, s) not in done]
    options = dataclasses.make_dataclass("Options", ["quiet", "lanes"])(quiet=not progress, lanes=lanes)
    cli._run(options, runner, dataset, {i: i for i in indices}, members, pending, route)
    rows, summaries = [], {}
    for results, record in route.values():
        mine = sorted(results.rows(), key=lambda r: (r["index"], r["seed"]))
        if out is not None:
            summaries[record.get("defense")] = report.write(results.path, mine, results.identity)
            results.close()
        else:
            summaries[record.get("defense")] = report.summarise(mine)
        rows += mine
    if parsed and out is not None:
        lines = cli.defended_summary(route, summaries, [d.name for d in parsed], len(members), len(seeds), cfg.adaptive)
        write_atomic(Path(out) / "summary.md", "\n".join(lines) + "\n")
        write_atomic(Path(out) / "settings.json", dumps([record for _, record in route.values()], indent=2) + "\n")
    summary = summaries if parsed else summaries[None]
    return SweepResult(rows, summary, Path(out) if out is not None else None)


__all__ = ["AttackResult", "Dataset", "SweepResult", "as_dataset", "attack", "make_config", "load_images", "load_npz",
           "run_sweep", "setup"]
