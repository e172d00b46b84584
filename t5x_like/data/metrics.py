"""Simple metrics for span-corruption evaluation, in seqio metric_fn form.

Each takes `(targets, predictions)` (equal-length lists of decoded strings, or of
token-id sequences) and returns `{name: value}` with the value a percentage in
[0, 100], as T5's metrics do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

_SENTINEL = re.compile(r"<extra_id_\d+>")


def _check_lengths(targets: Sequence, predictions: Sequence) -> None:
    if len(targets) != len(predictions):
        raise ValueError(
            f"got {len(targets)} targets but {len(predictions)} predictions; "
            "they must pair up one to one")


def _tokens(x: str | Sequence[int] | np.ndarray) -> list:
    """Whitespace tokens of a string, or the ids of a token sequence."""
    if isinstance(x, (str, bytes)):
        return (x.decode("utf-8") if isinstance(x, bytes) else x).split()
    return list(np.asarray(x).reshape(-1).tolist())


def sequence_accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
    """Percentage of predictions that equal their target exactly.

    Strings are compared after stripping surrounding whitespace.
    """
    _check_lengths(targets, predictions)
    if not targets:
        return {"sequence_accuracy": 0.0}
    hits = [
        (t.strip() == p.strip()) if isinstance(t, str) and isinstance(p, str)
        else _tokens(t) == _tokens(p)
        for t, p in zip(targets, predictions, strict=True)
    ]
    return {"sequence_accuracy": 100.0 * float(np.mean(hits))}


def token_accuracy(targets: Sequence, predictions: Sequence) -> dict[str, float]:
    """Percentage of target tokens predicted at their position (micro-averaged).

    Tokens are whitespace-separated words for strings and ids for id sequences;
    a prediction longer than its target is not rewarded for the extra tokens but
    counts them as errors (the denominator is the longer of the two).
    """
    _check_lengths(targets, predictions)
    correct = total = 0
    for t, p in zip(targets, predictions, strict=True):
        t_tokens, p_tokens = _tokens(t), _tokens(p)
        correct += sum(a == b for a, b in zip(t_tokens, p_tokens, strict=False))
        total += max(len(t_tokens), len(p_tokens))
    return {"token_accuracy": 100.0 * correct / total if total else 0.0}


def _spans(text: str) -> list[str]:
    """The spans of a span-corruption target, '<extra_id_0> a b<extra_id_1> c' ->
    ['a b', 'c'] (a text without sentinels is one span)."""
    parts = [" ".join(s.split()) for s in _SENTINEL.split(text)]
    if _SENTINEL.search(text) and not parts[0]:
        parts = parts[1:]  # the text before the first sentinel
    return parts


def span_accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Percentage of the targets' sentinel-delimited spans predicted exactly.

    Spans are matched by position (the k-th span after `<extra_id_k>`); missing
    predicted spans count as wrong.
    """
    _check_lengths(targets, predictions)
    correct = total = 0
    for t, p in zip(targets, predictions, strict=True):
        t_spans, p_spans = _spans(t), _spans(p)
        correct += sum(a == b for a, b in zip(t_spans, p_spans, strict=False))
        total += len(t_spans)
    return {"span_accuracy": 100.0 * correct / total if total else 0.0}


SPAN_CORRUPTION_METRICS = (sequence_accuracy, token_accuracy, span_accuracy)
