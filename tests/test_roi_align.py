"""`perceptiondlm.models.roi_align` against torchvision's CPU roi_align kernel and the golden fixture."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.models.roi_align import roi_align

GOLDEN = Path(__file__).parent / "fixtures" / "pdmllm" / "golden.safetensors"


# ---- slow reference: a literal transcription of torchvision/csrc/ops/cpu/roi_align_kernel.cpp ------------


def _bilinear_taps(height: int, width: int, y: float, x: float) -> list[tuple[int, int, float]]:
    """The kernel's bilinear_interpolate / pre_calc: [(y, x, weight)] for the 4 taps, [] if out of range."""
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return []
    if y <= 0:
        y = 0.0
    if x <= 0:
        x = 0.0
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return [
        (y_low, x_low, hy * hx),
        (y_low, x_high, hy * lx),
        (y_high, x_low, ly * hx),
        (y_high, x_high, ly * lx),
    ]


def _bins(rois, height, width, oh, ow, spatial_scale, sampling_ratio, aligned):
    """Yield (roi, batch, ph, pw, taps, count) for every output bin, exactly as the kernel's loops do."""
    for k, roi in enumerate(rois.tolist()):
        b = int(roi[0])
        offset = 0.5 if aligned else 0.0
        x1, y1 = roi[1] * spatial_scale - offset, roi[2] * spatial_scale - offset
        x2, y2 = roi[3] * spatial_scale - offset, roi[4] * spatial_scale - offset
        rw, rh = x2 - x1, y2 - y1
        if not aligned:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / oh, rw / ow
        gh = sampling_ratio if sampling_ratio > 0 else math.ceil(rh / oh)
        gw = sampling_ratio if sampling_ratio > 0 else math.ceil(rw / ow)
        count = max(gh * gw, 1)
        for ph in range(oh):
            for pw in range(ow):
                taps = []
                for iy in range(gh):
                    y = y1 + ph * bh + (iy + 0.5) * bh / gh
                    for ix in range(gw):
                        x = x1 + pw * bw + (ix + 0.5) * bw / gw
                        taps.extend(_bilinear_taps(height, width, y, x))
                yield k, b, ph, pw, taps, count


def _ref_forward(feats: np.ndarray, bins, k: int, oh: int, ow: int) -> np.ndarray:
    out = np.zeros((k, feats.shape[1], oh, ow))
    for r, b, ph, pw, taps, count in bins:
        val = np.zeros(feats.shape[1])
        for yy, xx, wt in taps:
            val += wt * feats[b, :, yy, xx]
        out[r, :, ph, pw] = val / count
    return out


def _ref_backward(grad_out: np.ndarray, bins, feat_shape) -> np.ndarray:
    grad = np.zeros(feat_shape)
    for r, b, ph, pw, taps, count in bins:
        g = grad_out[r, :, ph, pw]
        for yy, xx, wt in taps:
            grad[b, :, yy, xx] += g * wt / count
    return grad


# ---- random cases ------------------------------------------------------------------------------------------


def _random_boxes(gen: torch.Generator, n: int, h: int, w: int, scale: float) -> torch.Tensor:
    """Boxes in input coordinates: inside, partly and fully off the map, tiny, degenerate and inverted."""
    hs, ws = h / scale, w / scale
    rows = []
    for i in range(36):
        u = torch.rand(6, generator=gen, dtype=torch.float64).tolist()
        b = float(i % n)
        kind = i % 6
        if kind == 0:  # inside
            x1, y1 = u[0] * ws * 0.7, u[1] * hs * 0.7
            x2, y2 = x1 + u[2] * (ws - x1), y1 + u[3] * (hs - y1)
        elif kind == 1:  # partly off the map
            x1, y1 = -0.4 * ws + u[0] * ws, -0.4 * hs + u[1] * hs
            x2, y2 = x1 + (0.3 + u[2]) * ws * 0.8, y1 + (0.3 + u[3]) * hs * 0.8
        elif kind == 2:  # completely off the map (either side)
            x1 = (-1.6 if u[4] < 0.5 else 1.2) * ws + u[0] * ws * 0.2
            y1 = u[1] * hs
            x2, y2 = x1 + u[2] * ws * 0.3, y1 + u[3] * hs * 0.3
        elif kind == 3:  # tiny
            x1, y1 = u[0] * ws, u[1] * hs
            x2, y2 = x1 + 0.05 * u[2], y1 + 0.05 * u[3]
        elif kind == 4:  # degenerate / inverted
            x1, y1 = u[0] * ws, u[1] * hs
            x2, y2 = x1 - u[2] * 3.0, y1 + (0.0 if u[4] < 0.5 else -u[3])
        else:  # straddling the bottom-right edge, hits the y_low >= H-1 clamp
            x1, y1 = ws - 2.0 / scale * u[0], hs - 2.0 / scale * u[1]
            x2, y2 = x1 + u[2] * 4.0 / scale, y1 + u[3] * 4.0 / scale
        rows.append([b, x1, y1, x2, y2])
    return torch.tensor(rows, dtype=torch.float64)


CASES = [
    # (output_size, spatial_scale, sampling_ratio, aligned)
    (3, 0.5, 2, False),
    (3, 0.5, -1, True),
    (2, 1.0, -1, False),
    ((2, 4), 0.5, 2, True),
    ((3, 2), 0.25, 0, False),
    (1, 0.5, -1, True),
    (4, 1.0, 1, True),
]


