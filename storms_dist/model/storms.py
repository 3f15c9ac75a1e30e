"""STORMS: a video LVLM that reasons in K continuous latent steps before answering.

Forward modes (one ``nn.Module.forward`` so a DeepSpeed engine can wrap it; ZeRO-3 gathers each submodule as it runs):

- ``single``: one pass over ``[prefix | slots | suffix]``. With ``targets`` the thought-video targets sit in the slots
  (teacher-forced Stage I, Mirage style); with K = 0 it is plain answer-only SFT.
- ``rollout``: prefill up to ``<|latent_start|>``, then K one-column passes reusing the KV cache, each feeding the
  last hidden state back as the next input embedding, then one pass over the suffix. With ``targets`` the K latent
  states are aligned to them (Stage I, rollout variant); without, it is Stage II.
- ``joint`` (Stage I, needs targets): the teacher-forced ``single`` loss plus ``rollout_weight`` x lambda x the
  alignment of a rollout whose slot inputs are the model's own latents with the gradient cut between steps. The
  teacher-forced pass learns each step from true inputs; the rollout term teaches the steps to correct their own
  errors -- the one Stage I under which the rolled-out latents approached the targets (docs/results.md, session 6).
  ``teacher_noise`` (single / joint with targets) adds Gaussian noise to the teacher-forced slot inputs only.
  ``answer_pass`` picks whose answer CE trains (the teacher-forced pass's, the rollout's, or both) and ``chain_grad``
  lets the rollout's gradient flow along the chain: the joint objective with the answer read as inference reads it
  (docs/results.md, session 22: it lost to the teacher's answer on never-seen pairs).
  ``answer_grad`` (rollout mode, or joint with the rollout's answer): ``latents`` lets that answer CE reach the
  weights only through the rolled-out latent states, so it can change what the latents hold but not fit the readout.

The latent state aligned with slot k is the hidden state of the position before it -- exactly the embedding the
rollout feeds into slot k -- so both modes align the same quantity.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator, Literal

import torch
from torch import nn
from transformers import DynamicCache
from transformers.utils import ModelOutput

from storms_dist.model.latent import (
    IGNORE_INDEX,
    AlignLoss,
    LatentTokenIds,
    SlotLayout,
    alignment_loss,
)
from storms_dist.model.latent_cache import PrefixTailCache, latent_passes
from storms_dist.model.mrope import continuation_positions, mrope_positions
from storms_dist.model.registry import BackboneSpec
from storms_dist.train.distributed import all_reduce_max

ForwardMode = Literal["single", "rollout", "joint"]
AnswerPass = Literal["teacher", "rollout", "both"]
AnswerGrad = Literal["all", "latents"]


@dataclass
class VisualFeatures:
    embeds_ND: torch.Tensor
    """Merged visual tokens of every video in the batch, concatenated in batch order."""
    deepstack_ND: list[torch.Tensor] | None = None
    """Qwen3-VL: per-layer visual features added to early decoder layers (DeepStack); None for Qwen2.5-VL."""


@dataclass
class STORMSOutput(ModelOutput):
    """A ModelOutput (an ordered dict) so DeepSpeed's ZeRO-3 module hooks see the tensors it returns."""

    loss: torch.Tensor | None = None
    ce: torch.Tensor | None = None
    align: torch.Tensor | None = None
    num_answer_tokens: int | None = None
    latents_BKD: torch.Tensor | None = None


