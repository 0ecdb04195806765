"""SeqIO postprocessors and metric_fns for prompt tasks: generated text -> label -> accuracy, macro-F1.

Each example carries its candidate answers in the text feature `choices` ("\\x1f"-joined). The
postprocessor maps a generation onto one of them: exact match after trimming whitespace,
punctuation and the chat end token, else the single candidate contained in the text (a candidate
inside a longer matching one, like 是 in 不是, does not count); anything else is `INVALID`, which is
wrong for every class. Metrics follow seqio's `metric_fn(targets, predictions) -> {name: value}`
convention with percentages, like t5.evaluation.metrics.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

INVALID = "<invalid>"
CHOICE_SEP = "\x1f"
_TRIM = " \t\r\n。.!！?？,，;；:：\"'“”‘’「」『』()（）[]【】"


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        return x.decode("utf-8", errors="replace")
    if hasattr(x, "item") and not isinstance(x, str):  # numpy scalar
        return _text(x.item())
    return str(x)


def choices_of(example: Mapping[str, Any] | None) -> list[str]:
    raw = _text(example.get("choices", b"")) if example is not None else ""
    return [c for c in raw.split(CHOICE_SEP) if c]


def to_label(text: str, choices: Sequence[str]) -> str:
    """The candidate that `text` names, or INVALID."""
    text = text.split("<|im_end|>", 1)[0].strip(_TRIM)
    if text in choices:
        return text
    for prefix in ("答案：", "答案是", "答案:", "答："):
        if text.startswith(prefix) and text[len(prefix):].strip(_TRIM) in choices:
            return text[len(prefix):].strip(_TRIM)
    found = [c for c in choices if c and c in text]
    found = [c for c in found if not any(c != d and c in d for d in found)]
    return found[0] if len(found) == 1 else INVALID


def label_postprocessor(output: Any, example: Mapping[str, Any] | None = None,
                        is_target: bool = False) -> str:
    """seqio postprocess_fn: targets keep their answer text, predictions map onto the choices."""
    text = _text(output)
    if is_target:
        return text.strip()
    choices = choices_of(example)
    return to_label(text, choices) if choices else text.strip(_TRIM) or INVALID


def accuracy(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
    if not targets:
        raise ValueError("accuracy of no examples")
    return {"accuracy": 100.0 * sum(t == p for t, p in zip(targets, predictions)) / len(targets)}


def macro_f1(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean F1 over the classes present in `targets` (INVALID predictions are misses)."""
    if len(targets) != len(predictions):
        raise ValueError(f"{len(targets)} targets but {len(predictions)} predictions")
    classes = sorted(set(targets))
    if not classes:
        raise ValueError("macro-F1 of no examples")
    f1s = []
    for c in classes:
        tp = sum(t == c and p == c for t, p in zip(targets, predictions))
        fp = sum(t != c and p == c for t, p in zip(targets, predictions))
        fn = sum(t == c and p != c for t, p in zip(targets, predictions))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"macro_f1": 100.0 * sum(f1s) / len(f1s)}


def invalid_rate(targets: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Share of generations that named no candidate (%)."""
    del targets
    return {"invalid_rate": 100.0 * sum(p == INVALID for p in predictions) / max(len(predictions), 1)}
