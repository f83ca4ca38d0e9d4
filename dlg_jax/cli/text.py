"""The text path of `python -m dlg_jax.run`: `--model bert|gpt` with `--text "..."` or `--data FILE.txt`.

With a text model and no text, the demo: the DLG paper's NeurIPS 2019 call-for-papers sentences
(dlg_jax.text.corpus.DEMO_SENTENCES). Each sentence (or batch of --batch-size sentences, padded with [PAD] to
the longest) is tokenized, the client's gradient computed, the text preset run (default `rows`); printed and
written to --out: result.json (token_accuracy, rouge1, rouge2, rougeL: means over the sentences; per sentence
and per snapshot), table.md and table.png (the decoded text at the chosen iterations, as the paper's Table 2; one
table_K.png per batch when there are several).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from dlg_jax.errors import UsageError

MAX_LEN = 64  # positions of the text models the CLI builds
TABLE_ITERATIONS = (0, 10, 20, 30, 100, 300, 1000, 3000)  # snapshots shown in table.md (the paper: 0, 10, 20, 30)
# Attack flags that mean something to a text attack: flag field -> TextAttack field
TEXT_FIELDS = {"distance": "distance", "optimizer": "optimizer", "learning_rate": "learning_rate",
               "schedule": "schedule", "steps": "iterations"}


def is_text(args) -> bool:
    from dlg_jax.models import TEXT_MODELS
    from dlg_jax.text.attacks import PRESETS

    return args.model in TEXT_MODELS or args.text is not None or args.preset in PRESETS


def text_attack(args):
    """The text preset the flags name, with the attack flags that apply to text given over it."""
    from dlg_jax.cli.common import ATTACK_FLAGS
    from dlg_jax.text.attacks import DEFAULT, PRESETS, get_attack

    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(f"--preset {args.preset} is an image preset: with a text model choose from {', '.join(PRESETS)}")
    attack = get_attack(args.preset or DEFAULT)
    changes = {}
    for flag, field, _, _ in ATTACK_FLAGS:
        value = getattr(args, field)
        if value is None:
            continue
        if field == "precision":
            continue
        if field not in TEXT_FIELDS:
            raise UsageError(f"{flag} does not apply to text attacks (they take --steps, --distance, --optimizer, "
                             "--learning-rate, --schedule, --precision)")
        changes[TEXT_FIELDS[field]] = value
    if args.signed:
        raise UsageError("--signed does not apply to text attacks")
    if changes.get("optimizer") not in (None, "lbfgs", "adam"):
        raise UsageError(f"--optimizer {changes['optimizer']}: text attacks take lbfgs or adam")
    return dataclasses.replace(attack, **changes)


def read_text_file(path: Path) -> tuple[list[str], bytes]:
    """The non-empty lines (stripped) of a .txt file of sentences, one a line, and the file's bytes."""
    if path.suffix.lower() != ".txt":
        raise UsageError(f"--data {path}: a text model reads a .txt file, one sentence a line")
    try:
        raw = path.read_bytes()
        lines = [line.strip() for line in raw.decode("utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--data {path}: {getattr(error, 'strerror', None) or error}") from None
    lines = [line for line in lines if line]
    if not lines:
        raise UsageError(f"--data {path}: no sentences (one a line)")
    return lines, raw


def read_sentences(args) -> list[str]:
    from dlg_jax.ranges import parse_range
    from dlg_jax.text.corpus import DEMO_SENTENCES

    if args.image:
        raise UsageError(f"--image is an image source: --model {args.model} reads text (--text or --data FILE.txt)")
    if args.text is not None and args.data:
        raise UsageError("--text and --data are exclusive: give one source")
    if args.text is not None:
        return list(args.text)
    if not args.data:
        return list(DEMO_SENTENCES)
    path = Path(args.data)
    lines, _ = read_text_file(path)
    if args.indices is not None:
        wanted = parse_range(args.indices)
        bad = [i for i in wanted if not 0 <= i < len(lines)]
        if bad:
            raise UsageError(f"--indices: {bad[0]} is outside the {len(lines)} lines of {path}")
        lines = [lines[i] for i in wanted]
    return lines


def encode_all(sentences: list[str]) -> list[list[int]]:
    from dlg_jax.text.tokenizer import encode

    out = []
    for sentence in sentences:
        ids = encode(sentence)
        if len(ids) > MAX_LEN:
            raise UsageError(f"{len(ids)} tokens in {sentence[:40]!r}...: the text models hold at most {MAX_LEN}")
        out.append(ids)
    return out


def text_main(args, prog: str) -> int:
    """Run the text attack the flags name; 0, or 2 with one line on stderr for bad input."""
    from dlg_jax.cli.common import fail
    from dlg_jax.cli.run import prepare_out

    try:
        from dlg_jax.models import TEXT_MODELS

        if args.model not in TEXT_MODELS:
            raise UsageError(f"--model {args.model} reads images: text needs one of {', '.join(TEXT_MODELS)}")
        if getattr(args, "checkpoint", None):
            raise UsageError("--checkpoint is for image models (text models start from --model-seed)")
        attack = text_attack(args)
        sentences = read_sentences(args)
        encoded = encode_all(sentences)
        out, _ = prepare_out(args.out)
    except UsageError as error:
        return fail(prog, error)
    import jax

    with jax.enable_x64(args.precision == "float64"):
        return _run(args, attack, sentences, encoded, out)


def _run(args, attack, sentences, encoded, out: Path) -> int:
    import jax.numpy as jnp
    import numpy as np

    from dlg_jax.models import get_model
    from dlg_jax.results.files import dumps, write_atomic
    from dlg_jax.results.plots import save_text_table
    from dlg_jax.text.attacks import run_attack
    from dlg_jax.text.client import text_client
    from dlg_jax.text.corpus import DEMO_NOTE, DEMO_SENTENCES
    from dlg_jax.text.metrics import judge
    from dlg_jax.text.tokenizer import decode, get_tokenizer, mask_id, tokens

    tok = get_tokenizer()
    pad = tok.token_to_id("[PAD]")
    model = get_model(args.model, tok.get_vocab_size(), (MAX_LEN,))
    params = model.init(args.model_seed, jnp.float64 if args.precision == "float64" else jnp.float32)
    batch = max(1, args.batch_size)
    results, tables, figures = [], [], []
    for first in range(0, len(encoded), batch):
        group = encoded[first:first + batch]
        length = max(len(ids) for ids in group)
        ids = np.array([ids + [pad] * (length - len(ids)) for ids in group])
        client = text_client(model, params, ids, mask_id(), mask_seed=first)
        outcome = run_attack(attack, model, params, client.grads, ids.shape, mask_id(), args.seed + first)
        text = lambda row: decode([t for t in row if t != pad and t >= 0])  # noqa: E731
        verdict = judge(ids, outcome.ids, text)
        show = lambda label, row: " ".join(tokens([t for t in row if t >= 0])) if label.startswith("bag") else text(row)  # noqa: E731
        snapshots = [(str(label), [show(str(label), row) for row in seq[verdict["order"]]])
                     for label, seq in outcome.snapshots]
        verdict.update(method=outcome.method, grad_distance=outcome.distance, evaluations=outcome.evaluations,
                       seconds=outcome.seconds, compile_seconds=outcome.compile_seconds, snapshots=snapshots)
        results.append(verdict)
        tables.append(markdown_table(snapshots, [text(row) for row in ids], outcome.method))
        figures.append(table_rows(snapshots, [text(row) for row in ids], outcome.method))
        for s in verdict["sentences"]:
            print(f"{outcome.method}: token accuracy {s['token_accuracy']:.3f}, ROUGE-1/2/L {s['rouge1']:.3f}/"
                  f"{s['rouge2']:.3f}/{s['rougeL']:.3f}: {s['recovered']!r}", flush=True)
    keys = ("token_accuracy", "bag_precision", "bag_recall", "rouge1", "rouge2", "rougeL")
    per_sentence = [s for r in results for s in r["sentences"]]
    summary = {k: float(np.mean([s[k] for s in per_sentence])) for k in keys}
    summary.update(model=args.model, model_seed=args.model_seed, seed=args.seed, preset=attack.name,
                   attack=dataclasses.asdict(attack), precision=args.precision or "float32", batch_size=batch,
                   seconds=sum(r["seconds"] for r in results), compile_seconds=sum(r["compile_seconds"] for r in results),
                   batches=results)
    if sentences == list(DEMO_SENTENCES):
        summary["demo_note"] = DEMO_NOTE
    write_atomic(out / "table.md", "\n\n".join(tables) + "\n")
    for k, (header, rows) in enumerate(figures):  # the same tables as images
        save_text_table(out / ("table.png" if len(figures) == 1 else f"table_{k + 1}.png"), header, rows)
    write_atomic(out / "result.json", dumps(summary, indent=2) + "\n")
    print(f"token accuracy {summary['token_accuracy']:.3f}, ROUGE-1/2/L {summary['rouge1']:.3f}/{summary['rouge2']:.3f}/"
          f"{summary['rougeL']:.3f} over {len(per_sentence)} sentence(s), {summary['seconds']:.2f} s + "
          f"{summary['compile_seconds']:.2f} s compile -> {out}")
    return 0


def table_rows(snapshots, truth, method: str):
    """(header, [(label, texts)]) of the paper's Table 2: the chosen iterations (TABLE_ITERATIONS) or every stage
    of an exact reading, the final text and the truth."""
    chosen = [(label, texts) for label, texts in snapshots
              if not label.isdigit() or int(label) in TABLE_ITERATIONS]
    if snapshots and chosen[-1][0] != snapshots[-1][0]:
        chosen.append(snapshots[-1])
    header = ["stage" if method.startswith("rows") else "iteration"] + [f"sentence {k + 1}" for k in range(len(truth))]
    return header, chosen + [("truth", truth)]


def markdown_table(snapshots, truth, method: str) -> str:
    """| iteration | sentence 1 | ... | (table_rows)."""
    def row(cells):
        return "| " + " | ".join(t.replace("|", "\\|") for t in cells) + " |"

    header, rows = table_rows(snapshots, truth, method)
    return "\n".join([row(header), "|" + "---|" * len(header)] + [row([label, *texts]) for label, texts in rows])


if __name__ == "__main__":
    sys.exit("run it as python -m dlg_jax.run --model bert")
