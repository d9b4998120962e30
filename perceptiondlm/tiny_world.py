"""The tiny world, end to end: synthetic data, a tiny tokenizer, randomly initialised "pretrained" LLaDA and
SigLIP checkpoints in the released layouts, the five training stages of `configs/tiny/` and the evaluation on
the synthetic benchmark. `scripts/build_tiny_model.sh` runs `build`; the result is the embedded default model.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from transformers import SiglipConfig, SiglipModel

from perceptiondlm.data.synthetic import (
    ATTRIBUTES,
    VALUES,
    tiny_world_texts,
    write_benchmark_split,
    write_conversation_split,
    write_region_split,
)
from perceptiondlm.data.tiny_tokenizer import train_tiny_tokenizer
from perceptiondlm.io import write_json_atomic
from perceptiondlm.models.configuration import LLaDAConfig
from perceptiondlm.models.llada import LLaDAModelLM

logger = logging.getLogger(__name__)

# Sizes of the tiny backbones (the real ones: LLaDA-8B, SigLIP2 so400m). Chosen to train on 2 CPU cores in minutes.
TINY_LLADA = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5)
TINY_SIGLIP_VISION = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                          image_size=64, patch_size=8)
TINY_SIGLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=64, max_position_embeddings=16, pad_token_id=1, bos_token_id=2, eos_token_id=3)
# Data split sizes and seeds: training and benchmark images never share a seed.
SPLITS = {"regions": (6000, 11), "conversations": (3000, 12), "benchmark": (120, 13)}
STAGES = ("s1", "s2", "s3", "s4", "region")


def write_data(root: Path, sizes: dict[str, tuple[int, int]] = SPLITS) -> dict[str, Path]:
    """Region records, image-level conversations, the benchmark split and the tokenizer under `root`."""
    paths = {
        "regions": write_region_split(root / "regions", *sizes["regions"]),
        "conversations": write_conversation_split(root / "conversations", *sizes["conversations"]),
        "benchmark": write_benchmark_split(root / "benchmark", *sizes["benchmark"]),
    }
    texts = tiny_world_texts(2000, seed=sizes["regions"][1])
    train_tiny_tokenizer(texts, root / "tokenizer")
    paths["tokenizer"] = root / "tokenizer"
    return paths


def write_initial_checkpoints(root: Path, tokenizer_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Random tiny LLaDA (HF layout, with the tokenizer) and SigLIP (full SiglipModel) checkpoints: the tiny
    world's stand-ins for `MSALab/LLaDA-8B-Instruct-HF` and `google/siglip2-so400m-patch16-512`."""
    torch.manual_seed(seed)
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    added = json.loads((tokenizer_dir / "tokenizer.json").read_text())["added_tokens"]
    vocab = max([vocab, *(t["id"] + 1 for t in added)])
    llada_dir, siglip_dir = root / "llada", root / "siglip"
    LLaDAModelLM(LLaDAConfig(vocab_size=vocab, **TINY_LLADA)).save_pretrained(llada_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, llada_dir / name)
    siglip = SiglipModel(SiglipConfig(text_config=TINY_SIGLIP_TEXT, vision_config=TINY_SIGLIP_VISION))
    siglip.save_pretrained(siglip_dir)
    return llada_dir, siglip_dir


