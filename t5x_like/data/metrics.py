"""Simple metrics for span-corruption and classification evaluation, in seqio
metric_fn form.

Each takes `(targets, predictions)` (equal-length lists of decoded strings, of
token-id sequences, or of class ids for `classification_accuracy`) and returns
`{name: value}` with accuracies a percentage in [0, 100], as T5's metrics do.
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


# ------------------------------------------------------------------ classification


def classification_accuracy(targets: Sequence[int], predictions: Sequence[int],
                            label_names: Sequence[str] | None = None) -> dict[str, float]:
    """Accuracy of predicted class ids, with each class's count and accuracy.

    Returns {"accuracy": percent correct, "num_examples": n} plus, for every class c
    (0..len(label_names) - 1 when names are given, else every class seen in the
    targets), "count/NAME" (targets of that class) and "accuracy/NAME" (percent of
    them predicted right; 0 when the class has no examples). NAME is the label name,
    or the class id without names. Bind the names with functools.partial to get a
    seqio-style `metric_fn(targets, predictions)`.
    """
    _check_lengths(targets, predictions)
    t = np.asarray(targets, np.int64).reshape(-1)
    p = np.asarray(predictions, np.int64).reshape(-1)
    if label_names is not None:
        bad = t[(t < 0) | (t >= len(label_names))]
        if bad.size:
            raise ValueError(f"target class {int(bad[0])} is not in [0, {len(label_names)}) "
                             f"(label names {list(label_names)})")
        classes = range(len(label_names))
    else:
        classes = sorted(set(t.tolist()))
    out = {"accuracy": 100.0 * float(np.mean(t == p)) if t.size else 0.0,
           "num_examples": float(t.size)}
    for c in classes:
        name = label_names[c] if label_names is not None else str(c)
        of_class = t == c
        n = int(of_class.sum())
        out[f"count/{name}"] = float(n)
        out[f"accuracy/{name}"] = 100.0 * float(np.mean(p[of_class] == c)) if n else 0.0
    return out
