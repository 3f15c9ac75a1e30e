"""The demo report: accuracy per method x question type (mean ± 95 % CI over seeds), latency, a bar chart.

    inputs = dict(
        results={"storms": [acc_seed0, acc_seed1], "text_cot": [...]},  # accuracy_by_type() output per seed
        latency={"storms": [{"latency_ms_per_item": 41.2, "num_latents": 8}, ...], "text_cot": {...}},
        qtypes=["extrapolate", "order", "count", "speed_direction", "static"],  # column order
        dynamics_qtypes=["extrapolate", "order", "count", "speed_direction"],  # the rest (static) are controls
        context={"machine": "2-core CPU", "date": "2026-11-21", "steps": 200},
    )
    paths = write_report(Path("runs/demo"), **inputs)  # report.md, report.png, results.json
    print_table(**inputs)
    render_markdown(**load_report(paths["json"]))  # results.json holds the inputs: re-render without re-running

Every function takes the same inputs, validated once by :class:`ReportData`. Latency per method is either one
dict (measured once) or one per seed; ``latency_ms_per_item`` may be None (not measured). ``context`` is shown in
the header, ``date`` and ``machine`` first, every other key as config summary.

Aggregation: every column is computed per seed first, then mean, sample std and the 95 % confidence half-width
of the mean (Student t, ``metrics.ci95``) over seeds. "dynamics avg" is the unweighted mean of the dynamics types'
accuracies (each type counts equally whatever its item count); "overall" is item-weighted over all items.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from storms_dist.eval.metrics import ci95, mean_std

DEFAULT_TITLE = "STORMS demo report"
DYNAMICS_AVG = "dynamics avg"
OVERALL = "overall"
MISSING = "—"
LATENCY_KEYS = ("latency_ms_per_item", "num_latents")


@dataclass(frozen=True)
class Cell:
    """One aggregated table cell: mean, sample std and 95 % CI half-width of a per-seed value."""

    mean: float
    std: float
    num_seeds: int

    @property
    def ci95(self) -> float:
        return ci95(self.std, self.num_seeds)


@dataclass(kw_only=True)
class ReportData:
    """The validated report inputs. ``results``/``latency`` keys are method names; their order is the row order."""

    results: dict[str, list[dict[str, Any]]]  # method -> one accuracy_by_type() dict per seed
    latency: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # method -> per seed (or one dict)
    qtypes: list[str]  # column order
    dynamics_qtypes: list[str]  # subset of qtypes averaged into "dynamics avg"; the others are controls
    context: dict[str, Any] = field(default_factory=dict)  # machine, date, config summary
    title: str = DEFAULT_TITLE
    baselines: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Non-learned rows (name -> one accuracy_by_type() dict): chance, majority, copy rules... shown under the
    methods, never counted as the best."""
    sections: dict[str, list[str]] = field(default_factory=dict)
    """Extra markdown sections (heading -> lines), e.g. Stage 0 perception and target informativeness."""

    def __post_init__(self) -> None:
        if not self.results:
            raise ValueError("results: expected at least one method, got none")
        for method, seeds in self.results.items():
            if isinstance(seeds, Mapping) or not seeds or not all("overall" in s for s in seeds):
                raise ValueError(f"results[{method!r}]: expected a non-empty list of accuracy_by_type() dicts")
        # lists, not tuples: what JSON gives back, so that a results.json round trip compares equal
        self.results = {m: list(seeds) for m, seeds in self.results.items()}
        self.qtypes, self.dynamics_qtypes = list(self.qtypes), list(self.dynamics_qtypes)
        self.context = dict(self.context or {})
        if len(set(self.qtypes)) != len(self.qtypes) or not self.qtypes:
            raise ValueError(f"qtypes: expected a non-empty list of distinct question types, got {self.qtypes!r}")
        unknown = [q for q in self.dynamics_qtypes if q not in self.qtypes]
        if unknown:
            raise ValueError(f"dynamics_qtypes: {unknown} not in qtypes; expected a subset of {self.qtypes}")
        self.latency = {m: _normalize_latency(m, v) for m, v in (self.latency or {}).items()}
        self.baselines = {name: dict(metrics) for name, metrics in (self.baselines or {}).items()}
        self.sections = {heading: list(lines) for heading, lines in (self.sections or {}).items()}
        extra = [m for m in self.latency if m not in self.results]
        if extra:
            raise ValueError(f"latency: methods {extra} have no results; expected a subset of {list(self.results)}")

    @property
    def controls(self) -> list[str]:
        return [q for q in self.qtypes if q not in self.dynamics_qtypes]

    @property
    def columns(self) -> list[str]:
        return [*self.qtypes, *([DYNAMICS_AVG] if self.dynamics_qtypes else []), OVERALL]

    def inputs(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this report with any of the public functions."""
        return asdict(self)


def _normalize_latency(method: str, value: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One dict (measured once) or one per seed -> list of dicts; K must agree across seeds."""
    seeds = [dict(value)] if isinstance(value, Mapping) else [dict(v) for v in value]
    if not seeds or any(k not in s for s in seeds for k in LATENCY_KEYS):
        raise ValueError(f"latency[{method!r}]: expected dict(s) with keys {', '.join(LATENCY_KEYS)}")
    if len({s["num_latents"] for s in seeds}) != 1:
        raise ValueError(f"latency[{method!r}].num_latents: expected the same K for every seed, got {seeds}")
    return seeds


# ------------------------------------------------------------------------------------------------------ aggregation
def _seed_column_values(metrics: Mapping[str, Any], data: ReportData) -> dict[str, float]:
    """Column -> accuracy for one seed; a column is absent when the seed has no items of that type."""
    by_type = metrics.get("by_type", {})
    values = {q: float(by_type[q]["accuracy"]) for q in data.qtypes if q in by_type}
    if data.dynamics_qtypes and all(q in values for q in data.dynamics_qtypes):
        # unweighted: a rare dynamics type weighs as much as a common one
        values[DYNAMICS_AVG] = sum(values[q] for q in data.dynamics_qtypes) / len(data.dynamics_qtypes)
    values[OVERALL] = float(metrics["overall"]["accuracy"])
    return values


def summarize(data: ReportData) -> dict[str, dict[str, Cell | None]]:
    """Method -> column -> Cell over the seeds that have the column (None if no seed does)."""
    table: dict[str, dict[str, Cell | None]] = {}
    for method, seeds in data.results.items():
        per_seed = [_seed_column_values(s, data) for s in seeds]
        row: dict[str, Cell | None] = {}
        for col in data.columns:
            values = [v[col] for v in per_seed if col in v]
            row[col] = Cell(*mean_std(values), num_seeds=len(values)) if values else None
        table[method] = row
    return table


def paired_differences(results: Mapping[str, Sequence[Mapping[str, Any]]], dynamics_qtypes: Sequence[str],
                       seeds: Sequence[int], reference: str = "storms") -> list[str]:
    """``reference`` minus every other method on the dynamics average (the table's own column rule), seed by seed
    (a seed's methods share its Stage 0, data order and, with ``demo.share_stage1``, Stage I), with the mean ± 95 %
    t-interval over seeds: the quantity the science target (STORMS beats K=0 by >= 10 points) is about. Markdown
    lines; none without ``reference`` or dynamics types."""
    if reference not in results or not dynamics_qtypes:
        return []
    data = ReportData(results=dict(results), qtypes=list(dynamics_qtypes), dynamics_qtypes=list(dynamics_qtypes))
    dynamics = {m: [_seed_column_values(s, data).get(DYNAMICS_AVG, math.nan) for s in runs]
                for m, runs in data.results.items()}
    rows = ["| difference | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± 95 % CI |",
            "|---|" + "---:|" * (len(seeds) + 1)]
    for method, values in dynamics.items():
        if method == reference:
            continue
        diffs = [r - v for r, v in zip(dynamics[reference], values)]
        mean, std = mean_std(diffs)
        ci = f" ± {ci95(std, len(diffs)):.1f}" if len(diffs) > 1 else ""
        rows.append(f"| {reference} − {method} | " + " | ".join(f"{d:+.1f}" for d in diffs) + f" | {mean:+.1f}{ci} |")
    return rows


def best_methods(summary: Mapping[str, Mapping[str, Cell | None]], column: str, *, ndigits: int = 1) -> set[str]:
    """Methods with the highest mean in ``column``, compared at display precision (so visible ties all win)."""
    means = {m: round(row[column].mean, ndigits) for m, row in summary.items() if row.get(column) is not None}
    if len(means) < 2:  # nothing to compare against
        return set()
    top = max(means.values())
    return {m for m, v in means.items() if v == top}


def latency_summary(data: ReportData) -> dict[str, tuple[Cell | None, int | None]]:
    """Method -> (ms/item over the seeds that measured it, or None; K)."""
    out: dict[str, tuple[Cell | None, int | None]] = {}
    for method in data.results:
        if method in data.latency:
            seeds = data.latency[method]
            ms = [float(s["latency_ms_per_item"]) for s in seeds if s["latency_ms_per_item"] is not None]
            cell = Cell(*mean_std(ms), num_seeds=len(ms)) if ms else None
            out[method] = (cell, seeds[0]["num_latents"])
    return out


# ------------------------------------------------------------------------------------------------------- formatting
def format_cell(cell: Cell | None, *, ndigits: int = 1) -> str:
    """``"71.3 ± 2.1"`` (mean ± 95 % CI half-width) over several seeds, ``"71.3"`` for one, ``"—"`` if absent."""
    if cell is None:
        return MISSING
    if cell.num_seeds > 1:
        return f"{cell.mean:.{ndigits}f} ± {cell.ci95:.{ndigits}f}"
    return f"{cell.mean:.{ndigits}f}"


def _ms_digits(cell: Cell | None) -> int:
    return 2 if cell is not None and cell.mean < 10 else 1  # sub-10 ms latencies need the extra digit


def _accuracy_rows(data: ReportData, *, markdown: bool) -> list[list[str]]:
    """Header + one row per method; best cells in **bold** (markdown) or suffixed ``*`` (plain text)."""
    summary = summarize(data)
    best = {col: best_methods(summary, col) for col in data.columns}
    rows = [["method", *data.columns]]
    for method, row in summary.items():
        cells = []
        for col in data.columns:
            text, is_best = format_cell(row[col]), method in best[col]
            if markdown:
                cells.append(f"**{text}**" if is_best else text)
            else:  # pad non-best cells too so the digits stay right-aligned
                cells.append(text + ("*" if is_best else " " if best[col] else ""))
        rows.append([method, *cells])
    for name, metrics in data.baselines.items():
        values = _seed_column_values(metrics, data)
        label = f"*{name}*" if markdown else name
        rows.append([label, *(f"{values[col]:.1f}" if col in values else MISSING for col in data.columns)])
    return rows


def _latency_rows(data: ReportData) -> list[list[str]]:
    rows = [["method", "ms/item", "K (latents)"]]
    for method, (cell, num_latents) in latency_summary(data).items():
        k_text = MISSING if num_latents is None else str(num_latents)
        rows.append([method, format_cell(cell, ndigits=_ms_digits(cell)), k_text])
    return rows


def _widths(rows: list[list[str]]) -> list[int]:
    return [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]


def _pad(row: list[str], widths: list[int]) -> list[str]:
    """Method names left-aligned, numbers right-aligned."""
    return [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]


def _markdown_table(rows: list[list[str]]) -> str:
    widths = _widths(rows)
    lines = ["| " + " | ".join(_pad(r, widths)) + " |" for r in rows]
    rule = "|" + "|".join("-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([lines[0], rule, *lines[1:]])


def _plain_table(rows: list[list[str]]) -> str:
    widths = _widths(rows)
    lines = ["  ".join(_pad(r, widths)) for r in rows]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _seed_counts(data: ReportData) -> str:
    counts = {m: len(s) for m, s in data.results.items()}
    if len(set(counts.values())) == 1:
        return str(next(iter(counts.values())))
    return ", ".join(f"{m} {n}" for m, n in counts.items())


def _items_per_type(data: ReportData) -> str:
    """Item counts from the first method's first seed (all methods see the same eval set)."""
    first = next(iter(data.results.values()))[0]
    by_type = first.get("by_type", {})
    parts = [f"{q} {by_type[q]['num']}" for q in data.qtypes if q in by_type]
    return ", ".join([*parts, f"total {first['overall']['num']}"])


def _accuracy_caption(data: ReportData) -> str:
    parts = ["Accuracy in %, mean ± 95 % CI (Student t) over seeds; **bold** = best method per column."]
    if data.baselines:
        parts.append(f"*Italic* rows are non-learned rules ({', '.join(data.baselines)}), computed from the "
                     "generator's ground truth.")
    if data.dynamics_qtypes:
        parts.append(f"`{DYNAMICS_AVG}` = unweighted mean over {', '.join(data.dynamics_qtypes)}.")
    if data.controls:
        parts.append(f"Control (no dynamics needed): {', '.join(data.controls)}.")
    return " ".join(parts)


def _context_lines(data: ReportData) -> list[str]:
    """``- Date: ...``, ``- Machine: ...``, then the remaining context keys as one config line."""
    lines = [f"- {key.capitalize()}: {data.context[key]}" for key in ("date", "machine") if key in data.context]
    rest = {k: v for k, v in data.context.items() if k not in ("date", "machine")}
    if rest:
        lines.append("- Config: " + ", ".join(f"`{k}={v}`" for k, v in rest.items()))
    return lines


def _subtitle(data: ReportData) -> str:
    return ", ".join(str(data.context[k]) for k in ("date", "machine") if k in data.context)


def _render_markdown(data: ReportData) -> str:
    lines = [f"# {data.title}", "", *_context_lines(data)]
    lines += [f"- Seeds per method: {_seed_counts(data)}", f"- Items per seed: {_items_per_type(data)}"]
    lines += ["", "## Accuracy", "", _accuracy_caption(data), "", _markdown_table(_accuracy_rows(data, markdown=True))]
    if data.latency:
        caption = "Milliseconds per eval item (mean ± std over seeds); K = number of latent steps."
        lines += ["", "## Latency", "", caption, ""]
        lines.append(_markdown_table(_latency_rows(data)))
    for heading, body in data.sections.items():
        lines += ["", f"## {heading}", "", *body]
    return "\n".join(lines) + "\n"


def _print_table(data: ReportData, file: TextIO | None = None) -> None:
    out = file if file is not None else sys.stdout
    subtitle = f" ({_subtitle(data)})" if _subtitle(data) else ""
    print(f"{data.title}{subtitle} — accuracy %, * = best per column", file=out)
    print(_plain_table(_accuracy_rows(data, markdown=False)), file=out)
    if data.latency:
        print(file=out)
        print(_plain_table(_latency_rows(data)), file=out)
    for heading, body in data.sections.items():
        print(f"\n{heading}", file=out)
        for line in body:
            print(f"  {line}", file=out)


# ------------------------------------------------------------------------------------------------------------ chart
def _render_chart(data: ReportData, path: Path) -> Path:
    # Figure + savefig needs no pyplot: no global backend switch, no figure registry to leak between calls.
    from matplotlib.figure import Figure

    summary = summarize(data)
    methods, columns = list(summary), data.columns
    num_methods = len(methods)
    width = 0.8 / num_methods
    fig = Figure(figsize=(max(7.0, 1.2 * len(columns) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, method in enumerate(methods):
        cells = [summary[method][col] for col in columns]
        xs = [j + (i - (num_methods - 1) / 2) * width for j in range(len(columns))]
        means = [c.mean if c else float("nan") for c in cells]
        stds = [c.ci95 if c and c.num_seeds > 1 else float("nan") for c in cells]  # nan: no bar for a single seed
        label = f"{method} (n={len(data.results[method])})"
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label, error_kw={"elinewidth": 1})
    if "chance" in data.baselines:  # one chance mark per column
        chance = _seed_column_values(data.baselines["chance"], data)
        for j, col in enumerate(columns):
            if col in chance:
                ax.hlines(chance[col], j - 0.45, j + 0.45, colors="black", linestyles=":", linewidth=1.2,
                          label="chance" if j == 0 else None)
    if len(columns) > len(data.qtypes):  # separate per-type columns from the aggregates
        ax.axvline(len(data.qtypes) - 0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(range(len(columns)), columns, rotation=20, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(" — ".join(filter(None, [data.title, _subtitle(data)])), fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


# ----------------------------------------------------------------------------------------------------- public API
Results = Mapping[str, Sequence[Mapping[str, Any]]]
Latency = Mapping[str, Mapping[str, Any] | Sequence[Mapping[str, Any]]]


def _data(
    results: Results,
    latency: Latency | None,
    qtypes: Sequence[str],
    dynamics_qtypes: Sequence[str],
    context: Mapping[str, Any] | None,
    title: str,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    sections: Mapping[str, Sequence[str]] | None = None,
) -> ReportData:
    return ReportData(
        results=dict(results),
        latency=dict(latency or {}),
        qtypes=list(qtypes),
        dynamics_qtypes=list(dynamics_qtypes),
        context=dict(context or {}),
        title=title,
        baselines=dict(baselines or {}),
        sections={k: list(v) for k, v in (sections or {}).items()},
    )


def render_markdown(
    results: Results,
    latency: Latency | None = None,
    *,
    qtypes: Sequence[str],
    dynamics_qtypes: Sequence[str],
    context: Mapping[str, Any] | None = None,
    title: str = DEFAULT_TITLE,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    sections: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """Header with context, accuracy table (method x qtype + dynamics avg + overall, best bold), latency table."""
    return _render_markdown(_data(results, latency, qtypes, dynamics_qtypes, context, title, baselines, sections))


def render_chart(
    results: Results,
    latency: Latency | None = None,
    *,
    qtypes: Sequence[str],
    dynamics_qtypes: Sequence[str],
    context: Mapping[str, Any] | None = None,
    title: str = DEFAULT_TITLE,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    sections: Mapping[str, Sequence[str]] | None = None,
    path: Path,
) -> Path:
    """Grouped bar chart (columns x methods), error bars = sample std over seeds, written as PNG."""
    return _render_chart(_data(results, latency, qtypes, dynamics_qtypes, context, title, baselines, sections), path)


def print_table(
    results: Results,
    latency: Latency | None = None,
    *,
    qtypes: Sequence[str],
    dynamics_qtypes: Sequence[str],
    context: Mapping[str, Any] | None = None,
    title: str = DEFAULT_TITLE,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    sections: Mapping[str, Sequence[str]] | None = None,
    file: TextIO | None = None,
) -> None:
    """Aligned plain-text tables for the console (stdout by default); ``*`` marks the best method per column."""
    _print_table(_data(results, latency, qtypes, dynamics_qtypes, context, title, baselines, sections), file)


def write_report(
    out_dir: Path,
    results: Results,
    latency: Latency | None = None,
    *,
    qtypes: Sequence[str],
    dynamics_qtypes: Sequence[str],
    context: Mapping[str, Any] | None = None,
    title: str = DEFAULT_TITLE,
    baselines: Mapping[str, Mapping[str, Any]] | None = None,
    sections: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Path]:
    """Write report.md, report.png and results.json into ``out_dir``; returns ``{"markdown"|"chart"|"json": path}``.

    results.json = the inputs (see :func:`load_report`) plus ``summary``: method -> column -> mean/std/num_seeds.
    """
    data = _data(results, latency, qtypes, dynamics_qtypes, context, title, baselines, sections)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out_dir / "report.md", "chart": out_dir / "report.png", "json": out_dir / "results.json"}
    paths["markdown"].write_text(_render_markdown(data), encoding="utf-8")
    _render_chart(data, paths["chart"])
    summary = {m: {col: {**asdict(c), "ci95": c.ci95} if c else None for col, c in row.items()}
               for m, row in summarize(data).items()}
    payload = {**data.inputs(), "summary": summary}
    # default=str: context may hold Paths or other non-JSON scalars
    paths["json"].write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return paths


def load_report(path: Path) -> dict[str, Any]:
    """The inputs stored in a results.json, as keyword arguments: ``render_markdown(**load_report(path))``."""
    payload = json.loads(Path(path).read_text(encoding="utf-8"))
    return ReportData(**{k: v for k, v in payload.items() if k != "summary"}).inputs()  # summary is derived