def patch_labels(scene: Any, patch: int) -> torch.Tensor:
    """Per patch (row-major), the index of each attribute's value of the object covering the patch centre, or
    the extra class "background": (N, A) long, A = len(ATTRIBUTES) + 1 (the last one: which grid cell)."""
    size = scene.image.shape[0]
    centres = torch.arange(patch // 2, size, patch)
    labels = []
    for y in centres.tolist():
        for x in centres.tolist():
            owner = next((o for o, m in zip(scene.objects, scene.masks, strict=True) if m[y, x]), None)
            row = [VALUES[a].index(getattr(owner, a)) if owner else len(VALUES[a]) for a in ATTRIBUTES]
            labels.append(row)
    return torch.tensor(labels)


def pretrain_vision_tower(siglip_dir: Path, steps: int = 400, batch: int = 32, seed: int = 0) -> None:
    """Stands in for SigLIP2's pretraining: trains the tiny vision tower to tell, from the features of the layer
    the VLM reads (`vision_select_layer` -2), the colour, shape, size, texture and grid cell of the object under
    each patch. Without it a random tower's patch features differ by a few percent and the VLM cannot ground
    regions in minutes. The linear heads are thrown away; the SigLIP checkpoint is rewritten in place."""
    from perceptiondlm.data.synthetic import make_scene
    from perceptiondlm.models.vision import encode_tiles
    from perceptiondlm.processing.tiling import normalize_tiles

    torch.manual_seed(seed)
    siglip = SiglipModel.from_pretrained(siglip_dir)
    tower, patch = siglip.vision_model, TINY_SIGLIP_VISION["patch_size"]
    heads = torch.nn.ModuleList(torch.nn.Linear(TINY_SIGLIP_VISION["hidden_size"], len(VALUES[a]) + 1)
                                for a in ATTRIBUTES)
    optimizer = torch.optim.AdamW([*tower.parameters(), *heads.parameters()], lr=2e-3)
    for step in range(steps):
        scenes = [make_scene(seed + 7919, step * batch + i) for i in range(batch)]
        pixels = normalize_tiles([Image.fromarray(s.image) for s in scenes])  # (B, 3, S, S)
        labels = torch.stack([patch_labels(s, patch) for s in scenes])  # (B, N, A)
        features = encode_tiles(tower, pixels, None, -2)  # (B, N, D)
        loss = sum(F.cross_entropy(head(features).flatten(0, 1), labels[..., a].flatten())
                   for a, head in enumerate(heads))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("vision pretraining step %d: loss %.3f", step, loss.item())
    siglip.save_pretrained(siglip_dir)


def train_stages(configs: Path, stages: tuple[str, ...] = STAGES, overrides: dict[str, list[str]] | None = None
                 ) -> dict[str, float]:
    """Runs the stages' configs in order; returns the wall time of each, in seconds."""
    from perceptiondlm.training.config import load_config
    from perceptiondlm.training.trainer import run_training

    seconds = {}
    for stage in stages:
        start = time.perf_counter()
        run_training(load_config(configs / f"{stage}.yaml", (overrides or {}).get(stage, [])))
        seconds[stage] = time.perf_counter() - start
        logger.info("stage %s trained in %.0f s", stage, seconds[stage])
    return seconds


def build(work: Path = Path("work_dirs/tiny"), configs: Path = Path("configs/tiny"),
          export: Path | None = None) -> dict[str, Any]:
    """Everything: data -> initial checkpoints (+ vision pretraining) -> s1..s4 -> both region variants ->
    evaluation on the held-out benchmark -> export of the chosen region model and of the Base model."""
    from perceptiondlm.evaluation.synthetic import run_synthetic_bench

    start = time.perf_counter()
    paths = write_data(work / "data")
    _, siglip_dir = write_initial_checkpoints(work / "init", paths["tokenizer"])
    pretrain_start = time.perf_counter()
    pretrain_vision_tower(siglip_dir)
    seconds = {"vision_pretraining": time.perf_counter() - pretrain_start}
    seconds.update(train_stages(configs, (*STAGES, "region_open")))
    report: dict[str, Any] = {"train_seconds": seconds}
    for variant in ("region", "region_open"):
        report[variant] = {
            decoding: run_synthetic_bench(work / variant, paths["benchmark"], work / "eval" / variant,
                                          decoding=decoding)
            for decoding in ("reference", "threshold")
        }
    report["total_seconds"] = time.perf_counter() - start
    write_json_atomic(work / "build_report.json", report)
    if export is not None:
        export_model(work / "region", export / "tiny-perceptiondlm")
        export_model(work / "s4", export / "tiny-perceptiondlm-base")
        write_json_atomic(export / "tiny-perceptiondlm" / "build_report.json", report)
    return report


def export_model(source: Path, target: Path) -> None:
    """Copies the loadable files of a trained checkpoint (no optimizer states, no intermediate checkpoints)."""
    keep = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.json", "processor_config.json", "preprocessor_config.json", "training_config.yaml"}
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name in keep:
            shutil.copy(path, target / path.name)


def main() -> None:
    """`python -m perceptiondlm.tiny_world`: the whole build, exported to perceptiondlm/assets/."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    report = build(export=Path(__file__).parent / "assets")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
