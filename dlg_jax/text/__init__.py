"""Deep leakage on language models (the DLG paper's third experiment): sentences, a tokenizer, the client's
gradient, attacks that recover tokens from it, decoding and metrics. One concept per module:

- corpus: real English sentences from Python's own documentation (`pydoc_data.topics`), and the paper's demo.
- tokenizer: a WordPiece vocabulary trained here on that text (`tokenizers`).
- leakage: what the shared gradient gives away exactly (the bag of tokens, the masked labels, the order).
- attacks: the presets (`dlg-text`, the paper's; `tag`, `lamp-cos`; `rows`, the default) as pure functions.
- decode, metrics: embeddings -> tokens respecting the embedding LayerNorm; token accuracy, bag, ROUGE.
"""
