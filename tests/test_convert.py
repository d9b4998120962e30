"""GSAI-ML -> HF conversion of LLaDA checkpoints (`scripts/convert.py`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, tiny_llada
from safetensors.torch import load_file, save_file

from perceptiondlm import PerceptionDLMError
from perceptiondlm.models.llada import LLaDAModelLM
from perceptiondlm.models.loading import GSAI_TO_HF_KEYS, convert_gsai_checkpoint

REPO = Path(__file__).resolve().parents[1]
GSAI_DIR, HF_DIR = FIXTURES / "llada_gsai", FIXTURES / "llada_hf"


def all_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key


def test_golden_conversion_is_bit_exact(tmp_path):
    out = convert_gsai_checkpoint(GSAI_DIR, tmp_path / "hf")
    assert_bit_equal(all_tensors(out), load_file(str(HF_DIR / "model.safetensors")))
    reference = json.loads((FIXTURES / "convert_reference_output.json").read_text())
    # same shards, same keys per shard as the reference converter
    for name, keys in reference["output_keys_per_file"].items():
        assert sorted(load_file(str(out / name))) == keys
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensor_bytes = sum(t.numel() * t.element_size() for t in all_tensors(out).values())
    assert index["metadata"]["total_size"] == tensor_bytes
    assert index["weight_map"] == reference["output_index"]["weight_map"]
    config = json.loads((out / "config.json").read_text())
    expected = json.loads((HF_DIR / "config.json").read_text())
    for field in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "vocab_size", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                  "hidden_act", "attention_bias", "tie_word_embeddings", "eos_token_id", "model_type"):
        assert config[field] == expected[field], field
    # the reference's two mistakes are not repeated
    assert config["bos_token_id"] == expected["bos_token_id"] != 128000
    assert config["torch_dtype"] == "float32"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (GSAI_DIR / name).read_bytes()


def hf_to_gsai(key: str) -> str:
    """Inverse of the key table, to write a GSAI-layout checkpoint from a model of ours."""
    for pattern, replacement in GSAI_TO_HF_KEYS:
        match = re.fullmatch(re.escape(replacement).replace(re.escape("\\1"), r"(\d+)"), key)
        if match:
            return pattern.replace(r"(\d+)", "".join(match.groups())).replace("\\.", ".")
    raise AssertionError(key)


def write_gsai_checkpoint(model: LLaDAModelLM, directory: Path, shards: int = 3) -> None:
    directory.mkdir()
    state = {hf_to_gsai(k): v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    keys = sorted(state)
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(directory / name))
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    c = model.config
    original = {
        "d_model": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
        "n_kv_heads": c.num_key_value_heads, "mlp_hidden_size": c.intermediate_size,
        "vocab_size": c.vocab_size, "embedding_size": c.vocab_size, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps, "max_sequence_length": c.max_position_embeddings,
        "activation_type": "silu", "include_qkv_bias": False, "weight_tying": False, "eos_token_id": 2,
        "pad_token_id": 2, "mask_token_id": 3, "precision": "amp_bf16", "model_type": "llada",
    }
    (directory / "config.json").write_text(json.dumps(original))
    (directory / "modeling_llada.py").write_text("# remote code for the old key names\n")


def test_round_trip_through_a_written_gsai_checkpoint(tmp_path):
    model = tiny_llada()
    write_gsai_checkpoint(model, tmp_path / "gsai")
    out = convert_gsai_checkpoint(tmp_path / "gsai", tmp_path / "hf")
    assert not (out / "modeling_llada.py").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = LLaDAModelLM.from_pretrained(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert_bit_equal(dict(loaded.state_dict()), expected)


def test_refuses_unknown_keys_missing_shards_and_existing_output(tmp_path):
    src = tmp_path / "gsai"
    write_gsai_checkpoint(tiny_llada(), src)
    first = sorted(src.glob("*.safetensors"))[0]
    tensors = load_file(str(first))
    save_file({**tensors, "model.transformer.mystery.weight": torch.zeros(1)}, str(first))
    with pytest.raises(PerceptionDLMError, match="mystery"):
        convert_gsai_checkpoint(src, tmp_path / "out")
    save_file(tensors, str(first))
    sorted(src.glob("*.safetensors"))[-1].unlink()
    with pytest.raises(PerceptionDLMError, match="missing"):
        convert_gsai_checkpoint(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gsai"]  # nothing partial left behind
    (tmp_path / "taken").mkdir()
    with pytest.raises(PerceptionDLMError, match="already exists"):
        convert_gsai_checkpoint(GSAI_DIR, tmp_path / "taken")


def test_convert_script(tmp_path):
    shutil.copytree(GSAI_DIR, tmp_path / "gsai")
    command = [sys.executable, str(REPO / "scripts" / "convert.py"), "--model-path", str(tmp_path / "gsai"),
               "--output-path", str(tmp_path / "hf")]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert_bit_equal(all_tensors(tmp_path / "hf"), load_file(str(HF_DIR / "model.safetensors")))
    again = subprocess.run(command, capture_output=True, text=True, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
