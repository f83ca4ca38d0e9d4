"""How much of the private text came back: token accuracy, bag precision/recall, ROUGE-1/2/L, batches matched.

- token accuracy: the fraction of positions holding the right token, in order.
- bag precision / recall: the recovered tokens as a multiset against the true one.
- ROUGE-1/2/L F-measures of Google's `rouge-score` on the decoded texts (no stemming), in [0, 1]. Its default
  tokenizer keeps only [a-z0-9] words, so ROUGE is about words, token accuracy about WordPiece tokens.
- a batch is judged after matching recovered sentences to true ones by minimum cost (1 - ROUGE-1), by
  scipy's linear_sum_assignment (the Hungarian method).
"""

from __future__ import annotations

import collections
import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)


def rouge(reference: str, candidate: str) -> dict[str, float]:
    s = _scorer().score(reference, candidate)
    return {k: float(v.fmeasure) for k, v in s.items()}


def token_accuracy(truth, recovered) -> float:
    truth, recovered = np.asarray(truth), np.asarray(recovered)
    return float(np.mean(truth == recovered))


def bag_scores(truth, recovered) -> tuple[float, float]:
    t, r = collections.Counter(map(int, truth)), collections.Counter(map(int, recovered))
    common = sum((t & r).values())
    return common / max(sum(r.values()), 1), common / max(sum(t.values()), 1)


def match(truth_texts, recovered_texts) -> np.ndarray:
    """order[k]: the recovered sentence matched to truth k (minimum total 1 - ROUGE-1)."""
    from scipy.optimize import linear_sum_assignment

    cost = np.array([[1.0 - rouge(t, r)["rouge1"] for r in recovered_texts] for t in truth_texts])
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


def judge(truth_ids, recovered_ids, decode) -> dict:
    """Metrics of a batch (N, L) of token ids; `decode` maps ids to text. Per sentence and their means."""
    truth_texts = [decode(t) for t in truth_ids]
    rec_texts = [decode(r) for r in recovered_ids]
    order = match(truth_texts, rec_texts) if len(truth_ids) > 1 else np.array([0])
    sentences = []
    for k, j in enumerate(order):
        precision, recall = bag_scores(truth_ids[k], recovered_ids[j])
        sentences.append(dict(truth=truth_texts[k], recovered=rec_texts[j],
                              token_accuracy=token_accuracy(truth_ids[k], recovered_ids[j]),
                              bag_precision=precision, bag_recall=recall, **rouge(truth_texts[k], rec_texts[j])))
    keys = ("token_accuracy", "bag_precision", "bag_recall", "rouge1", "rouge2", "rougeL")
    out = {k: float(np.mean([s[k] for s in sentences])) for k in keys}
    out["sentences"] = sentences
    out["order"] = [int(j) for j in order]
    return out
