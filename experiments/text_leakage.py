"""Deep leakage on language models, measured: token-wise recovery of pydoc_data sentences from the gradient.

    nice python experiments/text_leakage.py                       # every row of the table (CPU: ~20 min)
    nice python experiments/text_leakage.py --only bert-16 gpt-16 # some rows

Each row: a random-init text model (seed 0; vocabulary 4096, 2 layers x 64, 64 positions), the client's shared
gradient of `count` samples of `length` tokens from pydoc_data (dlg_jax.text.corpus.samples; the masked LM's
mask drawn per sample), attacked with a text preset. Writes experiments/results/text_leakage.md (the table)
and text_leakage.jsonl (one line per sample). Time per sample is the median wall time after the first
sample; compile is the first call's compile (measured inside the attack) and reported apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name: (model, preset, length, batch, samples, attack overrides)
ROWS = {
    "bert-16": ("bert", "rows", 16, 1, 100, {}),
    "bert-32": ("bert", "rows", 32, 1, 100, {}),
    "gpt-16": ("gpt", "rows", 16, 1, 100, {}),
    "gpt-32": ("gpt", "rows", 32, 1, 100, {}),
    "bert-16-batch4": ("bert", "rows", 16, 4, 10, {}),
    "bert-16-batch8": ("bert", "rows", 16, 8, 2, {}),
    "bert-16-lamp-cos": ("bert", "lamp-cos", 16, 1, 10, {}),
    "bert-16-tag": ("bert", "tag", 16, 1, 10, {}),
    "bert-16-dlg-text": ("bert", "dlg-text", 16, 1, 10, {}),
    "bert-tied-16": ("bert-tied", "rows", 16, 1, 10, {}),
}


def run_row(name: str, log) -> dict:
    import jax.numpy as jnp

    from dlg_jax.models import get_model
    from dlg_jax.text.attacks import get_attack, run_attack
    from dlg_jax.text.client import text_client
    from dlg_jax.text.corpus import samples
    from dlg_jax.text.metrics import judge
    from dlg_jax.text.tokenizer import decode, get_tokenizer, mask_id

    model_name, preset, length, batch, count, changes = ROWS[name]
    model = get_model(model_name, get_tokenizer().get_vocab_size(), (64,))
    params = model.init(0, jnp.float32)
    attack = dataclasses.replace(get_attack(preset), **changes)
    pool = samples(length, count * batch)
    per, walls, compiles, methods = [], [], [], {}
    for k in range(count):
        ids = np.array(pool[k * batch:(k + 1) * batch])
        started = time.perf_counter()
        client = text_client(model, params, ids, mask_id(), mask_seed=k * batch)
        out = run_attack(attack, model, params, client.grads, ids.shape, mask_id(), seed=k)
        walls.append(time.perf_counter() - started)
        compiles.append(out.compile_seconds)
        verdict = judge(ids, out.ids, decode)
        methods[out.method] = methods.get(out.method, 0) + 1
        for s in verdict["sentences"]:
            per.append(s)
        log.write(json.dumps(dict(row=name, sample=k, method=out.method, distance=out.distance, wall=walls[-1],
                                  compile=out.compile_seconds, **{m: verdict[m] for m in (
                                      "token_accuracy", "rouge1", "rouge2", "rougeL")},
                                  recovered=[s["recovered"] for s in verdict["sentences"]])) + "\n")
        log.flush()
        print(f"{name} {k}: {out.method} acc {verdict['token_accuracy']:.3f} R1 {verdict['rouge1']:.3f} "
              f"R2 {verdict['rouge2']:.3f} {walls[-1]:.2f} s", flush=True)
    acc = np.array([s["token_accuracy"] for s in per])
    return dict(row=name, model=model_name, preset=preset, length=length, batch=batch, samples=count,
                sentences=len(per), token_accuracy=float(acc.mean()), share_99=float(np.mean(acc >= 0.99)),
                rouge1=float(np.mean([s["rouge1"] for s in per])), rouge2=float(np.mean([s["rouge2"] for s in per])),
                rougeL=float(np.mean([s["rougeL"] for s in per])),
                bag_recall=float(np.mean([s["bag_recall"] for s in per])),
                median_s=float(np.median(walls[1:] if len(walls) > 1 else walls)), first_s=walls[0],
                compile_s=compiles[0], methods=methods)


def table(results: list[dict], command: str) -> str:
    lines = [
        "# Deep leakage on language models: measured",
        "",
        f"`{command}` (experiments/text_leakage.py) on {platform.machine()} CPU, 2 cores shared with other jobs "
        "(`nice`): times are upper bounds. Random-init models (seed 0): vocabulary 4096 (WordPiece built from "
        "pydoc_data), 2 layers x 64, 4 heads, 64 positions, untied head unless `-tied`; float32. Samples: "
        "`dlg_jax.text.corpus.samples(length, n)`, sentences of pydoc_data cut to `length` tokens (shorter ones "
        "joined with the next). A masked-LM client masks 15% of the positions. Batch rows: ROUGE matched by "
        "minimum-cost assignment.",
        "",
        "| row | model | preset | tokens | batch | sentences | token acc. | acc. >= 99% | ROUGE-1 | ROUGE-2 | "
        "ROUGE-L | bag recall | median s / sample | compile s | path taken |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        methods = ", ".join(f"{k} {v}" for k, v in r["methods"].items())
        lines.append(f"| {r['row']} | {r['model']} | {r['preset']} | {r['length']} | {r['batch']} | {r['sentences']} | "
                     f"{r['token_accuracy']:.3f} | {100 * r['share_99']:.0f}% | {r['rouge1']:.3f} | {r['rouge2']:.3f} | "
                     f"{r['rougeL']:.3f} | {r['bag_recall']:.3f} | {r['median_s']:.2f} | {r['compile_s']:.1f} | "
                     f"{methods} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "text_leakage"))
    args = parser.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = out.with_suffix(".summary.jsonl")
    done = {}
    if summary.exists():  # rows measured before (another --only run) stay in the table
        for line in summary.read_text().splitlines():
            r = json.loads(line)
            done[r["row"]] = r
    with open(out.with_suffix(".jsonl"), "a") as log:
        for name in args.only:
            done[name] = run_row(name, log)
            summary.write_text("".join(json.dumps(done[k]) + "\n" for k in ROWS if k in done))
    command = "nice python experiments/text_leakage.py" + ("" if args.only == list(ROWS) else " --only " + " ".join(args.only))
    out.with_suffix(".md").write_text(table([done[k] for k in ROWS if k in done], command))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
