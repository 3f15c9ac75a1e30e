"""Eval metrics (pure functions) and the demo report (markdown, PNG chart, results.json)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest

from storms_dist.eval.metrics import accuracy_by_type, ci95, mean_std
from storms_dist.eval.report import (
    DYNAMICS_AVG,
    OVERALL,
    ReportData,
    load_report,
    print_table,
    render_chart,
    render_markdown,
    summarize,
    write_report,
)

QTYPES = ["extrapolate", "order", "count", "speed_direction", "static"]
DYNAMICS = QTYPES[:4]


def _metrics(acc_by_type: dict[str, float], num: int = 10) -> dict:
    """accuracy_by_type-shaped dict with ``num`` items per type (overall item-weighted)."""
    by_type = {q: {"accuracy": a, "num": num} for q, a in acc_by_type.items()}
    overall = sum(acc_by_type.values()) / len(acc_by_type)
    return {"overall": {"accuracy": overall, "num": num * len(acc_by_type)}, "by_type": by_type}


def _inputs(**overrides) -> dict:
    """Keyword inputs shared by every report function: 2 seeds for two methods, 1 for the third."""
    storms = [
        _metrics({"extrapolate": 80, "order": 70, "count": 60, "speed_direction": 50, "static": 90}),
        _metrics({"extrapolate": 90, "order": 70, "count": 60, "speed_direction": 50, "static": 80}),
    ]
    baseline = [
        _metrics({"extrapolate": 40, "order": 75, "count": 60, "speed_direction": 30, "static": 95}),
        _metrics({"extrapolate": 40, "order": 75, "count": 60, "speed_direction": 30, "static": 95}),
    ]
    single = [_metrics({"extrapolate": 20, "order": 20, "count": 20, "speed_direction": 20, "static": 20})]
    kwargs = {
        "results": {"storms": storms, "text_cot": baseline, "frames_only": single},
        "latency": {
            "storms": [
                {"latency_ms_per_item": 40.0, "num_latents": 8},
                {"latency_ms_per_item": 44.0, "num_latents": 8},
            ],
            "text_cot": {"latency_ms_per_item": 120.0, "num_latents": None},  # measured once
            "frames_only": [{"latency_ms_per_item": None, "num_latents": 0}],  # not measured
        },
        "qtypes": QTYPES,
        "dynamics_qtypes": tuple(DYNAMICS),  # normalized to a list
        "context": {"machine": "2-core CPU", "date": "2026-11-21", "model": "tiny", "steps": 200},
    }
    kwargs.update(overrides)
    return kwargs


def _table_rows(markdown: str, section: str) -> list[list[str]]:
    """Cells of the first table under ``## {section}``."""
    lines = markdown.splitlines()
    heading = lines.index(f"## {section}")
    start = next(i for i in range(heading, len(lines)) if lines[i].startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [rows[0], *rows[2:]]  # drop the |---| rule


# --------------------------------------------------------------------------------------------------------- metrics
def test_accuracy_by_type_counts_missing_prediction_as_wrong() -> None:
    records = [
        {"uid": "a", "qtype": "count", "prediction": "B", "answer": "B"},
        {"uid": "b", "qtype": "count", "prediction": None, "answer": "B"},
        {"uid": "c", "qtype": "count", "prediction": "", "answer": "A"},
        {"uid": "d", "qtype": "static", "prediction": " c", "answer": "C"},  # normalized
        {"uid": "a", "qtype": "count", "prediction": "B", "answer": "B"},  # sampler padding repeat: ignored
    ]
    out = accuracy_by_type(records)
    assert out["overall"] == {"accuracy": 50.0, "num": 4}
    assert out["by_type"] == {
        "count": {"accuracy": pytest.approx(100 / 3), "num": 3},
        "static": {"accuracy": 100.0, "num": 1},
    }
    assert list(out["by_type"]) == ["count", "static"]


def test_accuracy_by_type_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="missing key"):
        accuracy_by_type([{"uid": "a", "qtype": "count", "answer": "A"}])
    with pytest.raises(ValueError, match="'a': appears twice"):
        accuracy_by_type([{"uid": "a", "qtype": "q", "prediction": p, "answer": "A"} for p in "AB"])
    with pytest.raises(ValueError, match="records"):
        accuracy_by_type([])


