"""`torchvision.ops.roi_align` (CPU kernel semantics, forward and autograd backward) in plain PyTorch.

It exists so the package needs no torchvision, which would drag a CUDA-sized torch onto CPU machines.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from perceptiondlm.errors import PerceptionDLMError


def _as_rois(boxes: Tensor | Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Boxes as a (K, 5) tensor of [batch_index, x1, y1, x2, y2] rows, in `dtype`."""
    if isinstance(boxes, (list, tuple)):
        parts = []
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.size(1) != 4:
                shape = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise PerceptionDLMError(
                    f"roi_align: boxes[{i}] must be a (Ki, 4) tensor of [x1, y1, x2, y2] rows, got {shape}."
                )
            b = b.to(device=device, dtype=dtype)
            parts.append(torch.cat([torch.full_like(b[:, :1], float(i)), b], dim=1))  # (Ki, 5)
        boxes = torch.cat(parts) if parts else torch.zeros(0, 5, dtype=dtype, device=device)
    if not isinstance(boxes, Tensor) or boxes.dim() != 2 or boxes.size(1) != 5:
        shape = tuple(boxes.shape) if isinstance(boxes, Tensor) else type(boxes).__name__
        raise PerceptionDLMError(
            f"roi_align: boxes must be a (K, 5) tensor of [batch_index, x1, y1, x2, y2] rows or a list of "
            f"(Ki, 4) tensors, one per image; got {shape}."
        )
    return boxes.to(device=device, dtype=dtype)


def _axis_weights(start: Tensor, bin_size: Tensor, grid: Tensor, out: int, length: int) -> Tensor:
    """Per-RoI 1-D interpolation matrix (K, out, length): row p = mean of bin p's samples' bilinear taps.

    The sample axis is padded to the largest grid of any RoI; padded samples get weight 0.
    """
    k, dt, dev = start.shape[0], start.dtype, start.device
    g_max = max(int(grid.max()), 1) if k else 1
    pos = torch.arange(out, dtype=dt, device=dev).view(1, out, 1)  # (1, out, 1)
    it = torch.arange(g_max, device=dev).view(1, 1, g_max)  # (1, 1, G)
    grid_f = grid.clamp(min=1).to(dt).view(k, 1, 1)  # (K, 1, 1); grid <= 0 samples are masked below
    start, bin_size = start.view(k, 1, 1), bin_size.view(k, 1, 1)
    # Same operation order as the C++ kernel: start + p * bin + (i + 0.5) * bin / grid.
    coord = start + pos * bin_size + (it.to(dt) + 0.5) * bin_size / grid_f  # (K, out, G)
    valid = (it < grid.view(k, 1, 1)) & (coord >= -1.0) & (coord <= float(length))  # (K, out, G)
    c = torch.where(valid, coord, torch.zeros_like(coord)).clamp(min=0.0)  # y <= 0 -> 0 (NaN-safe)
    low = c.floor()  # c >= 0, so floor == the kernel's int truncation
    top = low >= length - 1  # y_low >= H-1 -> y_low = y_high = H-1, y = y_low
    low = torch.where(top, torch.full_like(low, length - 1), low)
    c = torch.where(top, low, c)
    high = torch.where(top, low, low + 1)
    frac = c - low  # ly; hy = 1 - ly
    vmask = valid.to(dt)
    taps = torch.cat([low, high], dim=2).long()  # (K, out, 2G)
    vals = torch.cat([(1.0 - frac) * vmask, frac * vmask], dim=2)  # (K, out, 2G)
    w = torch.zeros(k, out, length, dtype=dt, device=dev).scatter_add_(2, taps, vals)  # (K, out, length)
    return w / grid_f  # average over this axis' samples; the 2-D count is grid_h * grid_w


def roi_align(
    features: Tensor,
    boxes: Tensor | Sequence[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoI Align with the exact semantics of torchvision's CPU kernel.

    features: (N, C, H, W). boxes: (K, 5) rows [batch_index, x1, y1, x2, y2] in input coordinates, or a
    list of (Ki, 4) tensors, one per image. Returns (K, C, oh, ow) in the features' dtype, differentiable
    w.r.t. features.
    """
    if features.dim() != 4:
        raise PerceptionDLMError(f"roi_align: features must be (N, C, H, W), got {tuple(features.shape)}.")
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if oh <= 0 or ow <= 0:
        raise PerceptionDLMError(f"roi_align: output_size must be positive, got {output_size}.")
    n, _, h, w = features.shape
    wdt = torch.float64 if features.dtype == torch.float64 else torch.float32
    rois = _as_rois(boxes, wdt, features.device)  # (K, 5)
    k = rois.shape[0]
    batch = rois[:, 0].long()  # (K,), truncation like the kernel's int cast
    if k and (int(batch.min()) < 0 or int(batch.max()) >= n):
        raise PerceptionDLMError(
            f"roi_align: box batch indices must lie in [0, {n - 1}] for {n} feature map(s), got "
            f"[{int(batch.min())}, {int(batch.max())}]."
        )

    scale = torch.tensor(spatial_scale, dtype=wdt, device=features.device)
    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (rois[:, i] * scale - offset for i in range(1, 5))  # (K,) each
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:  # legacy mode: force malformed RoIs to be 1x1
        roi_w, roi_h = roi_w.clamp(min=1.0), roi_h.clamp(min=1.0)
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full((k,), sampling_ratio, dtype=torch.long, device=features.device)
    else:  # adaptive: ceil(roi_size / output_size) per RoI
        grid_h, grid_w = torch.ceil(roi_h / oh).long(), torch.ceil(roi_w / ow).long()

    wy = _axis_weights(y1, roi_h / oh, grid_h, oh, h).to(features.dtype)  # (K, oh, H)
    wx = _axis_weights(x1, roi_w / ow, grid_w, ow, w).to(features.dtype)  # (K, ow, W)
    # Route each RoI to its image with a one-hot over the batch: one GEMM over (N*H), no (K, C, H, W) gather.
    onehot = torch.nn.functional.one_hot(batch, n).to(features.dtype)  # (K, N)
    wyb = wy.unsqueeze(2) * onehot.view(k, 1, n, 1)  # (K, oh, N, H)
    rows = torch.einsum("kinh,nchw->kciw", wyb, features)  # (K, C, oh, W)
    return torch.einsum("kciw,kjw->kcij", rows, wx)  # (K, C, oh, ow)
