"""PerceptionDLM: the one vision-language model class (spec §2, §3). With region parts (`prompt_numbers`)
it is the parallel region captioner; without them it is PerceptionDLM-Base.

Parts and their checkpoint keys: `language_model.*` (LLaDA), `vision_model.vision_model.*` (SigLIP vision
tower), `vision_abstractor.projection.*` (MLP projector) and `mask_id_embedding.weight` (region models).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from perceptiondlm.diffusion.noise import diffusion_loss, mask_tokens, noise_inputs, sample_noise_levels
from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.io import read_json
from perceptiondlm.models.configuration import (
    ROI_INFERENCE_SCALE,
    ROI_TRAINING_SCALE,
    LLaDAConfig,
    PerceptionDLMBaseConfig,
    PerceptionDLMConfig,
)
from perceptiondlm.models.llada import LLaDAModelLM
from perceptiondlm.models.loading import verify_checkpoint
from perceptiondlm.models.regions import merge_tiles, region_attention_mask, roi_tokens
from perceptiondlm.models.vision import Projector, build_vision_tower, encode_tiles, pixel_shuffle
from perceptiondlm.processing.tokens import SpecialTokens

CONFIG_CLASSES = {cls.model_type: cls for cls in (PerceptionDLMConfig, PerceptionDLMBaseConfig)}
# Present in the released checkpoints but never used: SigLIP's text tower, its contrastive scalars and the
# ViT's attention-pooling head (features come from an inner layer). Dropped by name when loading.
UNUSED_CHECKPOINT_KEYS = (
    r"vision_model\.text_model\..*",
    r"vision_model\.logit_(scale|bias)",
    r"vision_model\.vision_model\.head\..*",
)


class PerceptionDLM(PreTrainedModel):
    config_class = PerceptionDLMConfig
    config: PerceptionDLMConfig
    base_model_prefix = ""
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["LLaDADecoderLayer", "SiglipEncoderLayer"]
    _keys_to_ignore_on_load_unexpected = list(UNUSED_CHECKPOINT_KEYS)
    ignored_checkpoint_keys = UNUSED_CHECKPOINT_KEYS

    def __init__(self, config: PerceptionDLMConfig, special_tokens: SpecialTokens | None = None) -> None:
        super().__init__(config)
        lm_config = LLaDAConfig(**config.language_model_config)
        lm_config._attn_implementation = "sdpa"  # region layouts are 4-D masks, which flash-attn cannot take
        self.language_model = LLaDAModelLM(lm_config)
        self.vision_model = build_vision_tower(config.vision_model_config)
        vit_width = self.vision_model.config.hidden_size
        projector = (config.vision_abstractor_config or {}).get("projection_type", "mlp2x_gelu")
        shuffled_width = round(vit_width / config.downsample_ratio**2)
        self.vision_abstractor = Projector(shuffled_width, lm_config.hidden_size, projector)
        if config.has_regions:
            self.mask_id_embedding = nn.Embedding(config.prompt_numbers, vit_width)
        self.special_tokens = special_tokens
        self.processor = None  # set by from_pretrained from the checkpoint's processor files
        self.post_init()

    # -- loading ------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, *args, **kwargs) -> PerceptionDLM:
        """Loads a local checkpoint written by the reference's or our `save_pretrained`, strictly.

        The config's `model_type` picks Base ("dmllm") or region ("pdmllm") parts; missing or unexpected
        weight keys are an error naming them (SigLIP's unused text tower and head may be absent or present).
        Special-token ids come from the tokenizer files in the same directory.
        """
        directory = Path(pretrained_model_name_or_path)
        model_type = read_json(directory / "config.json", "Model config").get("model_type")
        if model_type not in CONFIG_CLASSES:
            raise PerceptionDLMError(
                f"{directory / 'config.json'} has model_type {model_type!r}; PerceptionDLM loads "
                f"{sorted(CONFIG_CLASSES)} checkpoints (a bare LLaDA loads with LLaDAModelLM)."
            )
        config = kwargs.pop("config", None) or CONFIG_CLASSES[model_type].from_pretrained(directory)
        verify_checkpoint(directory, cls, config)
        if "torch_dtype" in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        model = super().from_pretrained(directory, *args, config=config, **kwargs)
        model.special_tokens = SpecialTokens.from_tokenizer(directory)
        model.check_vocabulary()
        if (directory / "processor_config.json").is_file():
            from perceptiondlm.processing.processor import PerceptionDLMProcessor

            model.processor = PerceptionDLMProcessor.from_pretrained(directory)
        return model

    def save_pretrained(self, *args, **kwargs) -> None:
        """Writes config.json and the weights in the released key layout. transformers would otherwise apply
        its SigLIP key conversions in reverse (under ZeRO-3 that adds a `vision_model.` level); our keys already
        are the released ones, so nothing is renamed."""
        kwargs["save_original_format"] = False
        super().save_pretrained(*args, **kwargs)

    def check_vocabulary(self) -> None:
        """The ids the model relies on must exist in the tokenizer and fit in the embedding."""
        special = self.require_special_tokens()
        rows = self.language_model.config.vocab_size
        if special.image_context != self.config.image_token_id:
            raise PerceptionDLMError(
                f"config image_token_id {self.config.image_token_id} is not the tokenizer's <IMG_CONTEXT> "
                f"id {special.image_context}."
            )
        needed = [special.mask, special.eot, special.image_context]
        if self.config.has_regions:
            if len(special.reserved) < self.config.prompt_numbers or len(special.caption_slots) < (
                self.config.prompt_numbers
            ):
                raise PerceptionDLMError(
                    f"The tokenizer lacks reserved / <|Mask_Cap_i|> tokens for {self.config.prompt_numbers} regions."
                )
            needed += [*self.reserved_ids.tolist(), *self.slot_ids.tolist()]
        if max(needed) >= rows:
            raise PerceptionDLMError(f"Token id {max(needed)} does not fit the {rows}-row embedding.")

    def require_special_tokens(self) -> SpecialTokens:
        if self.special_tokens is None:
            raise PerceptionDLMError(
                "The model has no special-token ids: load it with from_pretrained (which reads the tokenizer) "
                "or pass special_tokens=SpecialTokens.from_tokenizer(...) when building it."
            )
        return self.special_tokens

    @property
    def reserved_ids(self) -> torch.Tensor:
        return torch.tensor(self.require_special_tokens().reserved[: self.config.prompt_numbers], device=self.device)

    @property
    def slot_ids(self) -> torch.Tensor:
        ids = self.require_special_tokens().caption_slots[: self.config.prompt_numbers]
        return torch.tensor(ids, device=self.device)

    # -- inputs -------------------------------------------------------------------------------------------

    def mask_embeds(
        self, region_patches: torch.Tensor, region_prompt_ids: torch.Tensor, num_tiles: torch.Tensor
    ) -> torch.Tensor:
        """Sum of the mask-id embeddings of the regions covering each patch: (T, N, D_vit); overlaps add."""
        prompt_ids = region_prompt_ids.repeat_interleave(num_tiles, dim=0)  # (T, R), per tile
        rows = self.mask_id_embedding(prompt_ids.clamp(min=0))  # (T, R, D)
        rows = rows * (prompt_ids >= 0)[..., None]  # absent regions add nothing
        return torch.einsum("trn,trd->tnd", region_patches.to(rows.dtype), rows)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        num_tiles: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        region_patches: torch.Tensor | None = None,
        region_prompt_ids: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        training: bool = False,
    ) -> torch.Tensor:
        """LM input embeddings (B, L, D): token embeddings with the image features scattered into the
        `<IMG_CONTEXT>` positions and, for regions, the RoI tokens into the `<|reserved_token_i|>` positions."""
        embeds = self.language_model.get_input_embeddings()(input_ids)  # (B, L, D)
        if pixel_values is None:
            return embeds
        regions = region_prompt_ids is not None and self.config.has_regions
        if region_prompt_ids is not None and not self.config.has_regions:
            raise PerceptionDLMError("This is a Base model (no region parts); it cannot take region inputs.")
        vit_dtype = self.vision_model.vision_model.embeddings.patch_embedding.weight.dtype
        mask_embeds = self.mask_embeds(region_patches, region_prompt_ids, num_tiles) if regions else None
        pixels = pixel_values.to(vit_dtype)
        hidden = encode_tiles(self.vision_model, pixels, mask_embeds, self.config.vision_select_layer)  # (T, N, Dv)
        features = self.vision_abstractor(pixel_shuffle(hidden, self.config.downsample_ratio))  # (T, n, D)
        image_positions = input_ids == self.config.image_token_id  # (B, L)
        if int(image_positions.sum()) != features.shape[0] * features.shape[1]:
            raise PerceptionDLMError(
                f"The prompt has {int(image_positions.sum())} <IMG_CONTEXT> tokens but the {features.shape[0]} "
                f"tiles give {features.shape[0] * features.shape[1]} features; build inputs with the processor."
            )
        embeds = embeds.masked_scatter(image_positions[..., None], features.to(embeds.dtype))
        if regions:
            embeds = self.insert_roi_tokens(embeds, input_ids, features, num_tiles, image_grids, region_prompt_ids,
                                            region_boxes, training)
        return embeds

    def insert_roi_tokens(self, embeds, input_ids, features, num_tiles, image_grids, region_prompt_ids,
                          region_boxes, training: bool) -> torch.Tensor:
        """Replaces each region's `roi_output_size^2` RoI placeholder tokens by RoI-aligned image features."""
        size = self.config.roi_output_size
        if self.config.roi_double_scaling:
            scale = ROI_TRAINING_SCALE if training else ROI_INFERENCE_SCALE
        else:
            scale = 1.0
        present = region_prompt_ids >= 0  # (B, R)
        pooled = []
        for sample, tiles in enumerate(features.split(num_tiles.tolist())):  # a loop over images, not tokens
            grid = tuple(image_grids[sample].tolist())
            feature_map = merge_tiles(tiles, grid, self.config.roi_skips_first_tile)  # (D, H, W)
            boxes = region_boxes[sample][present[sample]]  # (K, 4)
            pooled.append(roi_tokens(feature_map, boxes, size, scale).flatten(0, 1))  # (K * size^2, D)
        pooled = torch.cat(pooled)
        positions = torch.isin(input_ids, self.reserved_ids)  # (B, L)
        if int(positions.sum()) != pooled.shape[0]:
            raise PerceptionDLMError(
                f"The prompt has {int(positions.sum())} RoI placeholder tokens but {int(present.sum())} regions "
                f"need {pooled.shape[0]} ({size}x{size} each); build inputs with the processor."
            )
        return embeds.masked_scatter(positions[..., None], pooled.to(embeds.dtype))

    def attention_layout(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """The 4-D region layout for region models, the 2-D padding mask otherwise."""
        if not self.config.has_regions:
            return attention_mask
        return region_attention_mask(
            input_ids, self.reserved_ids, self.slot_ids, attention_mask, self.config.prefix_attends_answers
        )

    # -- inference (perceptiondlm.inference) -----------------------------------------------------------------

    def caption_regions(self, image, masks, **kwargs):
        """Captions every region mask of an image in one denoising process; see `inference.caption_regions`."""
        from perceptiondlm.inference import caption_regions

        return caption_regions(self, image, masks, **kwargs)

    def chat(self, image, question: str, **kwargs):
        """Answers a question about an image with the block sampler; see `inference.chat`."""
        from perceptiondlm.inference import chat

        return chat(self, image, question, **kwargs)

    # -- forward ------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        num_tiles: torch.Tensor | None = None,
        image_grids: torch.Tensor | None = None,
        region_patches: torch.Tensor | None = None,
        region_prompt_ids: torch.Tensor | None = None,
        region_boxes: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        logits_mask: torch.Tensor | None = None,
    ) -> MaskedLMOutput:
        """Without `labels`: clean logits (B, L, V), or (N, V) where `logits_mask` is True. With `labels`
        (-100 = not trained): the LLaDA masked-diffusion loss (spec §3.7), with `lm_head` run only at the
        noised positions; `logits` is then None."""
        if self.config.has_regions and region_prompt_ids is not None and region_prompt_ids.shape[1] > (
            self.config.prompt_numbers
        ):
            raise PerceptionDLMError(
                f"{region_prompt_ids.shape[1]} regions in one sequence, but the model has "
                f"{self.config.prompt_numbers} region slots; split them into chunks (caption_regions does)."
            )
        embeds = self.embed_inputs(input_ids, pixel_values, num_tiles, image_grids, region_patches,
                                   region_prompt_ids, region_boxes, training=labels is not None)
        layout = self.attention_layout(input_ids, attention_mask)
        if labels is None:
            logits = self.language_model(inputs_embeds=embeds, attention_mask=layout, logits_mask=logits_mask).logits
            return MaskedLMOutput(logits=logits)
        eligible = labels != -100
        p = sample_noise_levels(input_ids.shape[0], device=input_ids.device)
        masked = mask_tokens(eligible, p)
        mask_row = self.language_model.get_input_embeddings().weight[self.require_special_tokens().mask]
        noised = noise_inputs(embeds, masked, mask_row)
        logits = self.language_model(inputs_embeds=noised, attention_mask=layout, logits_mask=masked).logits
        return MaskedLMOutput(loss=diffusion_loss(logits, labels[masked], masked, p, eligible))



AutoConfig.register(PerceptionDLMConfig.model_type, PerceptionDLMConfig, exist_ok=True)
AutoConfig.register(PerceptionDLMBaseConfig.model_type, PerceptionDLMBaseConfig, exist_ok=True)
# AutoModel maps one config class to one model class; Base checkpoints load with PerceptionDLM.from_pretrained.
AutoModel.register(PerceptionDLMConfig, PerceptionDLM, exist_ok=True)
