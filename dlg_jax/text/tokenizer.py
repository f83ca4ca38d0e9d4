"""A WordPiece tokenizer trained here, in memory, on the pydoc_data text (`tokenizers`; about a second).

Why WordPiece: it is what BERT uses, so the attacked gradient has the structure the paper attacked, and an
unseen word is split into known pieces instead of becoming [UNK] -- the demo's "Thirty-Third" or "NeurIPS"
never occur in Python's documentation, yet they tokenize. A word-level vocabulary would make every new word
an error; a byte-level BPE (GPT-2's) would too, less visibly, as token soup. Text is lower-cased and accents
stripped (BERT uncased); only characters absent from the training text become [UNK], and they are refused
with their names (`encode`). Training is deterministic (the same vocabulary on every run, checked by a test).
"""

from __future__ import annotations

import functools

from dlg_jax.errors import UsageError

SPECIAL = ("[PAD]", "[UNK]", "[MASK]")
VOCAB_SIZE = 4096


@functools.lru_cache(maxsize=None)
def get_tokenizer(vocab_size: int = VOCAB_SIZE):
    """The trained `tokenizers.Tokenizer` (cached per process)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    from dlg_jax.text.corpus import corpus_text

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False)
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
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
