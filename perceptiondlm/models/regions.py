"""Region conditioning around the LM (spec §3.4, §3.6): RoI feature replay and the region attention layout.

Both are functions of token ids and features, vectorised over positions: RoI tokens are the copies of
`<|reserved_token_i|>` the processor put in the prompt, caption slots start at `<|Mask_Cap_i|>`.
"""

from __future__ import annotations

import math

import torch

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.models.roi_align import roi_align


def merge_tiles(features: torch.Tensor, grid: tuple[int, int], skip_first_tile: bool) -> torch.Tensor:
    """The image's crops as one feature map: (T, n, D) tile tokens -> (D, rows*h, cols*w), h = w = sqrt(n).

    `skip_first_tile` reproduces the reference (spec §3.4): it takes tiles[1:] as if the thumbnail came
    first, although it is last, so crop 0 is unused and the thumbnail sits in the bottom-right cell.
    """
    cols, rows = grid
    tiles, tokens, dim = features.shape
    side = math.isqrt(tokens)
    if tiles > 1:
        start = 1 if skip_first_tile else 0
        features = features[start : start + cols * rows]
    if features.shape[0] != cols * rows:
        raise PerceptionDLMError(f"{tiles} tiles do not fill a {cols}x{rows} grid (plus a thumbnail).")
    cells = features.reshape(rows, cols, side, side, dim)  # (rows, cols, h, w, D), tokens row-major per tile
    return cells.permute(4, 0, 2, 1, 3).reshape(dim, rows * side, cols * side)  # (D, rows*h, cols*w)


def roi_tokens(
    feature_map: torch.Tensor, boxes: torch.Tensor, output_size: int, spatial_scale: float
) -> torch.Tensor:
    """RoI-aligned tokens of each region: map (D, H, W), boxes (R, 4) normalised xyxy -> (R, size^2, D).

    Boxes are mapped to feature units (x * W, y * H) and pooled with torchvision's semantics (aligned,
    sampling ratio 2), in fp32 as the reference, then cast back.
    """
    dim, height, width = feature_map.shape
    scale = boxes.new_tensor([width, height, width, height], dtype=torch.float32)
    rois = torch.cat([boxes.new_zeros(len(boxes), 1, dtype=torch.float32), boxes.float() * scale], dim=1)
    pooled = roi_align(feature_map[None].float(), rois, output_size, spatial_scale, sampling_ratio=2, aligned=True)
    return pooled.flatten(2).transpose(1, 2).to(feature_map.dtype)  # (R, size^2, D), row-major bins


def region_token_index(input_ids: torch.Tensor, reserved_ids: torch.Tensor) -> torch.Tensor:
    """For every position, the region whose RoI token sits there, else -1: (B, L) long."""
    hit = input_ids[..., None] == reserved_ids  # (B, L, R)
    return torch.where(hit.any(-1), hit.float().argmax(-1), -1)


def caption_slot_index(input_ids: torch.Tensor, slot_ids: torch.Tensor) -> torch.Tensor:
    """For every position, the caption slot (block) it belongs to, else -1: (B, L) long.

    Block i runs from `<|Mask_Cap_i|>` up to the next slot marker, the last one to the end of the sequence.
    """
    hit = input_ids[..., None] == slot_ids  # (B, L, S)
    is_marker = hit.any(-1)
    marker_slot = torch.where(is_marker, hit.float().argmax(-1), -1)  # (B, L)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_marker = torch.where(is_marker, positions, -1).cummax(dim=-1).values  # (B, L)
    return torch.where(last_marker >= 0, marker_slot.gather(1, last_marker.clamp(min=0)), -1)


def region_attention_mask(
    input_ids: torch.Tensor,
    reserved_ids: torch.Tensor,
    slot_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    prefix_attends_answers: bool = True,
) -> torch.Tensor:
    """The region attention layout (spec §3.6) as a boolean (B, 1, L, L) mask, True = may attend.

    A query in caption slot i sees: the shared prefix (everything before the first RoI token: system, user
    header, image), the question span (from the end of the last RoI span to the first slot marker), region
    i's own RoI tokens and its own slot. It does not see other regions' RoI tokens, the separators between
    RoI spans, or other slots. Queries outside the slots see every position, or, with
    `prefix_attends_answers=False`, every position outside the slots. Padding keys are never seen.
    """
    batch, length = input_ids.shape
    region = region_token_index(input_ids, reserved_ids)  # (B, L)
    slot = caption_slot_index(input_ids, slot_ids)  # (B, L)
    positions = torch.arange(length, device=input_ids.device).expand(batch, length)
    is_roi, in_slot = region >= 0, slot >= 0
    first_slot = torch.where(in_slot, positions, length).amin(-1, keepdim=True)  # (B, 1)
    first_roi = torch.where(is_roi, positions, length).amin(-1, keepdim=True)
    after_roi = torch.where(is_roi, positions + 1, 0).amax(-1, keepdim=True)
    shared = (positions < torch.minimum(first_roi, first_slot)) | ((positions >= after_roi) & ~in_slot)  # (B, L)

    q_slot, k_slot = slot[:, :, None], slot[:, None, :]  # (B, L, 1), (B, 1, L)
    slot_view = shared[:, None, :] | (region[:, None, :] == q_slot) | (k_slot == q_slot)  # (B, L, L)
    prompt_view = torch.ones_like(slot_view) if prefix_attends_answers else (k_slot < 0).expand_as(slot_view)
    allowed = torch.where(q_slot >= 0, slot_view, prompt_view)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    return allowed[:, None]  # (B, 1, L, L)
