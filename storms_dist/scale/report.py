"""``storms study report STUDY_ID``: read a study's runs back from MLflow (``search_runs``), write a Markdown
table and plots, and log them to the study's parent run.

Plots: tokens/s per device vs model size (one line per GPU count), MFU vs size, peak memory vs frames (measured and
planned), accuracy vs size with the K=0 baseline (pipeline points).
"""

from __future__ import annotations

import math
from pathlib import Path

COLUMNS = [("point", "point"), ("backbone", "params.model.backbone"), ("B params", "metrics.study.num_params_b"),
           ("ranks", "params.resources.world_size"), ("K", "params.model.num_latents"),
           ("frames", "params.throughput.frames"), ("status", "tags.status"),
           ("tokens/s/dev", "metrics.study.tokens_per_s_per_device"), ("frames/s", "metrics.study.frames_per_s"),
           ("TFLOP/s/dev", "metrics.study.tflops_per_device"), ("MFU", "metrics.study.mfu"), ("step s", "metrics.study.step_s"),
           ("data %", "metrics.study.data_share"), ("peak GiB", "metrics.study.peak_mem_gib"),
           ("plan GiB", "metrics.study.plan_peak_gib"), ("plan err", "metrics.study.plan_error"),
           ("accuracy", "metrics.accuracy"), ("latency ms", "metrics.latency_ms_per_item")]


def search_study(study_id: str, *, tracking, runs_dir):
    import mlflow

    from storms_dist.tracking import resolve_tracking_uri, tracking_uri_scope

    uri = resolve_tracking_uri(tracking, Path(runs_dir))
    with tracking_uri_scope(uri):
        runs = mlflow.search_runs(experiment_names=[tracking.experiment],
                                  filter_string=f"tags.study_id = '{study_id}'", output_format="pandas")
    if runs.empty:
        raise ValueError(f"study {study_id!r}: no MLflow run has tags.study_id = '{study_id}' in experiment "
                         f"{tracking.experiment!r} ({uri})")
    return runs


def _fmt(value, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if column in ("MFU", "data %"):
        return f"{100 * float(value):.1f}%"
    if column == "plan err":
        return f"{100 * float(value):+.0f}%"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def table(points) -> str:
    points = points.assign(point=points.get("tags.study_point"))
    cols = [(name, key) for name, key in COLUMNS if key in points.columns or key == "point"]
    cols = [(n, k) for n, k in cols if k == "point" or points[k].notna().any()]
    lines = ["| " + " | ".join(n for n, _ in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in points.sort_values(["metrics.study.num_params_b", "tags.study_point"], na_position="last").iterrows():
        lines.append("| " + " | ".join(_fmt(row.get(k), n) for n, k in cols) + " |")
    return "\n".join(lines)


def plots(points, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    ok = points[points.get("tags.status", "ok") == "ok"] if "tags.status" in points else points
    size = "metrics.study.num_params_b"

    def figure(name, ycol, ylabel, group="params.resources.world_size", xcol=size, xlabel="parameters (B)",
               extra=None, label="{} rank(s)"):
        if ycol not in ok or ok[ycol].isna().all():
            return
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for key, part in ok.groupby(group) if group in ok else [("all", ok)]:
            part = part.sort_values(xcol)
            line, = ax.plot(part[xcol].astype(float), part[ycol].astype(float), "o-", label=label.format(key))
            if extra is not None:
                extra(ax, part, xcol, line.get_color())
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)

    figure("tokens_per_s_per_device_vs_size", "metrics.study.tokens_per_s_per_device", "tokens/s per device")
    figure("mfu_vs_size", "metrics.study.mfu", "MFU")

    def planned(ax, part, xcol, color):  # the planner's prediction for the same points, dashed
        if "metrics.study.plan_peak_gib" in part:
            ax.plot(part[xcol].astype(float), part["metrics.study.plan_peak_gib"].astype(float), "x--", color=color)

    if "params.throughput.frames" in ok:
        figure("memory_vs_frames", "metrics.study.peak_mem_gib", "peak memory (GiB)", group="params.model.backbone",
               xcol="params.throughput.frames", xlabel="frames (dashed: storms plan)", extra=planned, label="{}")
    if "metrics.accuracy" in points and points["metrics.accuracy"].notna().any():
        figure("accuracy_vs_size", "metrics.accuracy", "accuracy", group="params.model.num_latents")
    return made


def _pipeline_rows(points):
    """Pipeline points: keep each pipeline's parent run (its stage and eval children carry the study tag too), with
    the eval child's latency and the backbone's size from the planner's meta-device shape."""
    if "tags.study_kind" not in points or not (points["tags.study_kind"] == "pipeline").any():
        return points
    from storms_dist.scale.shapes import backbone_shape

    names = points.get("tags.mlflow.runName").fillna("")
    pipes = points[names.str.endswith("/pipeline")].copy()
    evals = points[names.str.endswith("/eval")]
    latency = dict(zip(evals["tags.study_point"], evals.get("metrics.latency_ms_per_item", [None] * len(evals))))
    pipes["metrics.latency_ms_per_item"] = pipes["tags.study_point"].map(latency)
    pipes["metrics.study.num_params_b"] = [backbone_shape(b).total / 1e9 for b in pipes["params.model.backbone"]]
    pipes["tags.status"] = pipes["status"].map({"FINISHED": "ok"}).fillna(pipes["status"].str.lower())
    return pipes


def write_report(study_id: str, *, tracking, runs_dir, out_dir: str | Path | None = None) -> dict[str, Path]:
    from mlflow import MlflowClient

    runs = search_study(study_id, tracking=tracking, runs_dir=runs_dir)
    role = runs.get("tags.study_role")
    parent = runs[role == "parent"] if role is not None else runs.iloc[:0]
    points = runs[role != "parent"] if role is not None else runs
    points = _pipeline_rows(points)
    out = Path(out_dir) if out_dir else Path(runs_dir) / "studies" / study_id
    out.mkdir(parents=True, exist_ok=True)
    print(f"storms study report: {study_id}: {len(points)} point run(s)", flush=True)
    info = parent.iloc[0] if len(parent) else None
    head = [f"# Study {study_id}", ""]
    if info is not None:
        keys = ("git_sha", "hardware.cpu", "hardware.cpu_count", "hardware.gpu", "version.torch", "version.deepspeed",
                "version.transformers")
        head.append(", ".join(f"{k}: {info.get('tags.' + k)}" for k in keys if info.get("tags." + k) is not None))
        head.append(f"started {info.get('start_time')}")
        head.append("")
    text = "\n".join(head + [table(points), ""])
    md = out / "report.md"
    md.write_text(text)
    images = plots(points, out)
    if info is not None:
        from storms_dist.tracking import resolve_tracking_uri

        client = MlflowClient(resolve_tracking_uri(tracking, Path(runs_dir)))  # the store search_study read
        for path in [md, *images]:
            client.log_artifact(info["run_id"], str(path), artifact_path="report")
        # a Slurm study's parent stays RUNNING after submission; it ends with the report once every point has
        if info.get("status") == "RUNNING" and len(points) and (points["status"] != "RUNNING").all():
            client.set_terminated(info["run_id"], "FINISHED")
    return {"markdown": md, "plots": images, "parent_run_id": None if info is None else info["run_id"]}
