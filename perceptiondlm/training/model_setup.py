"""Builds the model and processor a training stage starts from (MODEL_CONFIG / PROCESSOR_CONFIG sections).

Three starts, all strict about weights: a PerceptionDLM(-Base) checkpoint (`pretrained_path`); a region model
from a Base checkpoint (new mask-id embedding and caption-slot tokens); or, for stage 1, the separate LLaDA and
SigLIP2 checkpoints (`language_model.name_or_path`, `vision_model.name_or_path`), whose weights are really
loaded (the reference silently loaded nothing there, spec §6 pitfall 1).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerFast

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.io import read_json
from perceptiondlm.models.configuration import PerceptionDLMBaseConfig, PerceptionDLMConfig
from perceptiondlm.models.llada import LLaDAModelLM
from perceptiondlm.models.loading import check_keys, weight_files
from perceptiondlm.models.perceptiondlm import PerceptionDLM
from perceptiondlm.models.vision import build_vision_tower
from perceptiondlm.processing.processor import PerceptionDLMProcessor
from perceptiondlm.processing.tokens import (
    IMAGE_CONTEXT_TOKEN,
    IMAGE_END_TOKEN,
    IMAGE_START_TOKEN,
    caption_slot_token,
)

logger = logging.getLogger(__name__)

PARTS = ("language_model", "vision_model", "vision_abstractor", "mask_id_embedding")
CAPTION_SLOT_TOKENS = 16  # <|Mask_Cap_0..15|>, as the released processor adds them
FLAGS = ("roi_skips_first_tile", "roi_double_scaling", "mask_activity", "prefix_attends_answers")
# SigLIP checkpoint keys the vision tower does not use: the text tower, the contrastive scalars, the MAP head.
SIGLIP_UNUSED = (r"text_model\..*", r"logit_(scale|bias)", r"(vision_model\.)?head\..*")


def add_model_tokens(tokenizer: PreTrainedTokenizerFast, regions: bool) -> int:
    """Adds the image tokens (and the caption-slot markers for region models) the tokenizer lacks; returns how
    many were added. LLaDA's own tokenizer has neither; the released checkpoints' tokenizers have both."""
    wanted = [IMAGE_CONTEXT_TOKEN, IMAGE_START_TOKEN, IMAGE_END_TOKEN]
    if regions:
        wanted += [caption_slot_token(i) for i in range(CAPTION_SLOT_TOKENS)]
    missing = [t for t in wanted if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    return len(missing)


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    path = Path(directory)
    if not (path / "tokenizer.json").is_file():
        raise PerceptionDLMError(f"tokenizer.json not found in {path}; set PROCESSOR_CONFIG.processor_path.")
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def build_processor(model_config: Any, processor_config: Any) -> PerceptionDLMProcessor:
    """The processor of the stage: the checkpoint's own files when they exist, else one built from the
    tokenizer (with the image / caption-slot tokens added) and the configured tiling."""
    source = processor_config.processor_path or model_config.pretrained_path or model_config.language_model.name_or_path
    if source is None:
        raise PerceptionDLMError("Set PROCESSOR_CONFIG.processor_path (or MODEL_CONFIG.pretrained_path).")
    regions = model_config.model_type == "pdmllm"
    overrides = dict(min_sub_img=processor_config.min_sub_img, max_sub_img=processor_config.max_sub_img)
    mask_activity = processor_config.mask_activity or getattr(model_config, "mask_activity", None)
    if regions:
        overrides.update(prompt_numbers=model_config.prompt_numbers, roi_output_size=model_config.roi_output_size)
        if mask_activity:
            overrides["mask_activity"] = mask_activity
    tokenizer = load_tokenizer(source)
    add_model_tokens(tokenizer, regions)
    if (Path(source) / "processor_config.json").is_file():  # a PerceptionDLM(-Base) checkpoint's own settings
        return PerceptionDLMProcessor.from_pretrained(source, tokenizer=tokenizer, **overrides)
    return PerceptionDLMProcessor(
        tokenizer, image_size=model_config.image_size, patch_size=model_config.patch_size,
        downsample_ratio=model_config.downsample_ratio, **overrides,
    )


def _region_fields(model_config: Any) -> dict[str, Any]:
    fields = dict(prompt_numbers=model_config.prompt_numbers, roi_output_size=model_config.roi_output_size)
    fields.update({k: getattr(model_config, k) for k in FLAGS if getattr(model_config, k, None) is not None})
    return fields


def _load_siglip_tower(directory: str, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The SigLIP(2) vision tower with the weights of a SigLIP checkpoint (a full SiglipModel or a vision model)."""
    path = Path(directory)
    config = read_json(path / "config.json", "SigLIP config")
    tower = build_vision_tower(config, attn_implementation)
    state = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as handle:
            names = handle.keys()
            for key in names:
                if not any(re.fullmatch(p, key) for p in SIGLIP_UNUSED):
                    state[key if key.startswith("vision_model.") else f"vision_model.{key}"] = handle.get_tensor(key)
    check_keys(set(tower.state_dict()), set(state), path)
    tower.load_state_dict(state, strict=True)
    return tower


