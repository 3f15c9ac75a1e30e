"""Evaluation metrics: pure functions over prediction records, no I/O and no torch.

A record is ``{"uid": str, "qtype": str, "prediction": "B" | None, "answer": "B"}``; the metrics dict returned by
:func:`accuracy_by_type` is what the report (``storms_dist.eval.report``) aggregates over seeds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

REQUIRED_KEYS = ("uid", "qtype", "prediction", "answer")


def _normalize_choice(value: Any) -> str | None:
    """``" b "`` -> ``"B"``; None/empty -> None (no answer extracted)."""
    if value is None:
        return None
    text = str(value).strip().upper()
    return text or None


def _dedupe(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Drop exact repeats of a uid, reject conflicting ones.

    Gathered distributed eval repeats items (DistributedSampler pads the last batch to the world size), so the
    same uid with the same prediction is expected; the same uid with a different prediction or label is a bug.
    """
    seen: dict[Any, Mapping[str, Any]] = {}
    for record in records:
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"record {record.get('uid', '?')!r}: missing key(s) {', '.join(missing)}")
        uid = record["uid"]
        if uid in seen:
            first = seen[uid]
            if any(_normalize_choice(first[k]) != _normalize_choice(record[k]) for k in ("prediction", "answer")) or (
                first["qtype"] != record["qtype"]
            ):
                raise ValueError(f"record {uid!r}: appears twice with different qtype/prediction/answer")
            continue
        seen[uid] = record
    return list(seen.values())


def _accuracy(num_correct: int, num: int) -> dict[str, float | int]:
    return {"accuracy": 100.0 * num_correct / num, "num": num}


def accuracy_by_type(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Percent accuracy overall and per question type; a missing/None prediction counts as wrong.

    Returns ``{"overall": {"accuracy": 0..100, "num": n}, "by_type": {qtype: {"accuracy": ..., "num": ...}}}``
    with ``by_type`` in order of first appearance. Letters are compared case- and whitespace-insensitively.
    """
    unique = _dedupe(records)
    if not unique:
        raise ValueError("records: expected at least one prediction record, got none")
    num_correct_by_type: dict[str, int] = {}
    num_by_type: dict[str, int] = {}
    for record in unique:
        qtype = str(record["qtype"])
        prediction = _normalize_choice(record["prediction"])
        correct = prediction is not None and prediction == _normalize_choice(record["answer"])
        num_by_type[qtype] = num_by_type.get(qtype, 0) + 1
        num_correct_by_type[qtype] = num_correct_by_type.get(qtype, 0) + int(correct)
    num_correct = sum(num_correct_by_type.values())
    return {
        "overall": _accuracy(num_correct, len(unique)),
        "by_type": {q: _accuracy(num_correct_by_type[q], n) for q, n in num_by_type.items()},
    }


def mean_std(values: Sequence[float] | Iterable[float]) -> tuple[float, float]:
    """Mean and *sample* standard deviation (ddof=1) over seeds; std is 0.0 for a single value.

    Sample std because the seeds are a small sample of possible runs and the report's error bars should estimate
    run-to-run spread, not describe these exact few runs (population std is sqrt(2/3) ~ 0.82x of it at 3 seeds).
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("values: expected at least one value, got none")
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    variance = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance)


def ci95(std: float, num: int) -> float:
    """Half-width of the 95 % confidence interval of a mean of ``num`` values with sample std ``std`` (Student t;
    0 for one value)."""
    if num < 2:
        return 0.0
    from scipy.stats import t

    return float(t.ppf(0.975, num - 1)) * std / math.sqrt(num)
