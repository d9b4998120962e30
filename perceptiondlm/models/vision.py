"""Vision stack shared by the Base and region models (spec §2, §3.3): the SigLIP vision tower, the
mask-conditioned tile encoder, InternVL pixel shuffle and the MLP projector ("vision abstractor").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from perceptiondlm.errors import PerceptionDLMError

__all__ = ["SiglipVisionTower", "build_vision_tower", "encode_tiles", "pixel_shuffle", "Projector",
           "encode_images"]

#: Config keys that describe the saved object rather than the vision transformer; never forwarded.
_DROPPED_CONFIG_KEYS = ("model_type", "architectures", "_attn_implementation_autoset", "_name_or_path",
                        "transformers_version", "auto_map")


class SiglipVisionTower(nn.Module):
    """Holds a transformers `SiglipVisionModel` as `vision_model`: its state-dict keys are `vision_model.*`.

    transformers ≥ 5 flattened `SiglipVisionModel` (its keys are `embeddings.*`, `encoder.*`,
    `post_layernorm.*`), while the released checkpoints use the 4.x layout in which a `SiglipModel` held the
    vision transformer as `vision_model`. A model that stores this tower as `vision_model` therefore gets the
    released keys `vision_model.vision_model.*` unchanged.
    """

    def __init__(self, config: SiglipVisionConfig) -> None:
        super().__init__()
        self.vision_model = SiglipVisionModel(config)

    @property
    def config(self) -> SiglipVisionConfig:
        return self.vision_model.config


def build_vision_tower(vision_model_config: Mapping[str, Any] | Any,
                       attn_implementation: str = "sdpa") -> SiglipVisionTower:
    """SigLIP vision tower (no MAP head) from a full `SiglipModel` config (model_type "siglip", with a
    `vision_config`) or from a vision config alone (model_type "siglip_vision_model")."""
    raw = vision_model_config
    cfg = raw.to_dict() if hasattr(raw, "to_dict") else dict(raw)
    model_type = cfg.get("model_type", "siglip_vision_model")
    if model_type == "siglip":
        if not isinstance(cfg.get("vision_config"), Mapping):
            raise PerceptionDLMError("vision_model_config has model_type 'siglip' but no 'vision_config' "
                                     "dict; use the SigLIP checkpoint's config.json unchanged")
        cfg = dict(cfg["vision_config"])
    elif model_type != "siglip_vision_model":
        raise PerceptionDLMError(f"unsupported vision model_type {model_type!r}: expected 'siglip' (a full "
                                 "SiglipModel config) or 'siglip_vision_model'")
    fields = {k: v for k, v in cfg.items() if k not in _DROPPED_CONFIG_KEYS}
    fields["vision_use_head"] = False  # features come from an inner layer; the MAP head is never used
    try:
        config = SiglipVisionConfig(**fields, attn_implementation=attn_implementation)
        return SiglipVisionTower(config)
    except (TypeError, ValueError) as err:
        message = f"cannot build the SigLIP vision tower from vision_model_config ({err})"
        raise PerceptionDLMError(message) from err


def _vit(tower: SiglipVisionTower | SiglipVisionModel) -> SiglipVisionModel:
    return tower.vision_model if isinstance(tower, SiglipVisionTower) else tower


def encode_tiles(
    tower: SiglipVisionTower | SiglipVisionModel,
    pixel_values: torch.Tensor,
    mask_embeds: torch.Tensor | None = None,
    select_layer: int = -2,
    return_all: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
    """SigLIP ViT forward with the region-mask term: (T, 3, S, S) → (T, N, D), N = (S / patch)².

    `mask_embeds` (T, N, D) is added to the conv patch embeddings before the learned position embedding.
    `select_layer` indexes the hidden-states list [embeddings, layer 1 output, ..., layer L output] (−2 = the
    output of layer L−1); only the layers up to it run, and the post-layernorm / head never do. With
    `return_all`, also return that list up to the selected entry.
    """
    vit = _vit(tower)
    layers = vit.encoder.layers
    num_states = len(layers) + 1  # embeddings + one entry per layer
    if not -num_states <= select_layer < num_states:
        raise PerceptionDLMError(f"select_layer {select_layer} is out of range for a ViT with {len(layers)} "
                                 f"layers (valid: {-num_states}..{num_states - 1})")
    stop = select_layer % num_states  # index into the hidden-states list = number of layers to run
    if pixel_values.ndim != 4:
        raise PerceptionDLMError(f"pixel_values must be (tiles, 3, S, S), got {tuple(pixel_values.shape)}")
    conv = vit.embeddings.patch_embedding
    pos_weight = vit.embeddings.position_embedding.weight  # (N, D)
    patches = conv(pixel_values.to(dtype=conv.weight.dtype))  # (T, D, S/p, S/p)
    hidden = patches.flatten(2).transpose(1, 2)  # (T, N, D), patches row-major
    if hidden.shape[1] != pos_weight.shape[0]:
        raise PerceptionDLMError(f"tiles of {pixel_values.shape[-2]}x{pixel_values.shape[-1]} px give "
                                 f"{hidden.shape[1]} patches, but the ViT has {pos_weight.shape[0]} position "
                                 f"embeddings (tile size {vit.config.image_size}); resize the tiles")
    if mask_embeds is not None:
        if mask_embeds.shape != hidden.shape:
            raise PerceptionDLMError(f"mask_embeds has shape {tuple(mask_embeds.shape)}, expected "
                                     f"{tuple(hidden.shape)} (tiles, patches, ViT hidden size)")
        hidden = hidden + mask_embeds.to(hidden.dtype)  # (T, N, D)
    hidden = hidden + pos_weight.unsqueeze(0)  # (T, N, D), no interpolation
    states = [hidden]
    for layer in layers[:stop]:
        hidden = layer(hidden, None)  # (T, N, D); no attention mask
        if return_all:
            states.append(hidden)
    return (hidden, states) if return_all else hidden


def pixel_shuffle(x: torch.Tensor, ratio: float = 0.5) -> torch.Tensor:
    """InternVL pixel shuffle: (T, N, C) → (T, N·ratio², C/ratio²).

    With k = 1/ratio and the n×n patch grid (n = √N), out[a, b, i·k·C + j·C + c] = in[k·a + i, k·b + j, c]
    (i = row offset, j = column offset); output tokens are row-major over the (n/k)×(n/k) grid.
    """
    t, num, c = x.shape
    n = math.isqrt(num)
    k = round(1 / ratio)
    if n * n != num or not math.isclose(k * ratio, 1.0) or n % k:
        raise PerceptionDLMError(f"pixel_shuffle needs a square patch grid divisible by 1/ratio; got {num} "
                                 f"tokens and ratio {ratio}")
    m = n // k
    x = x.reshape(t, m, k, m, k, c)  # (T, a, i, b, j, C): row = k·a + i, col = k·b + j
    x = x.permute(0, 1, 3, 2, 4, 5)  # (T, a, b, i, j, C)
    return x.reshape(t, m * m, k * k * c)  # (T, m², k²·C), channel = i·k·C + j·C + c


class Projector(nn.Module):
    """The "vision abstractor": `mlp{N}x_gelu` = Linear(in, out), then (GELU, Linear(out, out)) × (N−1).

    Held as `projection`, so the keys are `projection.0.*`, `projection.2.*`, ... No pre-LayerNorm.
    """

    def __init__(self, in_features: int, out_features: int, projection_type: str = "mlp2x_gelu") -> None:
        super().__init__()
        match = re.fullmatch(r"mlp(\d+)x_gelu", projection_type)
        if match is None or int(match.group(1)) < 1:
            raise PerceptionDLMError(f"unknown projection_type {projection_type!r}; supported: "
                                     "'mlp{N}x_gelu' with N >= 1 (the released models use 'mlp2x_gelu')")
        modules: list[nn.Module] = [nn.Linear(in_features, out_features)]
        for _ in range(int(match.group(1)) - 1):
            modules += [nn.GELU(), nn.Linear(out_features, out_features)]  # exact (erf) GELU
        self.projection_type = projection_type
        self.projection = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(x)  # (..., in) → (..., out)


def encode_images(
    tower: SiglipVisionTower | SiglipVisionModel,
    projector: Projector,
    pixel_values: torch.Tensor,
    mask_embeds: torch.Tensor | None = None,
    select_layer: int = -2,
    downsample_ratio: float = 0.5,
) -> torch.Tensor:
    """Tiles (T, 3, S, S) → LM-space features (T, N·ratio², out): encode, pixel-shuffle, project."""
    features = encode_tiles(tower, pixel_values, mask_embeds, select_layer)  # (T, N, D)
    shuffled = pixel_shuffle(features, downsample_ratio)  # (T, N·r², D/r²)
    first = projector.projection[0]
    return projector(shuffled.to(first.weight.dtype))  # (T, N·r², out)