def _from_parts(model_config: Any, processor: PerceptionDLMProcessor, dtype: torch.dtype) -> PerceptionDLM:
    """Stage 1: LLaDA + SigLIP2 checkpoints, a freshly initialised projector (and mask-id embedding)."""
    lm_path, vit_path = model_config.language_model.name_or_path, model_config.vision_model.name_or_path
    if not lm_path or not vit_path:
        raise PerceptionDLMError(
            "Without MODEL_CONFIG.pretrained_path, set language_model.name_or_path (a LLaDA checkpoint) and "
            "vision_model.name_or_path (a SigLIP2 checkpoint)."
        )
    language_model = LLaDAModelLM.from_pretrained(lm_path, dtype=torch.float32)
    vision_model = _load_siglip_tower(vit_path)
    cls = PerceptionDLMConfig if model_config.model_type == "pdmllm" else PerceptionDLMBaseConfig
    fields = _region_fields(model_config) if model_config.model_type == "pdmllm" else {}
    config = cls(
        language_model_config=language_model.config.to_dict(),
        vision_model_config=read_json(Path(vit_path) / "config.json", "SigLIP config"),
        vision_abstractor_config={"projection_type": model_config.vision_abstractor.projection_type or "mlp2x_gelu"},
        image_token_id=processor.special_tokens.image_context, image_size=model_config.image_size,
        patch_size=model_config.patch_size, downsample_ratio=model_config.downsample_ratio,
        vision_select_layer=model_config.vision_select_layer, **fields,
    )
    with torch.device("meta"):
        model = PerceptionDLM(config, special_tokens=processor.special_tokens)
    model.language_model, model.vision_model = language_model, vision_model
    for name in ("vision_abstractor", "mask_id_embedding"):
        if hasattr(model, name):
            module = getattr(model, name).to_empty(device="cpu")
            module.apply(model._init_weights)
    _fit_vocabulary(model, processor)
    return model.to(dtype)


def _from_base(model_config: Any, processor: PerceptionDLMProcessor, dtype: torch.dtype) -> PerceptionDLM:
    """Region stage from a Base checkpoint: same weights, plus a new mask-id embedding and slot tokens."""
    base = PerceptionDLM.from_pretrained(model_config.pretrained_path, dtype=torch.float32)
    names = {f.name for f in dataclasses.fields(PerceptionDLMConfig)}  # ClassVars such as model_type excluded
    fields = {k: v for k, v in base.config.to_dict().items() if k in names}
    fields.update(_region_fields(model_config))
    model = PerceptionDLM(PerceptionDLMConfig(**fields), special_tokens=processor.special_tokens)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not k.startswith("mask_id_embedding.") for k in missing):
        raise PerceptionDLMError(f"Base checkpoint does not fit the region model: {missing} {unexpected}")
    _fit_vocabulary(model, processor)
    return model.to(dtype)


def _fit_vocabulary(model: PerceptionDLM, processor: PerceptionDLMProcessor) -> None:
    rows = model.language_model.config.vocab_size
    if len(processor.tokenizer) > rows:
        # As the reference: grow to a multiple of 64 (spec §2.5); new rows start at the mean embedding.
        model.language_model.resize_token_embeddings(len(processor.tokenizer), pad_to_multiple_of=64)
        model.config.language_model_config = model.language_model.config.to_dict()
    model.special_tokens = processor.special_tokens
    model.config.image_token_id = processor.special_tokens.image_context
    model.check_vocabulary()


def build_model(model_config: Any, processor: PerceptionDLMProcessor) -> PerceptionDLM:
    """The stage's model, with its parts frozen as configured and optional LoRA adapters."""
    dtype = getattr(torch, model_config.dtype)
    if model_config.pretrained_path is None:
        model = _from_parts(model_config, processor, dtype)
    else:
        stored = read_json(Path(model_config.pretrained_path) / "config.json", "Model config").get("model_type")
        if model_config.model_type == "pdmllm" and stored == "dmllm":
            model = _from_base(model_config, processor, dtype)
        else:
            if stored != model_config.model_type:
                raise PerceptionDLMError(
                    f"{model_config.pretrained_path} holds a {stored!r} model, MODEL_CONFIG.model_type is "
                    f"{model_config.model_type!r}."
                )
            model = PerceptionDLM.from_pretrained(model_config.pretrained_path, dtype=dtype)
            _fit_vocabulary(model, processor)
    model.processor = processor
    freeze_parts(model, model_config)
    if model_config.lora:
        model = add_lora(model, model_config.lora)
    return model


def freeze_parts(model: PerceptionDLM, model_config: Any) -> None:
    for part in PARTS:
        module = getattr(model, part, None)
        if module is not None and getattr(model_config, part).freeze:
            module.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("trainable parameters: %s of %s", f"{trainable:,}", f"{sum(p.numel() for p in model.parameters()):,}")


def add_lora(model: PerceptionDLM, adapters: list[Any]) -> PerceptionDLM:
    """LoRA adapters through PEFT on the Linear layers whose full name matches each `target_modules` regex.
    Parameters trainable before stay trainable (freeze a part to train its adapters only)."""
    from peft import LoraConfig, inject_adapter_in_model

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for i, adapter in enumerate(adapters):
        config = LoraConfig(target_modules=adapter.target_modules, r=adapter.r, lora_alpha=adapter.alpha,
                            lora_dropout=adapter.dropout)
        inject_adapter_in_model(config, model, adapter_name=f"lora_{i}")
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable or "lora_" in name)
    return model


def merge_lora(model: PerceptionDLM) -> PerceptionDLM:
    """Folds LoRA adapters into their base weights, so the saved checkpoint has the released layout."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            module.merge()
            setattr(parent, name.rsplit(".", 1)[-1], module.get_base_layer())
    return model

