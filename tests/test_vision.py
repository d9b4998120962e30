"""Tests for the vision stack: golden parity of the mask-conditioned SigLIP forward, pixel shuffle and the
projector against the reference (fixtures/pdmllm), plus layer selection, layout and error cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.models.vision import (
    Projector,
    SiglipVisionTower,
    build_vision_tower,
    encode_images,
    encode_tiles,
    pixel_shuffle,
)
from perceptiondlm.processing.masks import load_masks, patch_activity, region_mask_embeds, sort_by_area

GOLDEN_DIR = Path(__file__).parent / "fixtures" / "pdmllm"
CONFIG = json.loads((GOLDEN_DIR / "checkpoint" / "config.json").read_text())
UNUSED_PREFIXES = ("vision_model.head.",)


@pytest.fixture(scope="module")
def golden() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN_DIR / "golden.safetensors"))


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_file(str(GOLDEN_DIR / "checkpoint" / "model.safetensors"))


@pytest.fixture(scope="module")
def tower(weights) -> SiglipVisionTower:
    tower = build_vision_tower(CONFIG["vision_model_config"])
    prefix = "vision_model."  # checkpoint: vision_model.vision_model.* → tower: vision_model.*
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix + "vision_model.")}
    state = {k: v for k, v in state.items() if not k.startswith(UNUSED_PREFIXES)}
    tower.load_state_dict(state, strict=True)
    return tower.eval()


@pytest.fixture(scope="module")
def projector(weights) -> Projector:
    proj = Projector(128, 64, CONFIG["vision_abstractor_config"]["projection_type"])
    prefix = "vision_abstractor."
    state = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
    proj.load_state_dict(state, strict=True)
    return proj.eval()


# ---------------------------------------------------------------- tower construction
def test_tower_from_full_siglip_config_has_released_keys(tower, weights) -> None:
    assert tower.config.num_hidden_layers == 3 and tower.config.hidden_size == 32
    assert tower.config.vision_use_head is False
    assert tower.config._attn_implementation == "sdpa"
    released = {k for k in weights if k.startswith("vision_model.vision_model.") and ".head." not in k}
    assert {"vision_model." + k for k in tower.state_dict()} == released


def test_tower_from_vision_config_alone() -> None:
    vision_cfg = CONFIG["vision_model_config"]["vision_config"]
    assert vision_cfg["model_type"] == "siglip_vision_model"
    tower = build_vision_tower(vision_cfg, attn_implementation="eager")
    assert tower.config._attn_implementation == "eager"
    assert not hasattr(tower.vision_model, "head")


def test_tower_config_errors() -> None:
    with pytest.raises(PerceptionDLMError, match="model_type"):
        build_vision_tower({"model_type": "clip"})
    with pytest.raises(PerceptionDLMError, match="vision_config"):
        build_vision_tower({"model_type": "siglip"})


# ---------------------------------------------------------------- golden parity
@torch.no_grad()
def test_golden_vit_hidden_states(tower, golden) -> None:
    selected, states = encode_tiles(tower, golden["pixel_values"], golden["vision_mask_embeds"], -2,
                                    return_all=True)
    assert selected.shape == (7, 16, 32)
    assert len(states) == 3  # embeddings, layer 1, layer 2: layer 3 is not run for -2
    torch.testing.assert_close(states[1], golden["vit_hidden_states"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(states[2], golden["vit_hidden_states"][1], atol=1e-5, rtol=0)
    torch.testing.assert_close(selected, golden["vit_hidden_states"][1], atol=1e-5, rtol=0)
    last = encode_tiles(tower, golden["pixel_values"], golden["vision_mask_embeds"], -1)
    torch.testing.assert_close(last, golden["vit_hidden_states"][2], atol=1e-5, rtol=0)


@torch.no_grad()
def test_golden_vision_embeds(tower, projector, golden) -> None:
    shuffled = pixel_shuffle(golden["vit_hidden_states"][1], 0.5)
    assert shuffled.shape == (7, 4, 128)
    torch.testing.assert_close(projector(shuffled), golden["vision_embeds"], atol=1e-5, rtol=0)
    embeds = encode_images(tower, projector, golden["pixel_values"], golden["vision_mask_embeds"], -2, 0.5)
    torch.testing.assert_close(embeds, golden["vision_embeds"], atol=1e-5, rtol=0)


@torch.no_grad()
def test_golden_end_to_end_from_masks(tower, weights, golden) -> None:
    paths = [GOLDEN_DIR / p for p in json.loads((GOLDEN_DIR / "golden.json").read_text())
             ["mask_paths_in_given_order"]]
    masks, _ = sort_by_area(load_masks(paths, (96, 64)))
    activities = [patch_activity(m, i, 64, (3, 2), 16, "compat") for i, m in enumerate(masks)]
    mask_embeds = region_mask_embeds(activities, [0, 1, 2], weights["mask_id_embedding.weight"])
    torch.testing.assert_close(mask_embeds, golden["vision_mask_embeds"], atol=1e-6, rtol=0)
    out = encode_tiles(tower, golden["pixel_values"], mask_embeds)
    torch.testing.assert_close(out, golden["vit_hidden_states"][1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- encoder behaviour
@torch.no_grad()
def test_select_layer_and_full_run(tower, golden) -> None:
    pixels = golden["pixel_values"][:2]
    vit = tower.vision_model
    hidden = vit.embeddings(pixels)
    for layer in vit.encoder.layers:
        hidden = layer(hidden, None)
    last = encode_tiles(tower, pixels, None, -1)
    torch.testing.assert_close(last, hidden, atol=1e-6, rtol=0)  # -1 = all layers, no post-layernorm
    assert not torch.allclose(last, encode_tiles(tower, pixels, None, -2))
    torch.testing.assert_close(encode_tiles(tower, pixels, None, 2), encode_tiles(tower, pixels, None, -2))
    torch.testing.assert_close(encode_tiles(tower, pixels, None, 0), vit.embeddings(pixels))
    # Without masks this is transformers' own forward (hidden_states convention, before the post-layernorm).
    ref = vit(pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(encode_tiles(tower, pixels, None, -2), ref[-2], atol=1e-6, rtol=0)
    with pytest.raises(PerceptionDLMError, match="select_layer"):
        encode_tiles(tower, pixels, None, -5)


@torch.no_grad()
def test_no_masks_equals_zero_masks_and_masks_add_only_inside(tower, golden) -> None:
    pixels, mask_embeds = golden["pixel_values"], golden["vision_mask_embeds"]
    plain, plain_states = encode_tiles(tower, pixels, None, return_all=True)
    torch.testing.assert_close(encode_tiles(tower, pixels, torch.zeros_like(mask_embeds)), plain,
                               atol=0, rtol=0)
    _, masked_states = encode_tiles(tower, pixels, mask_embeds, return_all=True)
    inside = mask_embeds.abs().sum(-1) > 0  # (T, N): patches covered by some region
    assert inside.any() and (~inside).any()
    delta = masked_states[0] - plain_states[0]  # first layer's input
    torch.testing.assert_close(delta[~inside], torch.zeros_like(delta[~inside]), atol=0, rtol=0)
    torch.testing.assert_close(delta[inside], mask_embeds[inside], atol=1e-6, rtol=0)


def test_encode_tiles_shape_errors(tower) -> None:
    with pytest.raises(PerceptionDLMError, match="mask_embeds"):
        encode_tiles(tower, torch.zeros(2, 3, 64, 64), torch.zeros(2, 16, 31))
    with pytest.raises(PerceptionDLMError, match="position"):
        encode_tiles(tower, torch.zeros(1, 3, 32, 32))


# ---------------------------------------------------------------- pixel shuffle and projector
def test_pixel_shuffle_layout() -> None:
    t, n, c = 2, 4, 3
    x = torch.arange(t * n * n * c).reshape(t, n * n, c)
    out = pixel_shuffle(x, 0.5)
    assert out.shape == (t, n * n // 4, 4 * c)
    grid = x.reshape(t, n, n, c)
    for a in range(n // 2):
        for b in range(n // 2):
            for i in range(2):
                for j in range(2):
                    start = i * 2 * c + j * c
                    token = a * (n // 2) + b
                    assert torch.equal(out[:, token, start:start + c], grid[:, 2 * a + i, 2 * b + j])
    with pytest.raises(PerceptionDLMError):
        pixel_shuffle(torch.zeros(1, 12, 4))


def test_projector_shapes_keys_and_errors() -> None:
    proj = Projector(8, 5, "mlp3x_gelu")
    assert list(proj.state_dict()) == [f"projection.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")]
    assert all(isinstance(proj.projection[i], torch.nn.GELU) for i in (1, 3))
    assert proj.projection[1].approximate == "none"
    assert proj(torch.zeros(2, 3, 8)).shape == (2, 3, 5)
    assert len(Projector(8, 5, "mlp1x_gelu").projection) == 1
    for bad in ("linear", "mlp2x_relu", "mlp0x_gelu"):
        with pytest.raises(PerceptionDLMError, match="projection_type"):
            Projector(8, 5, bad)