def forward_option_error(*, mode: ForwardMode, num_latents: int | None, aligned: bool, teacher_noise: float,
                         detach_chain: bool, answer_pass: AnswerPass, chain_grad: bool,
                         answer_grad: AnswerGrad) -> str | None:
    """The first rule a combination of forward options breaks, as ``'<option>: why'``, or None. Each option belongs
    to some modes; a wrong combination is an error, not a silently ignored flag. One statement of the rules for both
    callers: the model checks each call (``aligned`` = targets given), StageConfig its fields (``aligned`` = align,
    ``num_latents`` None = the model's K, some K > 0)."""
    if aligned and num_latents == 0:
        return "align: thought-video targets need latent slots, but num_latents is 0"
    if mode == "joint" and not aligned:
        return "mode: 'joint' aligns the latents to thought-video targets; set align: true (Stage I)"
    if teacher_noise < 0:
        return f"teacher_noise: expected >= 0, got {teacher_noise}"
    if teacher_noise and not (aligned and mode in ("single", "joint")):
        return (f"teacher_noise: perturbs teacher-forced slot inputs; it needs align: true and mode 'single' or "
                f"'joint', got align {aligned}, mode {mode!r}")
    if detach_chain and mode != "rollout":
        return f"detach_chain: cuts the gradient between rollout steps; it needs mode 'rollout', got {mode!r}"
    for name, value in (("answer_pass", answer_pass != "teacher"), ("chain_grad", chain_grad)):
        if value and mode != "joint":
            return (f"{name}: chooses between joint mode's teacher-forced and rolled-out passes; it needs mode "
                    f"'joint', got {mode!r}")
    if answer_grad == "latents" and num_latents == 0:
        return "answer_grad: 'latents' routes the answer CE through the latent states, but num_latents is 0"
    if answer_grad == "latents" and not (mode == "rollout" or answer_pass != "teacher"):
        return (f"answer_grad: 'latents' routes the rollout's answer CE through its latent states; it needs mode "
                f"'rollout', or 'joint' with answer_pass 'rollout' or 'both'; got mode {mode!r}, answer_pass "
                f"{answer_pass!r}")
    return None


def check_forward_options(mode: ForwardMode, num_latents: int, targets_BKD: torch.Tensor | None, *,
                          teacher_noise: float, detach_chain: bool, answer_pass: AnswerPass, chain_grad: bool,
                          answer_grad: AnswerGrad) -> None:
    """A forward call's options: the values a direct caller may mistype, the targets' shape, then the shared rules."""
    if answer_pass not in ("teacher", "rollout", "both"):
        raise ValueError(f"answer_pass: expected 'teacher', 'rollout' or 'both', got {answer_pass!r}")
    if answer_grad not in ("all", "latents"):
        raise ValueError(f"answer_grad: expected 'all' or 'latents', got {answer_grad!r}")
    if targets_BKD is not None and num_latents and targets_BKD.shape[1] != num_latents:
        raise ValueError(f"targets have {targets_BKD.shape[1]} slots, batch has K={num_latents}")
    error = forward_option_error(mode=mode, num_latents=num_latents, aligned=targets_BKD is not None,
                                 teacher_noise=teacher_noise, detach_chain=detach_chain, answer_pass=answer_pass,
                                 chain_grad=chain_grad, answer_grad=answer_grad)
    if error:
        raise ValueError(error)


