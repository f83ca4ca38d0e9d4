"""The text path of `python -m dlg_jax.sweep`: text attacks over sentences x seeds, resumable.

    python -m dlg_jax.sweep --model bert --indices 0:100 --seeds 0,1 --length 16 --out DIR
    python -m dlg_jax.sweep --model bert --data FILE.txt --batch-size 4 --seeds 0 --out DIR

Sentences: pydoc_data samples of --length tokens (dlg_jax.text.corpus.samples; the experiments' set), or the
lines of --data FILE.txt; --indices picks them, --batch-size N attacks N consecutive ones together. A task is
(first index of its batch, seed); the seed starts the optimising presets (the exact reading does not use it)
and the masked LM's masks are drawn from the first index (as dlg_jax.run draws them). Each finished task is
one durable row of DIR/results.jsonl (dlg_jax.results.store.ResultsDir: the same identity check, lock and
crash safety as the image sweeps; rerun the same command to resume), with the text metrics and the recovered
sentences; DIR/summary.json holds their means, the share of sentences at >= 99% token accuracy, and the
attacks per hour. Text attacks run one at a time (no lanes): --processes, --distributed and --defense are
image-sweep flags.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path

import numpy as np

from dlg_jax.errors import UsageError

METRICS = ("token_accuracy", "bag_precision", "bag_recall", "rouge1", "rouge2", "rougeL")


def _sentences(args) -> tuple[list[list[int]], dict]:
    """The token ids of every sentence the sweep may attack, and the source's identity."""
    from dlg_jax.cli.text import encode_all, read_text_file

    if args.data:
        lines, raw = read_text_file(Path(args.data))
        return encode_all(lines), dict(source="txt", sha256=hashlib.sha256(raw).hexdigest(), lines=len(lines))
    from dlg_jax.ranges import parse_range
    from dlg_jax.text.corpus import samples

    wanted = parse_range(args.indices, "--indices")
    try:
        pool = samples(args.length, max(wanted) + 1)
    except ValueError as error:
        raise UsageError(f"--indices: {error}") from None
    return pool, dict(source="pydoc_data", length=args.length)


def text_sweep(args, prog: str) -> int:
    import jax.numpy as jnp

    from dlg_jax.cli.text import text_attack
    from dlg_jax.models import TEXT_MODELS, get_model
    from dlg_jax.ranges import parse_range
    from dlg_jax.results.store import ResultsDir
    from dlg_jax.text.tokenizer import get_tokenizer

    if args.model not in TEXT_MODELS:
        raise UsageError(f"--model {args.model} reads images: a text sweep needs one of {', '.join(TEXT_MODELS)}")
    for flag, given in (("--processes", args.processes > 1), ("--distributed", args.distributed),
                        ("--defense", bool(args.defense)), ("--defense-study", bool(args.defense_study)),
                        ("--checkpoint", bool(args.checkpoint)),
                        ("--restarts", args.restarts != 1)):
        if given:
            raise UsageError(f"{flag} is an image-sweep flag: text attacks run one at a time")
    attack = text_attack(args)
    pool, source = _sentences(args)
    indices = parse_range(args.indices, "--indices")
    bad = [i for i in indices if not 0 <= i < len(pool)]
    if bad:
        raise UsageError(f"--indices: {bad[0]} is outside the {len(pool)} sentences of the source")
    if len(indices) < args.batch_size:
        raise UsageError(f"--indices: {len(indices)} sentence(s), fewer than --batch-size {args.batch_size}")
    seeds = parse_range(args.seeds, "--seeds")
    members = {indices[k]: indices[k:k + args.batch_size]
               for k in range(0, len(indices) - args.batch_size + 1, args.batch_size)}
    precision = args.precision or "float32"
    identity = dict(kind="text", data=source, model=args.model, model_seed=args.model_seed,
                    attack=dataclasses.asdict(attack), precision=precision, batch_size=args.batch_size)
    results = ResultsDir(Path(args.out), identity, provenance=dict(data=args.data or "pydoc_data", out=args.out))
    results.open()
    done = {(r["index"], r["seed"]) for r in results.rows()}
    pending = [(i, s) for i in members for s in seeds if (i, s) not in done]
    if done:
        print(f"{prog}: resuming: {len(done)} done, {len(pending)} to go", flush=True)
    import jax

    with jax.enable_x64(precision == "float64"):
        model = get_model(args.model, get_tokenizer().get_vocab_size(), (64,))
        params = model.init(args.model_seed, jnp.float64 if precision == "float64" else jnp.float32)
        for count, (first, seed) in enumerate(pending, 1):
            row = attack_row(model, params, attack, pool, members[first], first, seed)
            results.append([row], {})
            if not args.quiet:
                print(f"{prog}: {len(done) + count}/{len(done) + len(pending)} sentence {first} seed {seed}: "
                      f"{row['status']}, token accuracy {row['token_accuracy']:.3f}, ROUGE-1 {row['rouge1']:.3f} "
                      f"({row['seconds']:.1f} s)", flush=True)
    summary = summarise(results.rows())
    from dlg_jax.results.files import dumps, write_atomic

    write_atomic(Path(args.out) / "summary.json", dumps(summary, indent=2) + "\n")
    print(f"{prog}: {summary['attacks']} attack(s), {summary['sentences']} sentence(s): token accuracy "
          f"{summary['token_accuracy']:.3f} ({100 * summary['share_99']:.0f}% at >= 99%), ROUGE-1/2/L "
          f"{summary['rouge1']:.3f}/{summary['rouge2']:.3f}/{summary['rougeL']:.3f}, "
          f"{summary['attacks_per_hour']:.0f} attacks/hour -> {args.out}", flush=True)
    return 0