@pytest.mark.parametrize(
    ("seed", "output_size", "spatial_scale", "sampling_ratio", "aligned"),
    [(i, *case) for i, case in enumerate(CASES)],
)
def test_matches_kernel_forward_and_backward(seed, output_size, spatial_scale, sampling_ratio, aligned):
    gen = torch.Generator().manual_seed(seed)
    n, c, h, w = 3, 4, 6, 7
    feats = torch.randn(n, c, h, w, generator=gen, dtype=torch.float64, requires_grad=True)
    boxes = _random_boxes(gen, n, h, w, spatial_scale)
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    kw = dict(spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned)

    out = roi_align(feats, boxes, output_size, **kw)
    assert out.shape == (len(boxes), c, oh, ow) and out.dtype == torch.float64
    bins = list(_bins(boxes, h, w, oh, ow, spatial_scale, sampling_ratio, aligned))
    ref = _ref_forward(feats.detach().numpy(), bins, len(boxes), oh, ow)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=0, atol=1e-12)
    assert np.abs(ref).sum() > 0  # the cases are not trivially all-zero

    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * grad_out).sum(), feats)
    ref_grad = _ref_backward(grad_out.numpy(), bins, feats.shape)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=0, atol=1e-12)


def test_exact_boundary_samples():
    """Samples exactly at -1, 0, H-1 and H (and just beyond): the kernel's inclusive range and clamp rules."""
    h, w = 4, 5
    feats = torch.randn(1, 2, h, w, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    # sampling_ratio=1, output 1, not aligned, scale 1: the single sample sits at the box centre.
    centres = [(-1.0, 1.5), (1.5, -1.0), (float(w), 1.5), (1.5, float(h)), (-1.0, float(h)), (0.0, 0.0),
               (w - 1.0, h - 1.0), (-1.0 - 1e-9, 1.5), (1.5, h + 1e-9), (w - 1.5, h - 0.5)]  # fmt: skip
    boxes = torch.tensor([[0.0, x - 1.0, y - 1.0, x + 1.0, y + 1.0] for x, y in centres], dtype=torch.float64)
    out = roi_align(feats, boxes, 1, sampling_ratio=1)
    bins = list(_bins(boxes, h, w, 1, 1, 1.0, 1, False))
    ref = _ref_forward(feats.numpy(), bins, len(boxes), 1, 1)
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)
    assert (ref[:7] != 0).all() and (ref[7:9] == 0).all()


def test_float32_and_list_boxes():
    gen = torch.Generator().manual_seed(7)
    feats = torch.randn(2, 5, 6, 7, generator=gen, dtype=torch.float64)
    boxes = _random_boxes(gen, 2, 6, 7, 0.5)
    ref = roi_align(feats, boxes, (2, 3), 0.5, -1, True)
    per_image = [boxes[boxes[:, 0] == i, 1:] for i in range(2)]
    order = torch.argsort(boxes[:, 0], stable=True)
    out_list = roi_align(feats, per_image, (2, 3), 0.5, -1, True)
    torch.testing.assert_close(out_list, ref[order], rtol=0, atol=1e-12)
    out32 = roi_align(feats.float(), boxes.float(), (2, 3), 0.5, -1, True)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=0, atol=1e-5)


def test_empty_boxes_and_errors():
    feats = torch.randn(2, 3, 4, 4)
    assert roi_align(feats, torch.zeros(0, 5), 2).shape == (0, 3, 2, 2)
    with pytest.raises(PerceptionDLMError, match=r"\(K, 5\)"):
        roi_align(feats, torch.zeros(3, 4), 2)
    with pytest.raises(PerceptionDLMError, match="batch indices"):
        roi_align(feats, torch.tensor([[2.0, 0, 0, 1, 1]]), 2)
    with pytest.raises(PerceptionDLMError, match="batch indices"):
        roi_align(feats, [torch.zeros(1, 4)] * 3, 2)
    with pytest.raises(PerceptionDLMError, match=r"boxes\[0\]"):
        roi_align(feats, [torch.zeros(1, 5)], 2)


def test_golden_reference_roi_features():
    """The reference's generate-path RoI features: tiles 1..6 merged row-major into a (1, 64, 4, 6) map."""
    g = load_file(str(GOLDEN))
    embeds = g["vision_embeds"]  # (7, 4, 64): 7 tiles x (2x2 tokens, row-major) x 64 channels
    rows, cols = 2, 3
    assert g["aspect_ratios"].flatten().tolist() in ([cols, rows], [rows, cols])
    tiles = embeds.transpose(1, 2).reshape(7, 64, 2, 2)  # (7, C, 2, 2)
    fmap = torch.zeros(1, 64, rows * 2, cols * 2)
    for r in range(rows):
        for c in range(cols):
            fmap[0, :, 2 * r : 2 * r + 2, 2 * c : 2 * c + 2] = tiles[1 + cols * r + c]
    boxes = g["roi_boxes_generate"]  # (3, 5), in feature units; the reference scales them by 1/32 again
    out = roi_align(fmap, boxes, output_size=4, spatial_scale=1 / 32, sampling_ratio=2, aligned=True)
    torch.testing.assert_close(out, g["roi_features_generate"], rtol=0, atol=1e-6)
