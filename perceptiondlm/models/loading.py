"""Checkpoint files: strict key checks before loading, and the GSAI-ML -> HF key table for LLaDA (spec §1.3, §7).

The key table lives here once; `scripts/convert.py` is a thin wrapper around `convert_gsai_checkpoint`.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.io import read_json

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_LISTED_KEYS = 12


# --- reading a checkpoint directory --------------------------------------------------------------------


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: one `model.safetensors`, or every shard its index names."""
    directory = Path(directory)
    if not directory.is_dir():
        raise PerceptionDLMError(
            f"Checkpoint directory not found: {directory}. Models load from local directories only "
            "(download the checkpoint first)."
        )
    if (directory / INDEX_FILE).is_file():
        index = read_json(directory / INDEX_FILE, "Shard index")
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise PerceptionDLMError(f"Shard index {directory / INDEX_FILE} has an empty weight_map.")
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise PerceptionDLMError(f"Shard(s) named by {directory / INDEX_FILE} are missing: {missing}")
        return [directory / name for name in names]
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    others = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
    hint = f" (found {others}: convert them to safetensors first)" if others else ""
    raise PerceptionDLMError(
        f"No weights in {directory}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards{hint}."
    )


def checkpoint_keys(directory: Path) -> set[str]:
    """Tensor names in a checkpoint, read from the safetensors headers only (no tensor data is loaded)."""
    keys: set[str] = set()
    for path in weight_files(directory):
        with safe_open(str(path), framework="pt") as handle:
            keys.update(handle.keys())
    return keys


def _listed(keys: set[str]) -> str:
    shown = sorted(keys)[:MAX_LISTED_KEYS]
    more = len(keys) - len(shown)
    return ", ".join(shown) + (f" and {more} more" if more else "")


def check_keys(expected: set[str], found: set[str], where: Path, ignored: tuple[str, ...] = ()) -> None:
    """Raise naming every missing and unexpected key; keys matching an `ignored` regex may be extra."""
    unexpected = {k for k in found - expected if not any(re.fullmatch(p, k) for p in ignored)}
    missing = expected - found
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listed(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listed(unexpected)}")
        raise PerceptionDLMError(f"Checkpoint {where} does not match the model: " + "; ".join(parts) + ".")


def verify_checkpoint(directory: Path, model_class: Any, config: Any = None) -> Any:
    """Checks a checkpoint directory for `model_class` before loading; returns its config.

    Checks, in order: the directory exists; `config.json` names the model type `model_class` expects;
    the weight files exist; the checkpoint holds exactly the model's keys (minus the class's
    `ignored_checkpoint_keys` regexes).
    """
    directory = Path(directory)
    weight_files(directory)
    config_class = model_class.config_class
    if config is None:
        raw = read_json(directory / "config.json", "Model config")
        if raw.get("model_type") != config_class.model_type:
            raise PerceptionDLMError(
                f"{directory / 'config.json'} is a {raw.get('model_type')!r} config, but "
                f"{model_class.__name__} loads {config_class.model_type!r} checkpoints."
            )
        config = config_class.from_pretrained(directory)
    with torch.device("meta"):
        expected = set(model_class(config).state_dict())
    ignored = tuple(getattr(model_class, "ignored_checkpoint_keys", ()))
    check_keys(expected, checkpoint_keys(directory), directory, ignored)
    return config


# --- GSAI-ML (OLMo-style) LLaDA -> HF layout -----------------------------------------------------------

