"""Shared test fixtures: paths of the golden data and tiny model factories."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


def tiny_llada_config(**overrides):
    from perceptiondlm.models.configuration import LLaDAConfig

    fields = dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, rope_theta=10000.0,
    )
    fields.update(overrides)
    return LLaDAConfig(**fields)


def tiny_llada(attn_implementation: str = "sdpa", **overrides):
    """A random tiny LLaDA with weights far from zero, so that layers really mix tokens."""
    from perceptiondlm.models.llada import LLaDAModelLM

    config = tiny_llada_config(**overrides)
    config._attn_implementation = attn_implementation
    model = LLaDAModelLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.2)
    return model.eval()


def write_base_checkpoint(directory: Path) -> Path:
    """The golden region checkpoint turned into a PerceptionDLM-Base (dmllm) one: no region parts."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    checkpoint = FIXTURES / "pdmllm" / "checkpoint"
    shutil.copytree(checkpoint, directory)
    config = json.loads((checkpoint / "config.json").read_text())
    for key in ("prompt_numbers", "roi_output_size"):
        config.pop(key)
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "dmllm"}))
    weights = load_file(str(checkpoint / "model.safetensors"))
    weights.pop("mask_id_embedding.weight")
    save_file(weights, str(directory / "model.safetensors"))
    return directory
