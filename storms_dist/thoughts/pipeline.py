"""``storms thoughts``: generate a thought video for every sample of a manifest, sharded and resumable.

Per sample: keyframes of the source clip (when the backend or the prompt source needs them) -> prompt -> the
generator -> an atomically written video plus a small JSON record next to it. A shard (``shard_index`` of
``num_shards``: samples ``shard_index::num_shards`` in manifest order) writes its part of the output manifest when it
is done; the shard that finds every part present merges them into one manifest that ``storms targets`` consumes.

Output folder::

    OUT/
      thoughts_config.json                       stamp: the settings that determine the videos
      thoughts/<split>/<file_stem(uid)>.webm     thought videos (suffix per codec; files backend: the source's)
      thoughts/<split>/<file_stem(uid)>.json     per-sample record: the video's name, frame count, provenance
      <name>.part-00000-of-00004.jsonl           per-shard manifests (kept after merging: merging is idempotent)
      <name>.jsonl                               the merged manifest, same name as the input manifest

Resuming: a sample whose output video exists and decodes is skipped (its record is reused when present), so a
re-run, a requeued array task or a different shard count continues where the last run stopped. Changing a setting
that determines the videos (backend and its parameters, prompt source, keyframes, codec, fps, seed) is refused unless
``overwrite`` (which clears OUT's generated files first; use it from one process, not from an array).
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from storms_dist.data.manifest import SPLITS, ManifestError, Sample, read_manifest, sample_from_json, write_manifest
from storms_dist.data.video_io import SUFFIX_BY_CODEC, VideoDecodeError, probe_video, write_video
from storms_dist.thoughts.constants import CONDITIONS
from storms_dist.thoughts.generators import VIDEO_SUFFIXES, GenerationError, GenerationRequest, Generator
from storms_dist.thoughts.keyframes import KEYFRAME_METHODS, Keyframes, pick_condition, select_keyframes
from storms_dist.thoughts.naming import file_stem  # noqa: F401  (re-exported)
from storms_dist.thoughts.prompts import PromptError, PromptSource

STAMP_NAME = "thoughts_config.json"
THOUGHTS_DIR = "thoughts"
STAMP_VERSION = 1


class ThoughtsError(RuntimeError):
    """A run or merge that cannot proceed (settings changed, parts missing, a sample failed in raise mode). One line."""


@dataclass(kw_only=True)
class ThoughtsSettings:
    keyframes: Literal["uniform", "scene_change"] = "uniform"
    num_keyframes: int = 4
    condition: Literal["auto", "first", "middle", "last"] = "auto"
    """Which keyframe image-to-video starts from; auto: the teacher's pick, else the first."""
    codec: Literal["vp9", "h264", "mjpeg"] | None = None
    """None: the generator's preference (procedural: the synthetic set's codec), else vp9."""
    fps: float | None = None
    """None: the generator's frame rate."""
    seed: int = 0
    """Base seed; a sample's seed is derived from it and its uid (independent of sharding)."""
    splits: tuple[str, ...] | None = None
    """Only samples of these splits get thought videos; the others pass through unchanged (None: all)."""
    on_error: Literal["raise", "skip"] = "raise"
    """skip: a failing sample is recorded (no thought video) and the shard goes on; it is retried on the next run."""

    def __post_init__(self) -> None:
        if self.keyframes not in KEYFRAME_METHODS:
            raise ValueError(f"keyframes: expected one of {', '.join(KEYFRAME_METHODS)}, got {self.keyframes!r}")
        if isinstance(self.num_keyframes, bool) or not isinstance(self.num_keyframes, int) or self.num_keyframes < 1:
            raise ValueError(f"num_keyframes: expected an int >= 1, got {self.num_keyframes!r}")
        if self.condition not in CONDITIONS:
            raise ValueError(f"condition: expected one of {', '.join(CONDITIONS)}, got {self.condition!r}")
        if self.codec is not None and self.codec not in SUFFIX_BY_CODEC:
            raise ValueError(f"codec: expected one of {', '.join(SUFFIX_BY_CODEC)}, got {self.codec!r}")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps: expected > 0, got {self.fps}")
        if self.splits is not None:
            self.splits = tuple(self.splits)
            unknown = [s for s in self.splits if s not in SPLITS]
            if unknown or not self.splits:
                raise ValueError(f"splits: expected some of {', '.join(SPLITS)}, got {list(self.splits)}")
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error: expected raise or skip, got {self.on_error!r}")


# ---------------------------------------------------------------------------------------------------- small helpers


def sample_seed(base_seed: int, uid: str) -> int:
    return (int(base_seed) * 1_000_003 + zlib.crc32(uid.encode())) % (2**31 - 1)


