"""Sentences of real English prose that every Python install carries: the reference topics of the Python
documentation (`pydoc_data.topics`, what `help("if")` prints), split into sentences of 8-24 words.

A paragraph is the text between blank lines, its lines joined; sentences end at . ! or ? before a capital.
Only plain prose is kept: every word letters (with inner ' or -) and at most one trailing , ; : . ! ?,
so code, markup and quoted names (`"__getattr__()"`) are left out. The order is fixed (topics sorted by name).
"""

from __future__ import annotations

import functools
import re

WORD = re.compile(r"^[A-Za-z]+(?:['-][A-Za-z]+)*[,;:.!?]?$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")

# The DLG paper (Zhu et al., 2019, Table 2) shows sentences of the NeurIPS 2019 call for papers. The first is the
# call's opening sentence as the paper prints it; the other two are written in the call's style (not recalled
# verbatim from the paper's table), labelled as such wherever they are shown.
DEMO_SENTENCES = (
    "We invite submissions for the Thirty-Third Annual Conference on Neural Information Processing Systems.",
    "The conference will include invited talks as well as oral and poster presentations of refereed papers.",  # CFP-style
    "Submissions are solicited in all areas of machine learning and neural computation.",  # CFP-style
)
DEMO_NOTE = ("sentence 1: the NeurIPS 2019 call for papers as the DLG paper shows it; sentences 2-3: written in the "
             "call's style (the paper's other two are not reproduced verbatim here)")


def paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for name in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[name]):
            text = " ".join(line.strip() for line in block.splitlines()).strip()
            if text:
                out.append(text)
    return out


def corpus_text() -> str:
    """All of the topics' text, one paragraph a line (what the tokenizer is trained on)."""
    return "\n".join(paragraphs())


@functools.lru_cache(maxsize=None)
def sentences(min_words: int = 8, max_words: int = 24) -> tuple[str, ...]:
    """Plain-prose sentences of min_words..max_words words, in a fixed order, without repeats."""
    seen, out = set(), []
    for paragraph in paragraphs():
        for sentence in SENTENCE_END.split(paragraph):
            words = sentence.split()
            if (min_words <= len(words) <= max_words and all(WORD.match(w) for w in words)
                    and sentence[-1] in ".!?" and sentence not in seen):
                seen.add(sentence)
                out.append(sentence)
    return tuple(out)


def samples(length: int, count: int, tok=None) -> list[list[int]]:
    """`count` token sequences of exactly `length` tokens: a sentence (joined with the ones after it while it is
    shorter than `length` tokens), cut to `length` tokens; consecutive samples do not share sentences."""
    from dlg_jax.text.tokenizer import encode

    pool, out, i = sentences(), [], 0
    while len(out) < count and i < len(pool):
        ids, j = [], i
        while len(ids) < length and j < len(pool):
            ids += encode(pool[j], tok)
            j += 1
        if len(ids) >= length:
            out.append(ids[:length])
        i = j
    if len(out) < count:
        raise ValueError(f"only {len(out)} samples of {length} tokens in pydoc_data (asked for {count})")
    return out