GSAI_TO_HF_KEYS: list[tuple[str, str]] = [
    (r"model\.transformer\.wte\.weight", "model.embed_tokens.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.q_proj\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.k_proj\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.v_proj\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.attn_out\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_proj\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.up_proj\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_out\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.ff_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"model\.transformer\.ln_f\.weight", "model.norm.weight"),
    (r"model\.transformer\.ff_out\.weight", "lm_head.weight"),
]

# Original config field -> HF (Llama-named) field; values are copied unchanged.
GSAI_TO_HF_CONFIG: dict[str, str] = {
    "d_model": "hidden_size",
    "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads",
    "n_kv_heads": "num_key_value_heads",
    "mlp_hidden_size": "intermediate_size",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "max_sequence_length": "max_position_embeddings",
    "activation_type": "hidden_act",
    "include_qkv_bias": "attention_bias",
    "weight_tying": "tie_word_embeddings",
    "init_std": "initializer_range",
    "attention_dropout": "attention_dropout",
    "eos_token_id": "eos_token_id",
}
# Not mapped on purpose: `pad_token_id` (GSAI sets it to EOS; as an embedding padding_idx it would freeze
# that row in training) and `mask_token_id` (read from the tokenizer, like every special id).

# Files of the source directory that must not be copied: they are rewritten, or they are remote code
# written for the old key names.
NOT_COPIED = re.compile(r".*\.safetensors|model\.safetensors\.index\.json|config\.json|.*\.py")


def rename_gsai_key(key: str) -> str:
    for pattern, replacement in GSAI_TO_HF_KEYS:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, replacement, key)
    raise PerceptionDLMError(
        f"Unknown key {key!r} in the GSAI-ML LLaDA checkpoint; the converter knows the keys of spec §1.3 "
        "only and refuses to guess."
    )


def _source_shards(src: Path) -> list[str]:
    if (src / INDEX_FILE).is_file() or (src / SINGLE_FILE).is_file():
        return [path.name for path in weight_files(src)]
    raise PerceptionDLMError(f"No weights in {src}: expected {INDEX_FILE} with its shards, or {SINGLE_FILE}.")


def convert_config(original: dict[str, Any], tensors_dtype: torch.dtype, bos_token_id: int | None) -> dict:
    """Maps an original LLaDA config to the HF layout; `torch_dtype` describes the tensors written."""
    from perceptiondlm.models.configuration import LLaDAConfig

    fields = {hf: original[gsai] for gsai, hf in GSAI_TO_HF_CONFIG.items() if gsai in original}
    if fields.get("tie_word_embeddings"):
        raise PerceptionDLMError("Tied input/output embeddings are not a LLaDA layout this converter knows.")
    fields["vocab_size"] = original.get("embedding_size") or original["vocab_size"]
    config = LLaDAConfig(
        **fields, bos_token_id=bos_token_id, architectures=["LLaDAModelLM"], dtype=tensors_dtype
    )
    converted = config.to_diff_dict()
    converted["torch_dtype"] = str(tensors_dtype).removeprefix("torch.")  # for readers older than v5
    return converted


def convert_gsai_checkpoint(src: Path, dst: Path) -> Path:
    """Converts an original GSAI-ML LLaDA checkpoint into the HF layout `LLaDAModelLM` loads.

    Tensors are copied bit for bit under new names, shard by shard (peak memory: one shard); the index
    is rewritten with `total_size` = tensor bytes; tokenizer files are copied; the config is mapped, with
    `bos_token_id` read from the tokenizer. Nothing partial is left behind: the output is assembled in a
    temporary directory next to `dst` and renamed into place at the end.
    """
    from perceptiondlm.processing.tokens import bos_token_id_of

    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise PerceptionDLMError(f"Output path {dst} already exists; choose a new --output-path.")
    original = read_json(src / "config.json", "Original LLaDA config")
    shards = _source_shards(src)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        weight_map: dict[str, str] = {}
        total_bytes, dtypes = 0, set()
        for name in shards:
            tensors = {rename_gsai_key(k): v for k, v in load_file(str(src / name)).items()}
            logger.info("converting %s (%d tensors)", name, len(tensors))
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
            dtypes.update(t.dtype for t in tensors.values())
        if len(dtypes) != 1:
            raise PerceptionDLMError(f"The checkpoint mixes tensor dtypes {sorted(map(str, dtypes))}.")
        if len(shards) > 1 or (src / INDEX_FILE).is_file():
            index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for path in sorted(src.iterdir()):
            if path.is_file() and not NOT_COPIED.fullmatch(path.name):
                shutil.copy2(path, tmp / path.name)
        config = convert_config(original, dtypes.pop(), bos_token_id_of(src))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tmp.rename(dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