def test_ci95_is_student_t_half_width() -> None:
    # t(0.975, df) from tables: 12.706 (df 1), 2.776 (df 4); the report's "±" over 2 seeds is 8.98 std
    assert ci95(math.sqrt(50), 2) == pytest.approx(12.706 * math.sqrt(50) / math.sqrt(2), rel=1e-4)
    assert ci95(2.0, 5) == pytest.approx(2.776 * 2.0 / math.sqrt(5), rel=1e-3)
    assert ci95(3.0, 1) == 0.0


def test_mean_std_uses_sample_std() -> None:
    assert mean_std([42.0]) == (42.0, 0.0)
    mean, std = mean_std([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and math.isclose(std, math.sqrt(5 / 3))  # ddof=1, not sqrt(5/4)
    with pytest.raises(ValueError):
        mean_std([])


# ---------------------------------------------------------------------------------------------------------- report
def test_summary_aggregates_per_seed_then_over_seeds() -> None:
    summary = summarize(ReportData(**_inputs()))
    storms = summary["storms"]
    assert (storms["extrapolate"].mean, storms["extrapolate"].std) == (85.0, pytest.approx(math.sqrt(50)))
    # dynamics avg is the unweighted mean over the 4 dynamics types, per seed: (80+70+60+50)/4, (90+70+60+50)/4
    assert storms[DYNAMICS_AVG].mean == pytest.approx((65.0 + 67.5) / 2)
    assert summary["frames_only"][OVERALL].num_seeds == 1 and summary["frames_only"][OVERALL].std == 0.0


def test_markdown_columns_bold_best_and_plus_minus() -> None:
    md = render_markdown(**_inputs())
    rows = _table_rows(md, "Accuracy")
    assert rows[0] == ["method", *QTYPES, DYNAMICS_AVG, OVERALL]
    by_method = {r[0]: dict(zip(rows[0][1:], r[1:])) for r in rows[1:]}
    assert list(by_method) == ["storms", "text_cot", "frames_only"]  # results order
    assert by_method["storms"]["extrapolate"] == "**85.0 ± 63.5**"
    assert by_method["text_cot"]["extrapolate"] == "40.0 ± 0.0"
    assert by_method["text_cot"]["order"] == "**75.0 ± 0.0**" and by_method["storms"]["order"] == "70.0 ± 0.0"
    assert by_method["text_cot"]["static"] == "**95.0 ± 0.0**"
    # a tie at display precision bolds every tied method
    assert by_method["storms"]["count"] == "**60.0 ± 0.0**" and by_method["text_cot"]["count"] == "**60.0 ± 0.0**"
    assert by_method["frames_only"]["count"] == "20.0"  # one seed: no ± part
    assert by_method["storms"][DYNAMICS_AVG] == "**66.2 ± 15.9**"
    # header context and the aggregation caption
    header = md[: md.index("## Accuracy")].splitlines()
    assert header[:5] == [
        "# STORMS demo report",
        "",
        "- Date: 2026-11-21",
        "- Machine: 2-core CPU",
        "- Config: `model=tiny`, `steps=200`",
    ]
    assert "- Seeds per method: storms 2, text_cot 2, frames_only 1" in header
    assert "unweighted mean over extrapolate, order, count, speed_direction" in md and "Control" in md


def test_markdown_latency_table() -> None:
    rows = _table_rows(render_markdown(**_inputs()), "Latency")
    assert rows[0] == ["method", "ms/item", "K (latents)"]
    assert rows[1:] == [["storms", "42.0 ± 25.4", "8"], ["text_cot", "120.0", "—"], ["frames_only", "—", "0"]]
    latency = _inputs()["latency"]
    del latency["frames_only"]  # a method without latency has no row
    rows = _table_rows(render_markdown(**_inputs(latency=latency)), "Latency")
    assert [r[0] for r in rows[1:]] == ["storms", "text_cot"]


def test_missing_type_renders_dash_and_no_dynamics_avg() -> None:
    partial = {"overall": {"accuracy": 50.0, "num": 2}, "by_type": {"extrapolate": {"accuracy": 50.0, "num": 2}}}
    md = render_markdown(
        {"a": [partial], "b": [partial]}, qtypes=["extrapolate", "static"], dynamics_qtypes=[], context=None
    )
    rows = _table_rows(md, "Accuracy")
    assert rows[0] == ["method", "extrapolate", "static", OVERALL]
    assert rows[1] == ["a", "**50.0**", "—", "**50.0**"]
    assert "## Latency" not in md and "- Date" not in md


def test_report_data_validation() -> None:
    with pytest.raises(ValueError, match="dynamics_qtypes"):
        render_markdown(**_inputs(dynamics_qtypes=["teleport"]))
    with pytest.raises(ValueError, match="latency"):
        render_markdown(**_inputs(latency={"ghost": {"latency_ms_per_item": 1.0, "num_latents": 1}}))
    with pytest.raises(ValueError, match="num_latents"):
        per_seed = [{"latency_ms_per_item": 1.0, "num_latents": k} for k in (4, 8)]
        render_markdown(**_inputs(latency={"storms": per_seed}))
    with pytest.raises(ValueError, match="results"):
        render_markdown(**_inputs(results={"storms": []}))


def test_print_table_is_aligned(capsys: pytest.CaptureFixture[str]) -> None:
    buf = io.StringIO()
    print_table(**_inputs(), file=buf)
    lines = buf.getvalue().splitlines()
    table = lines[1 : lines.index("")]
    assert table[0].split()[0] == "method" and set(table[1]) == {"-"}
    assert len({len(line) for line in table}) == 1  # every row padded to the same width
    storms = next(line for line in table if line.startswith("storms"))
    assert "85.0 ± 63.5*" in storms and "**" not in buf.getvalue()
    print_table(**_inputs())
    assert capsys.readouterr().out == buf.getvalue()


def test_render_chart_writes_png(tmp_path: Path) -> None:
    path = render_chart(**_inputs(), path=tmp_path / "sub" / "chart.png")
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(blob) > 10_000  # bars, labels and legend, not an empty canvas


def test_write_report_and_json_round_trip(tmp_path: Path) -> None:
    inputs = _inputs()
    paths = write_report(tmp_path / "report", **inputs)
    names = {k: p.name for k, p in paths.items()}
    assert names == {"markdown": "report.md", "chart": "report.png", "json": "results.json"}
    assert paths["markdown"].read_text(encoding="utf-8") == render_markdown(**inputs)
    assert paths["chart"].read_bytes()[:4] == b"\x89PNG"
    payload = json.loads(paths["json"].read_text())
    assert payload["results"] == inputs["results"] and payload["qtypes"] == QTYPES
    assert payload["context"] == inputs["context"]
    assert payload["summary"]["storms"]["extrapolate"]["mean"] == 85.0
    assert payload["summary"]["text_cot"]["extrapolate"]["num_seeds"] == 2
    loaded = load_report(paths["json"])
    assert loaded == ReportData(**inputs).inputs()  # normalized: one latency dict -> a one-seed list
    assert loaded["latency"]["text_cot"] == [inputs["latency"]["text_cot"]]
    assert render_markdown(**loaded) == render_markdown(**inputs)


def test_paired_differences_subtract_each_method_from_storms_seed_by_seed():
    from storms_dist.eval.report import paired_differences

    def run(future, control=100.0):
        return {"overall": {"accuracy": (3 * future + control) / 4},
                "by_type": {"future_cell": {"accuracy": future}, "current_cell": {"accuracy": control}}}

    results = {"sft_k0": [run(0.0), run(2.0), run(1.0)], "stage1_only": [run(60.0), run(50.0), run(40.0)],
               "storms": [run(66.0), run(40.0), run(46.0, control=0.0)]}
    header, rule, k0, stage1 = paired_differences(results, ["future_cell"], [0, 1, 2])
    assert header == "| difference | seed 0 | seed 1 | seed 2 | mean ± 95 % CI |" and rule.count("---:") == 4
    # the control column is not a dynamics type: it does not enter the difference
    assert k0 == f"| storms − sft_k0 | +66.0 | +38.0 | +45.0 | +49.7 ± {ci95(mean_std([66, 38, 45])[1], 3):.1f} |"
    assert stage1.startswith("| storms − stage1_only | +6.0 | -10.0 | +6.0 | +0.7 ± ")
    assert paired_differences({"sft_k0": [run(1.0)]}, ["future_cell"], [0]) == []