def resolve_shard(shard_index: int | None = None, num_shards: int | None = None,
                  environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(index, count)``: the arguments, else a Slurm array (``SLURM_ARRAY_TASK_ID`` minus ``SLURM_ARRAY_TASK_MIN``,
    of ``SLURM_ARRAY_TASK_COUNT``), else torchrun's ``RANK`` of ``WORLD_SIZE``, else ``(0, 1)``."""
    env = os.environ if environ is None else environ
    if shard_index is None or num_shards is None:
        if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
            offset = int(env.get("SLURM_ARRAY_TASK_MIN", "0"))
            default = (int(env["SLURM_ARRAY_TASK_ID"]) - offset, int(env["SLURM_ARRAY_TASK_COUNT"]))
        elif "RANK" in env and "WORLD_SIZE" in env:
            default = (int(env["RANK"]), int(env["WORLD_SIZE"]))
        else:
            default = (0, 1)
        shard_index = default[0] if shard_index is None else shard_index
        num_shards = default[1] if num_shards is None else num_shards
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard {shard_index} of {num_shards}: expected 0 <= shard index < number of shards")
    return shard_index, num_shards


def part_path(out_dir: Path, manifest_name: str, index: int, count: int) -> Path:
    return Path(out_dir) / f"{Path(manifest_name).stem}.part-{index:05d}-of-{count:05d}.jsonl"


def output_manifest_path(manifest_path: str | Path, out_dir: str | Path) -> Path:
    return Path(out_dir) / Path(manifest_path).name


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp{target.suffix}")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------- stamp


def settings_stamp(generator: Generator, prompt_source: PromptSource | None, settings: ThoughtsSettings) -> dict:
    """Everything that determines the videos (not the shard layout, the splits or the error policy)."""
    prompt = None
    if generator.needs_prompt and prompt_source is not None:
        prompt = {k: v for k, v in prompt_source.config().items() if k != "url"}  # the model, not where it is served
    uses_keyframes = generator.needs_keyframes or (prompt is not None and prompt_source.needs_keyframes)
    return {"version": STAMP_VERSION, "generator": generator.config(), "prompt": prompt,
            "keyframes": ({"method": settings.keyframes, "num_keyframes": settings.num_keyframes,
                           "condition": settings.condition} if uses_keyframes else None),
            "codec": settings.codec, "fps": settings.fps, "seed": settings.seed}


def _check_or_write_stamp(out_dir: Path, stamp: dict, *, overwrite: bool, manifest_name: str) -> None:
    path = out_dir / STAMP_NAME
    if overwrite:
        shutil.rmtree(out_dir / THOUGHTS_DIR, ignore_errors=True)
        for stale in out_dir.glob(f"{Path(manifest_name).stem}.part-*.jsonl"):
            stale.unlink()
        (out_dir / manifest_name).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    if path.is_file():
        try:
            existing = json.loads(path.read_text())
        except ValueError:
            existing = None
        if existing != stamp:
            old = existing if isinstance(existing, dict) else {}
            keys = sorted(k for k in set(stamp) | set(old) if old.get(k) != stamp.get(k)) or ["(unreadable stamp)"]
            raise ThoughtsError(f"{path}: {out_dir} holds thought videos made with other settings ({', '.join(keys)} "
                                "differ); use another --out, or --overwrite to clear it")
        return
    _atomic_write_text(path, json.dumps(stamp, indent=2, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------------------- one sample


def _record_path(stem_path: Path) -> Path:
    return Path(f"{stem_path}.json")


def finished_output(stem_path: Path, uid: str) -> tuple[Path, dict] | None:
    """The decodable output video of a finished sample and its provenance, else None.

    The per-sample record names the video; without a record (a run stopped between writing the video and the
    record) any decodable ``<stem><suffix>`` counts, with ``{"resumed_without_record": true}`` as provenance."""
    record_path = _record_path(stem_path)
    if record_path.is_file():  # the record decides: a video that does not match it (truncated, replaced) is redone
        try:
            record = json.loads(record_path.read_text())
            video = stem_path.parent / record["video"]
            if record.get("uid") == uid and probe_video(video).num_frames == record.get("num_frames"):
                return video, record.get("thought_gen", {})
        except (ValueError, KeyError, TypeError, OSError, VideoDecodeError):
            pass
        return None
    for suffix in VIDEO_SUFFIXES:
        video = Path(f"{stem_path}{suffix}")
        if video.is_file():
            try:
                probe_video(video)
            except VideoDecodeError:
                continue
            return video, {"resumed_without_record": True}
    return None


def _rooted(sample: Sample, out_dir: Path, **changes: Any) -> Sample:
    """``sample`` re-rooted at ``out_dir`` (paths rewritten to still point at the same files), with ``changes``."""
    record = sample.to_json_dict(out_dir)
    record.update(changes)
    return sample_from_json(record, out_dir.resolve())


def generate_one(sample: Sample, out_dir: Path, generator: Generator, prompt_source: PromptSource | None,
                 settings: ThoughtsSettings) -> tuple[Path, dict]:
    """Make, write and record one thought video; returns ``(video path, provenance)``."""
    stem_path = out_dir / THOUGHTS_DIR / sample.split / file_stem(sample.uid)
    use_prompt = generator.needs_prompt and prompt_source is not None
    keyframes: Keyframes | None = None
    if generator.needs_keyframes or (use_prompt and prompt_source.needs_keyframes):
        keyframes = select_keyframes(sample.video_path, settings.keyframes, settings.num_keyframes,
                                     start_s=sample.start_s, end_s=sample.end_s)
    prompt = prompt_source(sample, keyframes) if use_prompt else None
    condition = None
    if keyframes is not None:
        condition = pick_condition(keyframes, settings.condition, prompt.condition if prompt else None)
    seed = sample_seed(settings.seed, sample.uid)
    generated = generator.generate(GenerationRequest(sample=sample, seed=seed, keyframes=keyframes,
                                                     condition=condition, prompt=prompt.text if prompt else None))
    if generated.source_path is not None:
        video = Path(f"{stem_path}{generated.source_path.suffix.lower()}")
        _atomic_copy(generated.source_path, video)
    else:
        codec = settings.codec or generated.codec or "vp9"
        fps = settings.fps or generated.fps or 8.0
        video = Path(f"{stem_path}{SUFFIX_BY_CODEC[codec]}")
        write_video(video, generated.frames, fps, codec)
    num_frames = probe_video(video).num_frames
    provenance: dict[str, Any] = {"backend": generator.name, "num_frames": num_frames}
    if prompt is not None:
        provenance.update(prompt=prompt.text, prompt_source=prompt.source)
        if prompt.condition is not None:
            provenance["teacher_keyframe"] = prompt.condition
    if keyframes is not None:
        provenance["keyframes"] = keyframes.to_json()
        provenance["condition_frame"] = keyframes.indices[condition]
    provenance.update(generated.info)
    record = {"uid": sample.uid, "video": video.name, "num_frames": num_frames, "thought_gen": provenance}
    _atomic_write_text(_record_path(stem_path), json.dumps(record, ensure_ascii=False, indent=1) + "\n")
    return video, provenance


# ---------------------------------------------------------------------------------------------------- a shard


@dataclass
class ShardReport:
    shard_index: int
    num_shards: int
    num_samples: int = 0
    generated: int = 0
    resumed: int = 0
    passed_through: int = 0
    failed: list[str] = field(default_factory=list)
    """``"uid: message"`` per sample that has no thought video (skip mode)."""
    part: Path | None = None
    merged: Path | None = None
    merge_note: str | None = None
    seconds: float = 0.0

    def summary(self) -> str:
        merged = f"merged -> {self.merged}" if self.merged else (self.merge_note or "not merged")
        return (f"shard {self.shard_index}/{self.num_shards}: {self.num_samples} samples, {self.generated} generated, "
                f"{self.resumed} already done, {self.passed_through} passed through, {len(self.failed)} failed "
                f"({self.seconds:.1f} s); part {self.part}; {merged}")


def run_thoughts(manifest_path: str | Path, out_dir: str | Path, generator: Generator,
                 prompt_source: PromptSource | None, settings: ThoughtsSettings | None = None, *,
                 shard_index: int | None = None, num_shards: int | None = None, overwrite: bool = False,
                 auto_merge: bool = True, drop_failed: bool = False, progress: bool = False) -> ShardReport:
    """Generate the thought videos of one shard of ``manifest_path`` into ``out_dir`` and write its part; merge
    when every part is there (``auto_merge``). See the module docstring for the layout and the resume rules."""
    started = time.perf_counter()
    settings = settings or ThoughtsSettings()
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    if out_dir.resolve() == manifest_path.parent.resolve():
        raise ThoughtsError(f"--out {out_dir}: expected another folder than the manifest's (the output manifest has "
                            "the input's name)")
    index, count = resolve_shard(shard_index, num_shards)
    samples = read_manifest(manifest_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_or_write_stamp(out_dir, settings_stamp(generator, prompt_source, settings), overwrite=overwrite,
                          manifest_name=manifest_path.name)
    mine = list(samples)[index::count]
    report = ShardReport(shard_index=index, num_shards=count, num_samples=len(mine))
    from tqdm import tqdm

    outputs: list[Sample] = []
    for sample in tqdm(mine, desc=f"thoughts {index}/{count}", unit="video", disable=not progress):
        if settings.splits is not None and sample.split not in settings.splits:
            outputs.append(_rooted(sample, out_dir))
            report.passed_through += 1
            continue
        stem_path = out_dir / THOUGHTS_DIR / sample.split / file_stem(sample.uid)
        done = None if overwrite else finished_output(stem_path, sample.uid)
        if done is not None:
            video, provenance = done
            report.resumed += 1
        else:
            try:
                video, provenance = generate_one(sample, out_dir, generator, prompt_source, settings)
                report.generated += 1
            except (GenerationError, PromptError, VideoDecodeError, ValueError, OSError) as e:
                message = " ".join(str(e).split())
                if settings.on_error == "raise":
                    raise ThoughtsError(message if message.startswith(sample.uid) else
                                        f"{sample.uid}: {message}") from None
                report.failed.append(f"{sample.uid}: {message}")
                outputs.append(_rooted(sample, out_dir, thought_video=None,
                                       meta={**sample.meta, "thought_gen": {"backend": generator.name,
                                                                            "error": message}}))
                continue
        relative = video.resolve().relative_to(out_dir.resolve()).as_posix()
        outputs.append(_rooted(sample, out_dir, thought_video=relative,
                               meta={**sample.meta, "thought_gen": provenance}))
    report.part = part_path(out_dir, manifest_path.name, index, count)
    write_manifest(report.part, outputs)
    if auto_merge:
        parts = [part_path(out_dir, manifest_path.name, i, count) for i in range(count)]
        if all(p.is_file() for p in parts):
            try:
                report.merged = merge_thoughts(manifest_path, out_dir, count, drop_failed=drop_failed).path
            except ThoughtsError as e:
                report.merge_note = f"not merged: {e}"
        else:
            waiting = sum(not p.is_file() for p in parts)
            report.merge_note = f"not merged yet: {waiting} of {count} parts missing"
    report.seconds = time.perf_counter() - started
    return report


# ---------------------------------------------------------------------------------------------------- merge


@dataclass
class MergeReport:
    path: Path
    num_samples: int
    dropped: list[str]


def merge_thoughts(manifest_path: str | Path, out_dir: str | Path, num_shards: int, *,
                   drop_failed: bool = False) -> MergeReport:
    """Merge the ``num_shards`` parts into ``OUT/<manifest name>`` in the input manifest's order (atomic write).

    Every part must exist and together they must hold exactly the input's uids. Samples whose generation failed
    (no thought video) make the merge fail unless ``drop_failed``, which leaves them out of the merged manifest."""
    manifest_path, out_dir = Path(manifest_path), Path(out_dir)
    if num_shards < 1:
        raise ValueError(f"num_shards: expected >= 1, got {num_shards}")
    parts = [part_path(out_dir, manifest_path.name, i, num_shards) for i in range(num_shards)]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise ThoughtsError(f"{out_dir}: {len(missing)} of {num_shards} parts missing ({', '.join(missing[:3])}"
                            f"{' ...' if len(missing) > 3 else ''}): did every shard finish?")
    wanted = [s.uid for s in read_manifest(manifest_path)]
    by_uid: dict[str, Sample] = {}
    for part in parts:
        try:
            part_samples = read_manifest(part)
        except ManifestError as e:
            raise ThoughtsError(f"part: {e}") from None
        for sample in part_samples:
            if sample.uid in by_uid:
                raise ThoughtsError(f"{part}: uid {sample.uid!r} is also in another part")
            by_uid[sample.uid] = sample
    unknown = sorted(set(by_uid) - set(wanted))
    absent = [u for u in wanted if u not in by_uid]
    if unknown or absent:
        raise ThoughtsError(f"{out_dir}: the parts do not match {manifest_path} ({len(absent)} uids missing, "
                            f"{len(unknown)} unknown, e.g. {(absent + unknown)[:3]}): was the manifest changed? "
                            "Re-run every shard")
    ordered = [by_uid[u] for u in wanted]
    failed = [s.uid for s in ordered if "error" in s.meta.get("thought_gen", {})]
    if failed and not drop_failed:
        raise ThoughtsError(f"{len(failed)} samples have no thought video (e.g. {failed[:3]}); re-run their shards "
                            "(finished samples are skipped) or merge with --drop-failed")
    kept = [s for s in ordered if s.uid not in set(failed)]
    path = output_manifest_path(manifest_path, out_dir)
    write_manifest(path, kept)
    return MergeReport(path=path, num_samples=len(kept), dropped=failed)


__all__ = ["ThoughtsSettings", "ThoughtsError", "ShardReport", "MergeReport", "run_thoughts", "merge_thoughts",
           "resolve_shard", "file_stem", "sample_seed", "finished_output", "generate_one", "part_path",
           "output_manifest_path", "settings_stamp", "STAMP_NAME", "THOUGHTS_DIR"]