class STORMSModel(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        spec: BackboneSpec,
        token_ids: LatentTokenIds,
        *,
        align_loss: AlignLoss = "mse",
        align_weight: float = 0.1,
    ):
        super().__init__()
        self.backbone = backbone
        self.spec = spec
        self.token_ids = token_ids
        self.align_loss = align_loss
        self.align_weight = align_weight
        self.video_token_id = backbone.config.video_token_id
        self.gather_latent_passes = False
        """ZeRO-3: keep the decoder's parameters gathered from the prefill to the suffix pass (one all-gather per
        parameter instead of one per pass). Set by the trainer from ``deepspeed.gather_latent_passes``."""
        self.sync_ranks = False
        """Under ZeRO-3 with several ranks every rank must run the same modules the same number of times (each
        call all-gathers parameters): set by the trainer when world_size > 1."""
        self.latent_attention = "off"
        """Rollout attention (``model.latent_attention``): off = DynamicCache, whose every pass copies the prefix
        K/V; auto / triton / torch = ``model/latent_cache.py`` (prefix stored once) on that kernel backend."""

    # ---- backbone pieces (each call runs a submodule, so ZeRO-3 gathers it) ----
    @property
    def text_config(self):
        return self.backbone.config.text_config

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.get_input_embeddings()(input_ids)

    def encode_video(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor) -> VisualFeatures:
        """Vision encoder + merger: merged visual tokens in LLM space (also what thought-video targets pool)."""
        out = self.backbone.model.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
        embeds = torch.cat(list(out.pooler_output), dim=0)
        deepstack = getattr(out, "deepstack_features", None)
        if deepstack is not None:
            deepstack = [torch.cat(list(f), dim=0) if isinstance(f, (list, tuple)) else f for f in deepstack]
        return VisualFeatures(embeds, deepstack)

    def rope_positions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """3D mRoPE positions [3, B, L] for the batch's full sequence (computed once, sliced per pass), under the
        project's rule (``model/mrope.py``), not the installed transformers' ``get_rope_index``."""
        vision_config = self.backbone.config.vision_config
        return mrope_positions(
            batch["mm_token_type_ids"],
            batch["attention_mask"],
            batch.get("video_grid_thw"),
            family=self.spec.family,
            spatial_merge_size=vision_config.spatial_merge_size,
            tokens_per_second=getattr(vision_config, "tokens_per_second", None),
            second_per_grid_ts_N=batch.get("second_per_grid_ts"),
        )

    def input_embeddings(self, input_ids: torch.Tensor, visual: VisualFeatures | None) -> torch.Tensor:
        embeds_BLD = self.embed(input_ids)
        if visual is not None:
            video_mask_BL1 = (input_ids == self.video_token_id).unsqueeze(-1)
            embeds_BLD = embeds_BLD.masked_scatter(video_mask_BL1, visual.embeds_ND.to(embeds_BLD.dtype))
        return embeds_BLD

    def decoder(
        self,
        embeds_BTD: torch.Tensor,
        pos_3BT: torch.Tensor,
        attention_mask_BS: torch.Tensor,
        cache: DynamicCache | None,
        *,
        visual: VisualFeatures | None = None,
        video_mask_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Language model over T new columns (S = cached + T for the mask); returns last-layer hidden states."""
        kwargs = {}
        if visual is not None and visual.deepstack_ND is not None and video_mask_BT is not None:
            kwargs = dict(visual_pos_masks=video_mask_BT, deepstack_visual_embeds=visual.deepstack_ND)
        out = self.backbone.model.language_model(
            inputs_embeds=embeds_BTD,
            position_ids=pos_3BT,
            attention_mask=attention_mask_BS,
            past_key_values=cache,
            use_cache=cache is not None,
            **kwargs,
        )
        return out.last_hidden_state

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.text_config)

    # ---- training forward ----
    def forward(
        self,
        batch: dict[str, torch.Tensor],
        layout: SlotLayout,
        *,
        mode: ForwardMode,
        targets_BKD: torch.Tensor | None = None,
        rollout_weight: float = 1.0,
        teacher_noise: float = 0.0,
        detach_chain: bool = False,
        answer_pass: AnswerPass = "teacher",
        chain_grad: bool = False,
        answer_grad: AnswerGrad = "all",
    ) -> STORMSOutput:
        num_latents = layout.num_latents
        check_forward_options(mode, num_latents, targets_BKD, teacher_noise=teacher_noise, detach_chain=detach_chain,
                              answer_pass=answer_pass, chain_grad=chain_grad, answer_grad=answer_grad)
        rollout_requested = mode in ("rollout", "joint")
        if mode == "rollout" and num_latents == 0:
            mode = "single"  # nothing to roll out: K=0 is one pass

        input_ids = batch["input_ids"]
        num_steps = num_latents  # latent passes this rank runs: the max K over ranks when they are synchronised
        visual, zero_term = None, None
        if self.sync_ranks:
            max_k, neg_min_k = all_reduce_max([num_latents, -num_latents])
            num_steps = int(max_k)
            if rollout_requested and num_steps > 0 and neg_min_k == 0:
                raise ValueError(f"ranks mix K=0 and K={num_steps} batches in one rollout step: their forward "
                                 f"passes cannot be matched under ZeRO-3; keep K > 0 on every rank (all ranks raise)")
        if batch.get("pixel_values_videos") is not None:
            visual = self.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
        elif self.sync_ranks:  # other ranks may run the vision tower: run it too, on a dummy input, times zero
            zero_term = self._dummy_visual_term()
        pos_3BL = self.rope_positions(batch)
        embeds_BLD = self.input_embeddings(input_ids, visual)
        video_mask_BL = input_ids == self.video_token_id
        # what every pass reads
        inputs = (batch, layout, targets_BKD, embeds_BLD, pos_3BL, visual, video_mask_BL, num_steps)
        if mode == "joint":
            out = self._joint(inputs, rollout_weight=rollout_weight, teacher_noise=teacher_noise,
                              answer_pass=answer_pass, chain_grad=chain_grad, answer_grad=answer_grad)
        elif answer_grad == "latents":
            out = self._rollout_through_latents(inputs, detach_chain=detach_chain)
        else:
            out = self._forward_mode(mode, *inputs, teacher_noise=teacher_noise, detach_inputs=detach_chain)
        if zero_term is not None:
            out.loss = out.loss + zero_term
        return out

    def _joint(self, inputs, *, rollout_weight: float, teacher_noise: float, answer_pass: AnswerPass,
               chain_grad: bool, answer_grad: AnswerGrad) -> STORMSOutput:
        """Teacher-forced pass (answer CE + lambda * alignment) + rollout_weight * lambda * the rollout's alignment;
        ``answer_pass`` moves the answer CE onto the rollout or adds it there (``answer_grad``: through the latents
        only, or into every weight), ``chain_grad`` keeps the chain's gradient (cut by default: each step learns from
        its own input as given)."""
        targets_BKD = inputs[2]
        out = self._forward_mode("single", *inputs, teacher_noise=teacher_noise)
        # the rollout without targets: its loss, when it runs the suffix, is its answer CE alone
        rolled = self._forward_mode("rollout", *inputs[:2], None, *inputs[3:], detach_inputs=not chain_grad,
                                    latents_only=answer_pass == "teacher" or answer_grad == "latents")
        rollout_align = alignment_loss(rolled.latents_BKD, targets_BKD, self.align_loss)
        if answer_pass != "teacher":  # the answer CE read through the model's own latents, as inference reads it
            answered = rolled if answer_grad == "all" else self._answer_through_latents(inputs, rolled.latents_BKD)
            rollout_ce, out.ce = answered.loss, answered.ce
            if answer_pass == "rollout":  # the teacher-forced pass keeps only its alignment
                out.loss = self.align_weight * alignment_loss(out.latents_BKD, targets_BKD, self.align_loss)
            out.loss = out.loss + rollout_ce
        out.loss = out.loss + rollout_weight * self.align_weight * rollout_align
        out.align = rollout_align.detach()  # what inference sees: the rolled-out latents' distance
        out.latents_BKD = rolled.latents_BKD
        return out

    def _rollout_through_latents(self, inputs, *, detach_chain: bool) -> STORMSOutput:
        """Rollout mode with ``answer_grad='latents'``: the answer CE through the latents, plus Stage II's anchor on
        Stage I's targets when they are given."""
        targets_BKD = inputs[2]
        rolled = self._forward_mode("rollout", *inputs, detach_inputs=detach_chain, latents_only=True)
        out = self._answer_through_latents(inputs, rolled.latents_BKD)
        if targets_BKD is not None:
            align = alignment_loss(rolled.latents_BKD, targets_BKD, self.align_loss)
            out.loss, out.align = out.loss + self.align_weight * align, align.detach()
        return out

    def _answer_through_latents(self, inputs, latents_BKD: torch.Tensor) -> STORMSOutput:
        """Answer CE whose gradient reaches the weights only through the rolled-out latent states z: the CE of one
        pass with z in the slots minus the CE of the same pass with z held constant. Both terms share the weights'
        direct gradient, so the difference keeps only dCE/dz * dz/dtheta (its value is 0; the reported CE is the live
        pass's): the readout is not fitted to the answers by itself (docs/results.md, session 23).
        Two full passes instead of one suffix pass; every rank runs both."""
        live = self._forward_mode("single", *inputs, slot_inputs_BKD=latents_BKD)
        held = self._forward_mode("single", *inputs, slot_inputs_BKD=latents_BKD.detach())
        return STORMSOutput(loss=live.loss - held.loss, ce=live.ce, num_answer_tokens=live.num_answer_tokens,
                            latents_BKD=latents_BKD)

    def _dummy_visual_term(self) -> torch.Tensor:
        """Vision tower + merger on the smallest valid video (one temporal patch, one merged token), times 0."""
        vision_config = self.backbone.config.vision_config
        merge, patch = vision_config.spatial_merge_size, vision_config.patch_size
        grid_thw = torch.tensor([[1, merge, merge]], device=self.backbone.device)
        num_features = vision_config.in_channels * vision_config.temporal_patch_size * patch * patch
        pixels = torch.zeros(merge * merge, num_features, device=self.backbone.device, dtype=self.backbone.dtype)
        visual = self.encode_video(pixels, grid_thw)
        term = visual.embeds_ND.sum()
        for feature in visual.deepstack_ND or []:
            term = term + feature.sum()
        return term * 0.0

    def _forward_mode(self, mode, batch, layout, targets_BKD, embeds_BLD, pos_3BL, visual, video_mask_BL, num_steps,
                      *, detach_inputs: bool = False, latents_only: bool = False, teacher_noise: float = 0.0,
                      slot_inputs_BKD: torch.Tensor | None = None):
        """``slot_inputs_BKD`` (single mode): these states in the slots, answer CE only (no alignment)."""
        num_latents, attention_mask = layout.num_latents, batch["attention_mask"]
        P, S0 = layout.prefix_len, layout.suffix_start

        if mode == "single":
            if slot_inputs_BKD is not None:
                targets_BKD = None
                embeds_BLD = embeds_BLD.clone()
                embeds_BLD[:, layout.slots] = slot_inputs_BKD.to(embeds_BLD.dtype)
            elif targets_BKD is not None:
                # teacher_noise: the step learns to map a perturbed state back onto the clean targets it is aligned
                # to, the errors its own rollout will feed it (docs/results.md, sessions 6 and 8)
                inputs_BKD = targets_BKD
                if teacher_noise:
                    inputs_BKD = targets_BKD + teacher_noise * torch.randn_like(targets_BKD)
                embeds_BLD = embeds_BLD.clone()
                embeds_BLD[:, layout.slots] = inputs_BKD.to(embeds_BLD.dtype)
            hidden_BLD = self.decoder(embeds_BLD, pos_3BL, attention_mask, None, visual=visual,
                                      video_mask_BT=video_mask_BL)
            latents_BKD = hidden_BLD[:, P - 1 : S0 - 1] if num_latents else None
            # logits are needed only from the column before the first label onwards
            first = P - 1 if num_latents == 0 else S0
            answer_hidden_BTD = hidden_BLD[:, first:-1]
        elif mode == "rollout":
            with self.decoder_checkpointing_off(), self.decoder_kept_gathered(self.gather_latent_passes):
                return self._rollout(batch, layout, embeds_BLD, pos_3BL, visual, video_mask_BL, targets_BKD,
                                     num_steps, detach_inputs=detach_inputs, latents_only=latents_only)
        else:
            raise ValueError(f"unknown forward mode {mode!r}")
        return self._loss(batch, answer_hidden_BTD, first, latents_BKD, targets_BKD)

    def _rollout(self, batch, layout, embeds_BLD, pos_3BL, visual, video_mask_BL, targets_BKD,
                 num_steps: int, *, detach_inputs: bool = False, latents_only: bool = False) -> STORMSOutput:
        """Prefill, latent steps, suffix. ``num_steps`` >= K: steps past K (only when another rank rolls out further)
        run the same cached pass but are masked out of every later pass, so the result is exactly the K-step one
        while every rank's graph -- and so ZeRO-3's gather order, forward and backward -- is the same.
        ``detach_inputs``: each latent enters the next pass as a constant (no gradient through the chain).
        ``latents_only``: stop after the latent steps (no suffix pass, no loss): joint mode needs the latents only."""
        attention_mask = batch["attention_mask"]
        P, S0, K = layout.prefix_len, layout.suffix_start, layout.num_latents
        if self.latent_attention == "off":
            cache, passes = self.new_cache(), nullcontext()
        else:  # the prefill runs on the model's attention; the passes after it read the prefix K/V in place
            cache = PrefixTailCache(self.text_config.num_hidden_layers)
            passes = latent_passes(self.text_config, cache, self.latent_attention)
        hidden_BPD = self.decoder(embeds_BLD[:, :P], pos_3BL[:, :, :P], attention_mask[:, :P], cache,
                                  visual=visual, video_mask_BT=video_mask_BL[:, :P])
        latent = hidden_BPD[:, -1:]  # left padding: every row's <|latent_start|> is column P-1
        latents, mask_BS = [], attention_mask[:, :P]
        ones_B1 = attention_mask[:, :1].new_ones(attention_mask.shape[0], 1)
        with passes:
            for k in range(num_steps):
                latents.append(latent)
                col = P + min(k, K - 1)  # a masked step reuses the last real column's position
                latent = self.decoder(latent.detach() if detach_inputs else latent, pos_3BL[:, :, col : col + 1],
                                      torch.cat([mask_BS, ones_B1], dim=1), cache)
                mask_BS = torch.cat([mask_BS, ones_B1 if k < K else ones_B1 * 0], dim=1)
            if latents_only:
                return STORMSOutput(latents_BKD=torch.cat(latents[:K], dim=1))
            hidden_BSD = self.decoder(embeds_BLD[:, S0:], pos_3BL[:, :, S0:],
                                      torch.cat([mask_BS, attention_mask[:, S0:]], dim=1), cache)
        return self._loss(batch, hidden_BSD[:, :-1], S0, torch.cat(latents[:K], dim=1), targets_BKD)

    def _loss(self, batch, answer_hidden_BTD, first, latents_BKD, targets_BKD) -> STORMSOutput:
        """Answer CE on the supervised columns (hidden column ``first + t`` predicts label column ``first + t + 1``)
        plus lambda * alignment of the K latent states when targets are given."""
        labels_BT = batch["labels"][:, first + 1 :]
        ce, num_answer_tokens = self._answer_ce(answer_hidden_BTD, labels_BT)
        align = None
        loss = ce
        if targets_BKD is not None:
            align = alignment_loss(latents_BKD, targets_BKD, self.align_loss)
            loss = ce + self.align_weight * align
        return STORMSOutput(loss=loss, ce=ce.detach(), align=None if align is None else align.detach(),
                            num_answer_tokens=num_answer_tokens, latents_BKD=latents_BKD)

    @contextmanager
    def decoder_kept_gathered(self, enabled: bool) -> Iterator[None]:
        """ZeRO-3 releases (re-partitions) a parameter after every module call unless it is persistent: mark the
        decoder's partitioned parameters persistent for this scope, so the first pass gathers them and the later
        passes reuse them; the first module call after the scope releases them as usual."""
        params = [p for p in self.backbone.model.language_model.parameters() if hasattr(p, "ds_persist")]
        if not enabled or not params:
            yield
            return
        was_persistent = [p.ds_persist for p in params]
        for param in params:
            param.ds_persist = True
        try:
            yield
        finally:
            for param, persistent in zip(params, was_persistent):
                param.ds_persist = persistent

    @contextmanager
    def decoder_checkpointing_off(self) -> Iterator[None]:
        """HF layer checkpointing drops ``past_key_values``; the rollout's KV cache must survive every pass."""
        layers = [m for m in self.backbone.model.language_model.modules() if getattr(m, "gradient_checkpointing", False)]
        for layer in layers:
            layer.gradient_checkpointing = False
        try:
            yield
        finally:
            for layer in layers:
                layer.gradient_checkpointing = True

    def _answer_ce(self, hidden_BTD: torch.Tensor, labels_BT: torch.Tensor) -> tuple[torch.Tensor, int]:
        # project only the supervised columns onto the vocabulary: the LM head is the widest matmul here
        supervised_BT = labels_BT != IGNORE_INDEX
        logits_NV = self.backbone.lm_head(hidden_BTD[supervised_BT])
        ce = nn.functional.cross_entropy(logits_NV.float(), labels_BT[supervised_BT])
        return ce, int(supervised_BT.sum())

    # ---- inference ----
    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, torch.Tensor],
        *,
        num_latents: int,
        eos_token_id: int,
        max_new_tokens: int = 4,
    ) -> torch.Tensor:
        """Prefill, K latent steps, forced ``<|latent_end|>``, greedy decoding. Returns new token ids [B, T].

        ``batch`` holds the left-padded prefix only (prompt, plus ``<|latent_start|>`` when K > 0).
        Rows that finished keep emitting ``eos_token_id``.
        """
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        num_rows = input_ids.shape[0]
        visual = None
        if batch.get("pixel_values_videos") is not None:
            visual = self.encode_video(batch["pixel_values_videos"], batch["video_grid_thw"])
        pos_3BP = self.rope_positions(batch)
        embeds_BPD = self.input_embeddings(input_ids, visual)
        cache = self.new_cache()
        hidden = self.decoder(embeds_BPD, pos_3BP, attention_mask, cache, visual=visual,
                              video_mask_BT=input_ids == self.video_token_id)[:, -1:]
        num_forced = num_latents + (1 if num_latents else 0)
        pos_3BN = continuation_positions(pos_3BP, num_forced + max_new_tokens)
        ones_B1 = attention_mask.new_ones(num_rows, 1)
        for k in range(num_latents):
            attention_mask = torch.cat([attention_mask, ones_B1], dim=1)
            hidden = self.decoder(hidden, pos_3BN[:, :, k : k + 1], attention_mask, cache)
        if num_latents:
            end_B1 = torch.full((num_rows, 1), self.token_ids.end, dtype=torch.long, device=input_ids.device)
            attention_mask = torch.cat([attention_mask, ones_B1], dim=1)
            hidden = self.decoder(self.embed(end_B1), pos_3BN[:, :, num_latents : num_latents + 1], attention_mask,
                                  cache)
        generated, done_B = [], torch.zeros(num_rows, dtype=torch.bool, device=input_ids.device)
        for t in range(max_new_tokens):
            next_B = self.backbone.lm_head(hidden[:, -1]).argmax(dim=-1)
            next_B = torch.where(done_B, torch.full_like(next_B, eos_token_id), next_B)
            generated.append(next_B)
            done_B |= next_B == eos_token_id
            if bool(done_B.all()) or t == max_new_tokens - 1:
                break
            attention_mask = torch.cat([attention_mask, ones_B1], dim=1)
            col = num_forced + t
            hidden = self.decoder(self.embed(next_B[:, None]), pos_3BN[:, :, col : col + 1], attention_mask, cache)
        return torch.stack(generated, dim=1)