def attack_row(model, params, attack, pool, member, first: int, seed: int) -> dict:
    """One finished task: the attack on the batch of sentences `member`, judged."""
    from dlg_jax.text.attacks import run_attack
    from dlg_jax.text.client import text_client
    from dlg_jax.text.metrics import judge
    from dlg_jax.text.tokenizer import decode, get_tokenizer, mask_id

    pad = get_tokenizer().token_to_id("[PAD]")
    length = max(len(pool[i]) for i in member)
    ids = np.array([list(pool[i]) + [pad] * (length - len(pool[i])) for i in member])
    started = time.perf_counter()
    client = text_client(model, params, ids, mask_id(), mask_seed=first)
    out = run_attack(attack, model, params, client.grads, ids.shape, mask_id(), seed)
    seconds = time.perf_counter() - started
    verdict = judge(ids, out.ids, lambda row: decode([t for t in row if t != pad and t >= 0]))
    return dict(index=first, seed=seed, psnr=None, status=out.method, seconds=seconds,
                compile_seconds=out.compile_seconds, grad_distance=out.distance, iterations=0,
                evaluations=int(out.evaluations), sentences=[int(i) for i in member],
                **{k: verdict[k] for k in METRICS},
                per_sentence=[dict(token_accuracy=s["token_accuracy"], rouge1=s["rouge1"], rouge2=s["rouge2"],
                                   recovered=s["recovered"]) for s in verdict["sentences"]])


def summarise(rows: list[dict]) -> dict:
    """Means over every sentence of every row, the share at >= 99% token accuracy, and the attack rate."""
    sentences = [s for r in rows for s in r.get("per_sentence", [])]
    seconds = [r["seconds"] for r in rows]
    out = dict(attacks=len(rows), sentences=len(sentences),
               share_99=float(np.mean([s["token_accuracy"] >= 0.99 for s in sentences])) if sentences else 0.0,
               median_seconds=float(np.median(seconds)) if seconds else 0.0,
               attacks_per_hour=3600.0 * len(rows) / sum(seconds) if seconds and sum(seconds) > 0 else 0.0,
               methods={m: sum(r["status"] == m for r in rows) for m in sorted({r["status"] for r in rows})})
    for key in METRICS:  # a row holds its batch's means, and every batch has --batch-size sentences
        out[key] = float(np.mean([r[key] for r in rows])) if rows else 0.0
    return out
