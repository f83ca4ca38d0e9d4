"""A WordPiece tokenizer (`tokenizers`) whose vocabulary is chosen here, in memory, from the pydoc_data text.

Why WordPiece: it is what BERT uses, so the attacked gradient has the structure the paper attacked, and an
unseen word is split into known pieces instead of becoming [UNK] -- the demo's "Thirty-Third" or "NeurIPS"
never occur in Python's documentation, yet they tokenize. A word-level vocabulary would make every new word
an error; a byte-level BPE (GPT-2's) would tokenize it too, but into byte soup that reads badly in a table.
Text is lower-cased and accents stripped (BERT uncased); only characters absent from the training text become
[UNK], and they are refused with their names (`encode`).

Why not `tokenizers`' own WordPieceTrainer: it breaks frequency ties in hash order, so two trainings in one
process gave vocabularies differing in 8-20 tokens (measured). The vocabulary is therefore ranked here, with
ties broken by the string: the special tokens, every character (alone and as a ##continuation), then the
most frequent words (VOCAB_WORDS), then word-initial pieces and ##continuations of 2-8 characters by
frequency. The library does the rest: normalisation, pre-tokenization, greedy longest-match encoding, decoding.
Building it takes about a second and is cached per process.
"""

from __future__ import annotations

import collections
import functools

from dlg_jax.errors import UsageError

SPECIAL = ("[PAD]", "[UNK]", "[MASK]")
VOCAB_SIZE = 4096
VOCAB_WORDS = 2800  # whole words; the rest of the vocabulary is pieces


def _pipeline():
    from tokenizers import normalizers, pre_tokenizers

    return normalizers.BertNormalizer(lowercase=True, strip_accents=True), pre_tokenizers.BertPreTokenizer()


def build_vocab(text: str, size: int = VOCAB_SIZE, words: int = VOCAB_WORDS) -> dict[str, int]:
    """The vocabulary (module doc), deterministic: every ranking breaks ties by the string."""
    normalizer, pre = _pipeline()
    counts = collections.Counter()
    for line in text.splitlines():
        counts.update(w for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(line)))
    ranked = lambda counter: [k for k, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]  # noqa: E731
    chars = sorted({c for w in counts for c in w})
    vocab = list(SPECIAL) + chars + ["##" + c for c in chars]
    taken = set(vocab)
    for w in ranked(counts)[:words]:
        if w not in taken:
            vocab.append(w)
            taken.add(w)
    pieces = collections.Counter()
    for w, c in counts.items():
        for k in range(2, min(len(w), 9)):
            pieces[w[:k]] += c
            pieces["##" + w[-k:]] += c
    for piece in ranked(pieces):
        if len(vocab) >= size:
            break
        if piece not in taken:
            vocab.append(piece)
            taken.add(piece)
    return {token: i for i, token in enumerate(vocab)}


@functools.lru_cache(maxsize=None)
def get_tokenizer(vocab_size: int = VOCAB_SIZE):
    """The `tokenizers.Tokenizer` over `build_vocab(pydoc_data text)` (cached per process)."""
    from tokenizers import Tokenizer, decoders, models

    from dlg_jax.text.corpus import corpus_text

    tok = Tokenizer(models.WordPiece(build_vocab(corpus_text(), vocab_size), unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = _pipeline()
    tok.decoder = decoders.WordPiece()
    return tok


def mask_id(tok=None) -> int:
    return (tok or get_tokenizer()).token_to_id("[MASK]")


def encode(text: str, tok=None) -> list[int]:
    """Token ids of `text`; empty text or characters outside the vocabulary are a UsageError naming them."""
    tok = tok or get_tokenizer()
    if not text.strip():
        raise UsageError("empty text: nothing to attack")
    encoding = tok.encode(text)
    unknown = [text[a:b] for (a, b), t in zip(encoding.offsets, encoding.tokens) if t == "[UNK]"]
    if unknown:
        raise UsageError(f"outside the vocabulary: {', '.join(repr(u) for u in unknown)} in {text!r}")
    return encoding.ids


def decode(ids, tok=None) -> str:
    return (tok or get_tokenizer()).decode([int(i) for i in ids], skip_special_tokens=False)


def tokens(ids, tok=None) -> list[str]:
    tok = tok or get_tokenizer()
    return [tok.id_to_token(int(i)) for i in ids]
