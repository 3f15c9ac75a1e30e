"""What the demo report prints beside the methods: exact non-learned baselines, chance, accuracy by horizon, and
how much the thought-video targets carry (issue 9's ladder). Pure functions of manifests, predictions and targets.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from storms_dist.data.manifest import OPTION_LETTERS, Sample
from storms_dist.eval.metrics import accuracy_by_type

HORIZON_BUCKETS = ((1, 4), (5, 8), (9, 12), (13, 16))


def chance_by_type(samples: Sequence[Sample]) -> dict[str, Any]:
    """Expected accuracy of a uniform random guess, in accuracy_by_type's layout."""
    by_type: dict[str, list[float]] = defaultdict(list)
    for s in samples:
        by_type[s.qtype].append(100.0 / len(s.options))
    everything = [v for values in by_type.values() for v in values]
    return {"overall": {"accuracy": sum(everything) / len(everything), "num": len(everything)},
            "by_type": {q: {"accuracy": sum(v) / len(v), "num": len(v)} for q, v in by_type.items()}}


def _last_cell(sample: Sample) -> tuple[int, int] | None:
    cells = sample.meta.get("clip_cells")
    return tuple(cells[-1]) if cells else None


def baseline_results(train: Sequence[Sample], evaluated: Sequence[Sample]) -> dict[str, dict[str, Any]]:
    """Rules computed from the generator's ground truth, scored like a method (accuracy_by_type per rule):

    - ``majority``: the train split's most frequent answer of the question type;
    - ``copy last frame``: the ball's cell at the end of the clip;
    - ``copy same-phase frame``: the clip frame at the same phase of the motion's period, if the clip has one;
    - ``lookup (last cell, D)``: the train split's most frequent answer given the last visible cell and the horizon
      (no velocity: what one frame plus the question tells).
    The exact physics from the last visible state (cell and velocity) answers 100 %: it is the label.
    Only samples of the grid task carry the meta these rules need; others get the majority rule alone.
    """
    majority = {q: Counter(s.answer for s in train if s.qtype == q).most_common(1)[0][0]
                for q in {s.qtype for s in train}}
    lookup: dict[tuple, Counter] = defaultdict(Counter)
    for s in train:
        lookup[(s.qtype, _last_cell(s), s.meta.get("horizon"))][s.answer] += 1

    def letter_of(index: int | None) -> str | None:
        return None if index is None else OPTION_LETTERS[index]

    rules = {
        "majority": lambda s: majority.get(s.qtype),
        "copy last frame": lambda s: letter_of(s.meta.get("baselines", {}).get("copy_last")),
        "copy same-phase frame": lambda s: letter_of(s.meta.get("baselines", {}).get("copy_same_phase")),
        "lookup (last cell, D)": lambda s: (lookup[(s.qtype, _last_cell(s), s.meta.get("horizon"))].most_common(1)
                                            or [(majority.get(s.qtype), 0)])[0][0],
    }
    has_grid_meta = all("baselines" in s.meta for s in evaluated)
    out = {}
    for name, rule in rules.items():
        if name != "majority" and not has_grid_meta:
            continue
        out[name] = accuracy_by_type({"uid": s.uid, "qtype": s.qtype, "prediction": rule(s), "answer": s.answer}
                                     for s in evaluated)
    return out


def accuracy_by_horizon(predictions_path: Path, samples: Sequence[Sample], qtype: str = "future_cell",
                        buckets: Sequence[tuple[int, int]] = HORIZON_BUCKETS) -> dict[str, float]:
    """Accuracy (%) of ``qtype`` items per horizon bucket ``"lo-hi"`` from an eval's predictions.jsonl."""
    horizon = {s.uid: s.meta.get("horizon") for s in samples if s.qtype == qtype}
    hits: dict[str, list[int]] = defaultdict(list)
    for line in Path(predictions_path).read_text().splitlines():
        record = json.loads(line)
        d = horizon.get(record["uid"])
        if d is None:
            continue
        for lo, hi in buckets:
            if lo <= d <= hi:
                hits[f"{lo}-{hi}"].append(int(record["prediction"] == record["answer"]))
    return {k: 100.0 * sum(v) / len(v) for k, v in hits.items() if v}


@torch.no_grad()
def target_informativeness(targets_NKD: torch.Tensor, samples: Sequence[Sample], *, hidden_rms: float | None = None,
                           qtype: str = "future_cell", holdout: float = 0.2) -> dict[str, float]:
    """How much the raw thought-video targets (before any standardisation) tell, and at what scale:

    - ``variance_ratio``: across-sample variance per (slot, feature) over the mean square (0 = every sample's
      target is the same, so MSE alignment says nothing about which thought a question needs);
    - ``probe_accuracy``: a nearest-centroid probe from the target of the slot that holds the asked horizon
      (the last slot for a thought video that ends at the asked moment, ``meta.thought == "until_asked"``; slot
      ``(D-1) * K // thought_frames`` for a continuation) to the answer, fit on the first 80 % of samples, scored
      on the rest;
    - ``target_rms`` beside ``hidden_rms`` (the RMS of the last-layer states the latents are, if given).
    """
    targets = targets_NKD.float().flatten(2)  # panels pooled apart, [N, K, R, D], read as R * D features
    mean_square = targets.pow(2).mean().item()
    out = {"target_rms": mean_square ** 0.5, "variance_ratio": targets.var(dim=0).mean().item() / mean_square}
    if hidden_rms is not None:
        out["hidden_rms"] = float(hidden_rms)
    rows = [(i, s) for i, s in enumerate(samples) if s.qtype == qtype and "horizon" in s.meta]
    if len(rows) >= 10:
        num_latents = targets.shape[1]
        thought_frames = len(rows[0][1].meta.get("thought_cells", [])) or num_latents
        mean, std = targets.mean(0), targets.std(0).clamp_min(1e-8)
        def asked_slot(s: Sample) -> int:
            if s.meta.get("thought") == "until_asked":
                return num_latents - 1
            return (s.meta["horizon"] - 1) * num_latents // thought_frames

        features = torch.stack([((targets[i] - mean) / std)[asked_slot(s)] for i, s in rows])
        labels = [s.answer for _, s in rows]
        split = int(len(rows) * (1 - holdout))
        centroids = {a: features[[j for j in range(split) if labels[j] == a]].mean(0) for a in set(labels[:split])}
        names = list(centroids)
        stacked = torch.stack([centroids[a] for a in names])
        predicted = torch.cdist(features[split:], stacked).argmin(1).tolist()
        out["probe_accuracy"] = 100.0 * sum(names[p] == labels[split + j] for j, p in enumerate(predicted)) / (
            len(rows) - split)
        out["probe_majority"] = 100.0 * Counter(labels[split:]).most_common(1)[0][1] / (len(rows) - split)
    return out


def format_diagnostics(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
