"""Thought-video targets on real synthetic thought videos: content, stamp, cache reuse and invalidation."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from storms_dist.data.dataset import DataConfig, load_video_inputs
from storms_dist.data.manifest import read_manifest
from storms_dist.data.preprocess import VisionSpec
from storms_dist.data.sampling import FrameSamplingConfig
from storms_dist.data.synth import SynthConfig, generate
from storms_dist.model.build import ModelConfig, build_model
from storms_dist.targets import (
    STAMP_FILE,
    TargetsConfig,
    TargetStore,
    build_targets,
    check_reusable,
    is_current,
    target_stamp,
    vision_fingerprint,
)

K = 3
TOKENS_PER_VIDEO = 16  # 8 frames / temporal patch 2 = 4, x 56x56 / 14^2 = 16 patches / 2x2 merge = 4 -> 16
GROUPS = [(0, 6), (6, 11), (11, 16)]  # 16 % 3 = 1: the first group takes the extra token


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "data"
    paths = generate(SynthConfig(task="balls", num_train=8, num_val=0, num_test=0, size=56, workers=1), root)
    samples = read_manifest(paths["train"])
    assert len(samples) == 8 and all(s.thought_path.is_file() for s in samples)
    return samples


@pytest.fixture(scope="module")
def few(samples):
    """Three samples: enough for the cache-invalidation tests, which rebuild several times."""
    return samples[:3]


@pytest.fixture(scope="module")
def base_cache(tmp_path_factory, model, spec, few) -> Path:
    """Targets of ``few`` at K with the default data settings, built once; tests copy it before touching it."""
    out = tmp_path_factory.mktemp("base") / "targets"
    build_targets(model, few, spec, data_cfg(), out, num_latents=K)
    return out


@pytest.fixture
def cache(tmp_path, base_cache) -> Path:
    out = tmp_path / "targets"
    shutil.copytree(base_cache, out)
    return out


def count_encodes(model, monkeypatch) -> list[int]:
    calls: list[int] = []
    encode = model.encode_video

    def counting(*args, **kwargs):
        calls.append(1)
        return encode(*args, **kwargs)

    monkeypatch.setattr(model, "encode_video", counting)
    return calls


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_model(ModelConfig(backbone="qwen2_5_vl-micro", dtype="float32", attn_implementation="sdpa"),
                       tokenizer, seed=0).eval()


@pytest.fixture(scope="module")
def spec(model) -> VisionSpec:
    return VisionSpec.from_hf_config(model.backbone.config)


def data_cfg(num_frames: int = 8, min_pixels: int = 3136, max_pixels: int = 3136) -> DataConfig:
    return DataConfig(frames=FrameSamplingConfig(fps=None, num_frames=num_frames, min_frames=4, max_frames=8),
                      min_pixels=min_pixels, max_pixels=max_pixels)


def shard_state(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted(directory.glob("shard-*.safetensors"))}


def reference_targets(model, spec, cfg: DataConfig, sample, groups) -> torch.Tensor:
    """One thought video alone through the vision encoder + merger, then hand-sliced group means."""
    video = load_video_inputs(sample.thought_path, spec, cfg)
    with torch.no_grad():
        tokens = model.encode_video(video.pixel_values_videos, video.video_grid_thw[None]).embeds_ND.float()
    assert tokens.shape[0] == groups[-1][1]
    return torch.stack([tokens[a:b].mean(0) for a, b in groups])


def test_targets_content_shape_and_stamp(tmp_path, model, spec, samples):
    cfg = data_cfg()
    out = tmp_path / "targets"
    store = build_targets(model, samples, spec, cfg, out, num_latents=K, cfg=TargetsConfig(batch_size=3, shard_size=4))
    assert isinstance(store, TargetStore) and len(store) == 8
    D = model.text_config.hidden_size
    uids = [s.uid for s in samples]
    batch = store[uids[:5]]
    assert batch.shape == (5, K, D) and batch.dtype == torch.float32
    assert torch.isfinite(batch).all()
    # different thought videos give different targets; the K groups of one video differ from each other
    assert not torch.allclose(batch[0], batch[1])
    assert not torch.allclose(batch[0, 0], batch[0, 1])
    # batched (3 videos per vision call) equals each video encoded alone and pooled by hand
    for index in (0, 4, 7):
        expected = reference_targets(model, spec, cfg, samples[index], GROUPS)
        torch.testing.assert_close(store[[uids[index]]][0], expected, rtol=1e-4, atol=1e-5)
    # stamped with everything that determines the content; no half-written folder left behind
    stamp = json.loads((out / STAMP_FILE).read_text())
    assert stamp == target_stamp(model, K, cfg, samples) == store.stamp
    assert stamp["num_latents"] == K and stamp["backbone"] == "qwen2_5_vl-micro" and stamp["num_samples"] == 8
    assert stamp["vision_fingerprint"] == vision_fingerprint(model)
    assert stamp["frames"]["num_frames"] == 8 and stamp["max_pixels"] == 3136
    assert is_current(out, stamp)
    assert not (tmp_path / "targets.tmp").exists()
    # several shards (shard_size 4), each uid stored once, reread from disk equals the returned store
    assert len(shard_state(out)) >= 2
    reread = TargetStore(out)
    assert len(reread) == 8 and torch.equal(reread[uids], store[uids])


def test_second_call_reuses_cache(model, spec, few, cache, monkeypatch):
    before = shard_state(cache)
    stamp_mtime = (cache / STAMP_FILE).stat().st_mtime_ns
    first = TargetStore(cache)
    uids = [s.uid for s in few]
    # an identical copy of the model (as when the pipeline reloads the same export) is the same cache
    twin = copy.deepcopy(model)
    for m in (model, twin):
        calls = count_encodes(m, monkeypatch)
        again = build_targets(m, few, spec, data_cfg(), cache, num_latents=K)
        assert calls == [], "a current cache must not re-encode thought videos"
        assert shard_state(cache) == before and (cache / STAMP_FILE).stat().st_mtime_ns == stamp_mtime
        assert torch.equal(again[uids], first[uids])


def test_builders_side_by_side_encode_once(tmp_path, model, spec, few, cache, monkeypatch):
    """Two methods trained at once (demo.parallel) build the same cache: one encodes, the other waits and reuses."""
    from concurrent.futures import ThreadPoolExecutor

    calls = count_encodes(model, monkeypatch)
    out = tmp_path / "side_by_side"
    with ThreadPoolExecutor(max_workers=2) as pool:
        stores = list(pool.map(lambda _: build_targets(model, few, spec, data_cfg(), out, num_latents=K), range(2)))
    batches_per_build = -(-len(few) // TargetsConfig().batch_size)
    assert len(calls) == batches_per_build, "the second builder must wait for the first and reuse its cache"
    uids = [s.uid for s in few]
    assert torch.equal(stores[0][uids], stores[1][uids]) and torch.equal(stores[0][uids], TargetStore(cache)[uids])
    assert not (tmp_path / "side_by_side.tmp").exists()


def rebuilt(model, spec, samples, out, cfg, num_latents) -> tuple[dict, dict]:
    old_stamp = json.loads((out / STAMP_FILE).read_text())
    build_targets(model, samples, spec, cfg, out, num_latents=num_latents)
    new_stamp = json.loads((out / STAMP_FILE).read_text())
    return old_stamp, new_stamp


def test_changing_k_rebuilds(model, spec, few, cache):
    cfg = data_cfg()
    uids = [s.uid for s in few]
    old = TargetStore(cache)[uids]
    old_stamp, new_stamp = rebuilt(model, spec, few, cache, cfg, 4)
    assert {k for k in old_stamp if old_stamp[k] != new_stamp[k]} == {"num_latents"}
    assert old_stamp["num_latents"] == K and new_stamp["num_latents"] == 4
    new = TargetStore(cache)[uids]
    assert old.shape[1] == K and new.shape[1] == 4
    torch.testing.assert_close(new[2], reference_targets(model, spec, cfg, few[2], [(0, 4), (4, 8), (8, 12), (12, 16)]),
                               rtol=1e-4, atol=1e-5)
    # back to K: rebuilt again, same content as the first build
    build_targets(model, few, spec, cfg, cache, num_latents=K)
    torch.testing.assert_close(TargetStore(cache)[uids], old)


def test_changing_vision_weight_rebuilds(model, spec, few, cache):
    cfg = data_cfg()
    uids = [s.uid for s in few]
    old = TargetStore(cache)[uids]
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.backbone.model.visual.blocks[0].mlp.up_proj.weight.mul_(1.5)
    assert vision_fingerprint(changed) != vision_fingerprint(model)
    old_stamp, new_stamp = rebuilt(changed, spec, few, cache, cfg, K)
    assert {k for k in old_stamp if old_stamp[k] != new_stamp[k]} == {"vision_fingerprint"}
    assert new_stamp["vision_fingerprint"] == vision_fingerprint(changed)
    new = TargetStore(cache)[uids]
    assert not torch.allclose(new, old)
    torch.testing.assert_close(new[1], reference_targets(changed, spec, cfg, few[1], GROUPS), rtol=1e-4, atol=1e-5)


def test_a_continuing_stage_reuses_stage1_cache_after_the_merger_moved(model, spec, few, cache, monkeypatch):
    """Stage II aligns to the cache Stage I aligned to: a moved merger must neither re-encode nor reject it, while a
    cache for another K or sample set is refused by name."""
    uids = [s.uid for s in few]
    before = (cache / STAMP_FILE).read_text(), TargetStore(cache)[uids]
    moved = copy.deepcopy(model)
    with torch.no_grad():
        next(moved.backbone.model.visual.merger.parameters()).add_(0.01)
    calls = count_encodes(moved, monkeypatch)
    store = check_reusable(cache, moved, few, data_cfg(), num_latents=K, cfg=TargetsConfig())
    assert calls == [] and (cache / STAMP_FILE).read_text() == before[0]
    torch.testing.assert_close(store[uids], before[1])
    with pytest.raises(ValueError, match="num_latents"):
        check_reusable(cache, moved, few, data_cfg(), num_latents=K + 1, cfg=TargetsConfig())
    with pytest.raises(ValueError, match="uids"):
        check_reusable(cache, moved, few[:2], data_cfg(), num_latents=K, cfg=TargetsConfig())
    with pytest.raises(FileNotFoundError, match="no target cache"):
        check_reusable(cache.parent / "absent", moved, few, data_cfg(), num_latents=K, cfg=TargetsConfig())


def test_changing_merger_weight_changes_fingerprint(model):
    changed = copy.deepcopy(model)
    with torch.no_grad():
        next(changed.backbone.model.visual.merger.parameters()).add_(0.01)
    assert vision_fingerprint(changed) != vision_fingerprint(model)


@pytest.mark.parametrize("changed, keys, groups", [
    # 4 frames -> 2 temporal patches -> 8 tokens: groups 3, 3, 2
    ({"num_frames": 4}, {"frames"}, [(0, 3), (3, 6), (6, 8)]),
    # a 28x28 pixel budget -> 1 merged token per temporal patch -> 4 tokens: groups 2, 1, 1
    ({"min_pixels": 784, "max_pixels": 784}, {"min_pixels", "max_pixels"}, [(0, 2), (2, 3), (3, 4)]),
    # a larger budget than the 56x56 videos need: same content, but the stamp differs, so it is rebuilt
    ({"max_pixels": 2 * 3136}, {"max_pixels"}, None),
], ids=["num_frames", "pixels", "max_pixels_only"])
def test_changing_frame_settings_rebuilds(model, spec, few, cache, monkeypatch, changed, keys, groups):
    uids = [s.uid for s in few]
    old = TargetStore(cache)[uids]
    cfg = data_cfg(**changed)
    calls = count_encodes(model, monkeypatch)
    old_stamp, new_stamp = rebuilt(model, spec, few, cache, cfg, K)
    assert calls and {k for k in old_stamp if old_stamp[k] != new_stamp[k]} == keys
    new = TargetStore(cache)[uids]
    assert new.shape == old.shape
    if groups is None:
        torch.testing.assert_close(new, old)
    else:
        assert not torch.allclose(new, old)
        torch.testing.assert_close(new[1], reference_targets(model, spec, cfg, few[1], groups), rtol=1e-4, atol=1e-5)


def test_lm_only_weight_keeps_fingerprint_and_cache(model, spec, few, cache, monkeypatch):
    before = shard_state(cache)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.backbone.model.language_model.layers[0].mlp.up_proj.weight.mul_(2.0)
        changed.backbone.model.language_model.norm.weight.add_(1.0)
        changed.backbone.get_input_embeddings().weight[:10].add_(1.0)  # embed group, tied with lm_head
    assert vision_fingerprint(changed) == vision_fingerprint(model)
    calls = count_encodes(changed, monkeypatch)
    build_targets(changed, few, spec, data_cfg(), cache, num_latents=K)
    assert calls == [] and shard_state(cache) == before


def test_changed_sample_set_or_tampered_stamp_rebuilds(model, spec, few, cache):
    cfg = data_cfg()
    store = build_targets(model, few[:2], spec, cfg, cache, num_latents=K)
    assert len(store) == 2 and store.stamp["num_samples"] == 2
    with pytest.raises(KeyError):
        store[[few[2].uid]]
    stamp_path = cache / STAMP_FILE
    stamp = json.loads(stamp_path.read_text())
    stamp_path.write_text(json.dumps({**stamp, "vision_fingerprint": "0" * 16}))
    assert not is_current(cache, target_stamp(model, K, cfg, few[:2]))
    build_targets(model, few[:2], spec, cfg, cache, num_latents=K)
    assert json.loads(stamp_path.read_text()) == stamp
    assert is_current(cache, stamp)
    assert not is_current(cache.parent / "elsewhere", stamp)


def test_missing_uid_raises_key_error_naming_folder(few, cache):
    store = TargetStore(cache)
    with pytest.raises(KeyError) as info:
        store[[few[0].uid, "no-such-uid"]]
    message = str(info.value)
    assert str(cache) in message and "no-such-uid" in message and few[0].uid not in message


def test_samples_without_thought_videos(tmp_path, model, spec, samples):
    no_thought = [dataclasses.replace(s, thought_video=None) for s in samples]
    with pytest.raises(ValueError, match="thought_video"):
        build_targets(model, no_thought, spec, data_cfg(), tmp_path / "targets", num_latents=K)
    assert not (tmp_path / "targets").exists()
    with pytest.raises(ValueError, match="thought_video"):
        build_targets(model, [], spec, data_cfg(), tmp_path / "targets", num_latents=K)
    # a mixed set: only the samples that have a thought video get targets
    mixed = [samples[0], no_thought[1], samples[2]]
    store = build_targets(model, mixed, spec, data_cfg(), tmp_path / "mixed", num_latents=K)
    assert len(store) == 2 and store.stamp["num_samples"] == 2
    assert store[[samples[2].uid]].shape == (1, K, model.text_config.hidden_size)
    with pytest.raises(KeyError):
        store[[samples[1].uid]]


def test_k_larger_than_visual_tokens_raises(tmp_path, model, spec, few):
    with pytest.raises(ValueError, match=f"cannot pool {TOKENS_PER_VIDEO} visual tokens into 17 groups"):
        build_targets(model, few[:1], spec, data_cfg(), tmp_path / "targets", num_latents=17)
    assert not (tmp_path / "targets" / STAMP_FILE).exists()


def test_standardized_store_centres_and_scales_every_slot_feature(few, cache):
    raw_store, std_store = TargetStore(cache), TargetStore(cache, normalize="standardize")
    uids = sorted(raw_store._targets)
    raw, standardized = raw_store[uids], std_store[uids]
    assert len(uids) >= 2 and standardized.shape == raw.shape
    torch.testing.assert_close(standardized.mean(0), torch.zeros_like(raw[0]), atol=1e-5, rtol=0)
    varying = raw.std(0) > 1e-6
    torch.testing.assert_close(standardized.std(0)[varying], torch.ones_like(raw[0])[varying], atol=1e-4, rtol=0)
    expected = (raw - raw.mean(0)) / torch.where(raw.std(0) > 1e-8, raw.std(0), torch.ones_like(raw[0]))
    torch.testing.assert_close(standardized, expected)
    with pytest.raises(ValueError, match="normalize"):
        TargetStore(cache, normalize="zscore")


def test_changing_the_decoder_rebuilds(model, spec, few, cache, monkeypatch):
    """PyAV and DALI RGB differ within a tolerance: targets from one are stale for the other."""
    cfg = dataclasses.replace(data_cfg(), decoder="pyav")
    assert data_cfg().decoder == "auto"
    calls = count_encodes(model, monkeypatch)
    old_stamp, new_stamp = rebuilt(model, spec, few, cache, cfg, K)
    assert calls and {k for k in old_stamp if old_stamp[k] != new_stamp[k]} == {"decoder"}
    assert new_stamp["decoder"] == "pyav"


def test_standardization_ignores_non_finite_samples():
    from storms_dist.targets import standardization

    targets = torch.tensor([[[1.0, 2.0]], [[3.0, 6.0]], [[float("nan"), 0.0]]])
    mean, std = standardization(targets)
    torch.testing.assert_close(mean, torch.tensor([[2.0, 4.0]]))
    torch.testing.assert_close(std, targets[:2].std(dim=0))


# ---- thought frames of two panels (the scene | a timer panel), pooled apart ----
@pytest.fixture(scope="module")
def panel_samples(tmp_path_factory):
    from storms_dist.data.synth.grid import GridTaskConfig

    task = GridTaskConfig(dynamics="flow", thought_cues=True, timer_panel="ball")
    paths = generate(SynthConfig(num_train=6, num_val=0, num_test=0, workers=1, grid=task),
                     tmp_path_factory.mktemp("panels") / "data")
    return read_manifest(paths["train"])


def panel_data() -> DataConfig:  # the grid's 28x28 clip budget; targets.pixels fits its 56x28 thought frames
    return DataConfig(frames=FrameSamplingConfig(fps=None, num_frames=16, min_frames=2, max_frames=16),
                      min_pixels=784, max_pixels=784)


def test_panels_are_pooled_apart_and_projected_into_disjoint_halves(tmp_path, model, spec, panel_samples):
    cfg = TargetsConfig(regions=2, normalize="region_pca", pixels=1568, batch_size=4)
    out = tmp_path / "targets"
    raw_store = build_targets(model, panel_samples, spec, panel_data(), out, num_latents=8, cfg=cfg)
    D = model.text_config.hidden_size
    uids = [s.uid for s in panel_samples]
    raw = raw_store[uids]
    assert raw.shape == (len(uids), 8, 2, D)
    # each panel's targets are the mean of that panel's tokens only: 16 frames / 2 = 8 temporal patches x 2 panels
    sample = panel_samples[0]
    video = load_video_inputs(sample.thought_path, spec, cfg.encoding_data(panel_data()))
    assert video.video_grid_thw.tolist() == [8, 2, 4]
    with torch.no_grad():
        tokens = model.encode_video(video.pixel_values_videos, video.video_grid_thw[None]).embeds_ND.float()
    torch.testing.assert_close(raw[0, :, 0], tokens[0::2], rtol=1e-4, atol=1e-5)  # one token per slot and panel
    torch.testing.assert_close(raw[0, :, 1], tokens[1::2], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(raw[0, :, 0], raw[0, :, 1])
    stamp = json.loads((out / STAMP_FILE).read_text())
    assert stamp["regions"] == 2 and stamp["min_pixels"] == stamp["max_pixels"] == 1568
    # region_pca: [K, D], each half one panel's coordinates at unit RMS, and the panel is recovered from its half
    store = TargetStore(out, normalize="region_pca")
    targets = store[uids]
    assert targets.shape == (len(uids), 8, D)
    from storms_dist.targets import apply_region_projection, region_projection

    projection = region_projection(raw)
    torch.testing.assert_close(targets, torch.stack([apply_region_projection(t, projection) for t in raw]))
    for region in range(2):
        half = targets[..., region * D // 2:(region + 1) * D // 2]
        assert abs(half.pow(2).mean().item() - 1.0) < 1e-3
        torch.testing.assert_close(half.mean((0, 1)), torch.zeros(D // 2), atol=1e-4, rtol=0)
    few_raw = raw[:3]  # 3 samples x 8 slots span < D/2 = 32 directions: the projection loses nothing
    few_projection = region_projection(few_raw)
    halves = torch.stack([apply_region_projection(t, few_projection) for t in few_raw]).split(D // 2, dim=-1)
    for region, (half, (centre, basis, rms)) in enumerate(zip(halves, few_projection)):
        torch.testing.assert_close(half * rms @ basis + centre, few_raw[:, :, region], rtol=1e-3, atol=3e-4)
    with pytest.raises(ValueError, match="regions 2 cannot be read with normalize 'standardize'"):
        TargetStore(out, normalize="standardize")


def test_panel_settings_are_checked(tmp_path, model, spec, panel_samples):
    with pytest.raises(ValueError, match="targets.pixels so a frame is 2 merged tokens"):  # the clip's 784 px
        build_targets(model, panel_samples[:2], spec, panel_data(), tmp_path / "targets", num_latents=8,
                      cfg=TargetsConfig(regions=2, normalize="region_pca"))
    assert not (tmp_path / "targets" / STAMP_FILE).exists()
    with pytest.raises(ValueError, match="need normalize: region_pca"):
        TargetsConfig(regions=2, normalize="standardize")
    with pytest.raises(ValueError, match="region_pca needs regions >= 2"):
        TargetsConfig(normalize="region_pca")
    with pytest.raises(ValueError, match="targets.regions"):
        TargetsConfig(regions=0)
    with pytest.raises(ValueError, match="targets.pixels"):
        TargetsConfig(pixels=0)
