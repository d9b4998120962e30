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
    ShapeObject,
    language_pretraining_texts,
    object_caption,
    tiny_world_texts,
    write_benchmark_split,
    write_conversation_split,
    write_region_split,
)
from perceptiondlm.data.tiny_tokenizer import train_tiny_tokenizer
from perceptiondlm.io import write_json_atomic
from perceptiondlm.models.configuration import LLaDAConfig
from perceptiondlm.models.llada import LLaDAModelLM
from perceptiondlm.models.regions import region_attention_mask
from perceptiondlm.processing.prompts import region_messages, render_chat
from perceptiondlm.processing.tokens import SpecialTokens

logger = logging.getLogger(__name__)

# Sizes of the tiny backbones (the real ones: LLaDA-8B, SigLIP2 so400m). Chosen to train on 2 CPU cores in minutes.
TINY_LLADA = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                  max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5)
TINY_SIGLIP_VISION = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                          image_size=64, patch_size=8)
TINY_SIGLIP_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=64, max_position_embeddings=16, pad_token_id=1, bos_token_id=2, eos_token_id=3)
# Data split sizes and seeds: training and benchmark images never share a seed.
SPLITS = {"regions": (6000, 11), "conversations": (3000, 12), "benchmark": (120, 13), "language": (3000, 14)}
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
    """Per patch (row-major): for each attribute, the index of the value of the object covering the patch centre
    (or an extra "background" class), then the patch's own 3 x 3 grid cell: (N, len(ATTRIBUTES) + 1) long."""
    size = scene.image.shape[0]
    centres = torch.arange(patch // 2, size, patch)
    labels = []
    for y in centres.tolist():
        for x in centres.tolist():
            owner = next((o for o, m in zip(scene.objects, scene.masks, strict=True) if m[y, x]), None)
            row = [VALUES[a].index(getattr(owner, a)) if owner else len(VALUES[a]) for a in ATTRIBUTES]
            labels.append([*row, 3 * (3 * y // size) + 3 * x // size])
    return torch.tensor(labels)


# How strongly each label shows in the distilled features: appearance first, as in a real encoder. Shape is
# weighted up because it is the hardest to learn (no single 8-px patch shows an outline).
CODE_WEIGHTS = {"colour": 3.0, "shape": 4.0, "texture": 2.0, "size": 1.0, "position": 2.0, "cell": 0.5}


def attribute_codes(dim: int, seed: int) -> list[torch.Tensor]:
    """Fixed random codes, one table per label of `patch_labels`: (values + 1, dim) with rows of unit norm."""
    generator = torch.Generator().manual_seed(seed)
    tables = []
    for name in (*ATTRIBUTES, "cell"):
        rows = len(VALUES[name]) + 1 if name != "cell" else 9
        table = F.normalize(torch.randn(rows, dim, generator=generator), dim=-1) * CODE_WEIGHTS[name]
        if name != "cell":
            table[-1] = 0.0  # background: no object code
        tables.append(table)
    return tables


def object_features(scenes: list[Any], features: torch.Tensor, codes: list[torch.Tensor],
                    patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each object's features averaged over its patches, weighted by how much of each patch it covers, and its
    code (the sum of its attribute codes): (objects, D) twice. Shape shows in an object's outline, which no single
    patch sees; pooling as the RoI tokens do lets the tower spread it over the object's patches."""
    pooled, wanted = [], []
    for b, scene in enumerate(scenes):
        side = scene.image.shape[0] // patch
        for obj, mask in zip(scene.objects, scene.masks, strict=True):
            weight = torch.from_numpy(mask.reshape(side, patch, side, patch).mean((1, 3))).flatten().float()
            if weight.sum() == 0:
                continue
            pooled.append(weight @ features[b] / weight.sum())
            wanted.append(sum(code[VALUES[a].index(getattr(obj, a))]
                              for a, code in zip(ATTRIBUTES, codes, strict=False)))
    return torch.stack(pooled), torch.stack(wanted)


def pretrain_vision_tower(siglip_dir: Path, steps: int = 800, batch: int = 32, seed: int = 0,
                          object_weight: float = 4.0) -> None:
    """Stands in for SigLIP2's pretraining, which leaves a tower whose patch features are dominated by what is in
    the patch. The tiny tower is distilled towards an attribute code per patch: the sum of a fixed random unit
    vector for each attribute of the object under the patch (colour, shape, size, texture, position) and one for
    the patch's grid cell, read at the layer the VLM uses (`vision_select_layer` -2); and, with weight
    `object_weight`, each object's mask-pooled features towards its code (`object_features`). A random tower's
    features are instead dominated by the position embedding (73 % of the variance of the RoI tokens, colour 1 %),
    and the VLM then learns where regions are but not what they look like. Linear probes of mask-pooled features
    after 800 steps (753 held-out objects): colour 0.97, texture 0.97, position 0.96, size 0.76, shape 0.61 (0.28
    with per-patch codes alone, chance 0.25). The SigLIP checkpoint is rewritten in place."""
    from perceptiondlm.data.synthetic import make_scene
    from perceptiondlm.models.vision import encode_tiles
    from perceptiondlm.processing.tiling import normalize_tiles

    torch.manual_seed(seed)
    siglip = SiglipModel.from_pretrained(siglip_dir)
    tower, patch = siglip.vision_model, TINY_SIGLIP_VISION["patch_size"]
    codes = attribute_codes(TINY_SIGLIP_VISION["hidden_size"], seed)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for step in range(steps):
        scenes = [make_scene(seed + 7919, step * batch + i) for i in range(batch)]
        pixels = normalize_tiles([Image.fromarray(s.image) for s in scenes])  # (B, 3, S, S)
        labels = torch.stack([patch_labels(s, patch) for s in scenes])  # (B, N, A + 1)
        target = sum(code[labels[..., a]] for a, code in enumerate(codes))  # (B, N, D)
        features = encode_tiles(tower, pixels, None, -2)  # (B, N, D)
        loss = F.mse_loss(features, target)
        if object_weight:
            pooled, wanted = object_features(scenes, features, codes, patch)
            loss = loss + object_weight * F.mse_loss(pooled, wanted)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("vision pretraining step %d: loss %.4f", step, loss.item())
    siglip.save_pretrained(siglip_dir)


class RegionLayoutTexts:
    """Text-only samples in the region-captioning layout: the processor's conversation with its RoI spans and the
    region attention layout, but no image, and each region's RoI positions holding the sum of the embeddings of
    its attribute words (what a grounded RoI token is to the LM: one vector that carries all of them). A real
    LLM arrives able to read such a span; the tiny LLaDA learns it here (random init: size and texture read
    within 200 steps, shape 0.83 at 300), so the VLM stages only have to map image features onto it."""

    def __init__(self, tokenizer: Any, roi_output_size: int = 4, caption_length: int = 16, max_regions: int = 6,
                 seed: int = 0) -> None:
        from perceptiondlm.processing.processor import PerceptionDLMProcessor

        self.processor = PerceptionDLMProcessor(  # the region stage's processor (configs/tiny), for its layout
            tokenizer, image_size=TINY_SIGLIP_VISION["image_size"], patch_size=TINY_SIGLIP_VISION["patch_size"],
            downsample_ratio=1.0, prompt_numbers=max_regions, roi_output_size=roi_output_size)
        self.tokenizer, self.caption_length, self.max_regions = tokenizer, caption_length, max_regions
        self.special = self.processor.special_tokens
        self.generator = torch.Generator().manual_seed(seed)

    def _pick(self, values: tuple[str, ...]) -> str:
        return values[int(torch.randint(len(values), (1,), generator=self.generator))]

    def _object(self) -> ShapeObject:
        covered = bool(torch.rand(1, generator=self.generator) < 0.3)
        return ShapeObject(shape=self._pick(VALUES["shape"]), colour=self._pick(VALUES["colour"]),
                           size=self._pick(VALUES["size"]), texture=self._pick(VALUES["texture"]),
                           position=self._pick(VALUES["position"]), centre=(0.0, 0.0), radius=1.0,
                           visible_fraction=0.6 if covered else 1.0)

    def _sample(self) -> tuple[torch.Tensor, torch.Tensor, list[list[int]]]:
        """(ids, labels) of one conversation as the processor encodes it for training, without the image
        positions (RoI spans stay reserved-token ids), and each region's word ids."""
        k = int(torch.randint(1, self.max_regions + 1, (1,), generator=self.generator))
        objects = [self._object() for _ in range(k)]
        captions = [self.processor.pad_caption(object_caption(o), self.caption_length) for o in objects]
        text, spans = render_chat(region_messages(k, captions=captions))
        ids, labels = self.processor.encode_text(text, spans, [1], k, self.processor.roi_tokens((1, 1)))
        text_only = ids != self.special.image_context
        words = [[i for w in (o.size, o.colour, o.texture, o.shape, *o.position.split(),
                              *(["covered"] if o.partly_covered else []))
                  for i in self.tokenizer(" " + w, add_special_tokens=False).input_ids] for o in objects]
        return ids[text_only], labels[text_only], words

    def batch(self, size: int, embeddings: torch.nn.Embedding) -> dict[str, torch.Tensor]:
        """`size` padded samples: ids and labels (B, L), input embeddings (B, L, D), the attention layout."""
        samples = [self._sample() for _ in range(size)]
        length = max(len(ids) for ids, _, _ in samples)
        ids = torch.full((size, length), self.special.eot)
        labels = torch.full((size, length), -100)
        attention = torch.zeros(size, length, dtype=torch.long)
        for b, (row, row_labels, _) in enumerate(samples):
            ids[b, : len(row)], labels[b, : len(row)], attention[b, : len(row)] = row, row_labels, 1
        embeds = embeddings(ids)
        reserved = torch.tensor(self.special.reserved[: self.max_regions])
        for b, (_, _, words) in enumerate(samples):
            for i, word_ids in enumerate(words):
                embeds[b, ids[b] == reserved[i]] = embeddings(torch.tensor(word_ids)).sum(0)
        slots = torch.tensor(self.special.caption_slots[: self.max_regions])
        layout = region_attention_mask(ids, reserved, slots, attention, prefix_attends_answers=False)
        return {"ids": ids, "labels": labels, "embeds": embeds, "layout": layout}


def pretrain_language_model(llada_dir: Path, texts: list[str], steps: int = 800, batch: int = 32,
                            seed: int = 0) -> None:
    """Stands in for LLaDA's pretraining: masked-diffusion training of the tiny LLaDA on the tiny world's text
    (captions, questions, answers) and on `RegionLayoutTexts`, so that the VLM stages start, as the real recipe
    does, from a model that already knows the language, can read a region's span, and only has to learn to see.
    The region layout comes first (3/8 of the steps), then alternates with text: a model trained on text first
    did not learn to read the span in 2,000 further steps, while a fresh one reads size and texture after 200
    and, after the whole schedule (800 steps), colour 0.93, shape 1.00, size 1.00, texture 1.00 with the answers
    fully masked. The checkpoint is rewritten in place."""
    from transformers import PreTrainedTokenizerFast

    from perceptiondlm.diffusion.noise import diffusion_loss, mask_tokens, noise_inputs, sample_noise_levels

    torch.manual_seed(seed)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(llada_dir)
    model = LLaDAModelLM.from_pretrained(llada_dir, dtype=torch.float32).train()
    special = SpecialTokens.from_tokenizer(tokenizer)
    mask_id, eot = special.mask, special.eot
    encoded = [ids for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] if ids]
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    embeddings = model.get_input_embeddings()
    generator = torch.Generator().manual_seed(seed)
    regions = RegionLayoutTexts(tokenizer, seed=seed)
    for step in range(steps):
        if step < steps * 3 // 8 or step % 2:  # the region layout first (a text-trained LM never learns it), then
            # every other step
            inputs = regions.batch(batch, embeddings)
            ids, eligible, embeds, layout = inputs["ids"], inputs["labels"] != -100, inputs["embeds"], inputs["layout"]
        else:
            rows = [encoded[i] for i in torch.randint(len(encoded), (batch,), generator=generator).tolist()]
            length = max(map(len, rows))
            ids = torch.tensor([r + [eot] * (length - len(r)) for r in rows])  # eot-padded, as the captions are
            eligible, embeds, layout = torch.ones_like(ids, dtype=torch.bool), embeddings(ids), None
        p = sample_noise_levels(len(ids))
        masked = mask_tokens(eligible, p)
        noised = noise_inputs(embeds, masked, embeddings.weight[mask_id])
        logits = model(inputs_embeds=noised, attention_mask=layout, logits_mask=masked).logits
        loss = diffusion_loss(logits, ids[masked], masked, p, eligible)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info("language pretraining step %d: loss %.3f", step, loss.item())
    model.save_pretrained(llada_dir)


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
    """Everything: data -> initial checkpoints (+ vision and language pretraining stand-ins) -> s1..s4 -> both
    region variants -> evaluation on the held-out benchmark -> export of the chosen region model and of the Base
    model."""
    from perceptiondlm.evaluation.synthetic import run_base_qa, run_synthetic_bench

    start = time.perf_counter()
    paths = write_data(work / "data")
    llada_dir, siglip_dir = write_initial_checkpoints(work / "init", paths["tokenizer"])
    seconds = {}
    for name, pretrain in (("vision_pretraining", lambda: pretrain_vision_tower(siglip_dir)),
                           ("language_pretraining", lambda: pretrain_language_model(
                               llada_dir, language_pretraining_texts(*SPLITS["language"])))):
        started = time.perf_counter()
        pretrain()
        seconds[name] = time.perf_counter() - started
    seconds.update(train_stages(configs, (*STAGES, "region_open")))
    report: dict[str, Any] = {"train_seconds": seconds}
    report["base_qa"] = run_base_qa(work / "s4", seed=SPLITS["benchmark"][1],
                                    output_path=work / "eval" / "base_qa.json")
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
        (export / "tiny-perceptiondlm" / "README.md").write_text(model_card(report))
    return report


def model_card(report: dict[str, Any]) -> str:
    """The exported model's README: how it was made and what it scores (from the build report)."""
    seconds = report["train_seconds"]
    lines = [
        "# tiny-perceptiondlm", "",
        "The embedded default model of this repository: a PerceptionDLM at toy size (LLaDA "
        f"{TINY_LLADA['num_hidden_layers']} x {TINY_LLADA['hidden_size']}, SigLIP "
        f"{TINY_SIGLIP_VISION['num_hidden_layers']} x {TINY_SIGLIP_VISION['hidden_size']}, 64 x 64 images) trained "
        "on the tiny world (`perceptiondlm/data/synthetic.py`) by `scripts/build_tiny_model.sh` through the five "
        "stages of `configs/tiny/` (the 8B recipe at toy size), after stand-ins for the backbones' pretraining "
        "(`perceptiondlm/tiny_world.py`). It captions regions of the tiny world's pictures only.", "",
        "## How it was made", "",
        "| step | seconds |", "|---|---|",
        *(f"| {name} | {value:.0f} |" for name, value in seconds.items()),
        f"| total (with data and evaluation) | {report['total_seconds']:.0f} |", "",
        "## Scores on the held-out synthetic benchmark (ParaDLC-Bench protocol, exact rule judge)", "",
        "| model | decoding | avg | pos | neg | colour | shape | size | texture | position | TPF |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in ("region", "region_open"):
        for decoding, r in report.get(variant, {}).items():
            acc = r["attribute_accuracy"]
            lines.append(f"| {variant} | {decoding} | {r['avg']:.1f} | {r['avg_pos']:.1f} | {r['avg_neg']:.1f} | "
                         + " | ".join(f"{acc[a]:.2f}" for a in ATTRIBUTES) + f" | {r['tpf']:.2f} |")
    if "base_qa" in report:
        qa = report["base_qa"]
        lines += ["", f"Base model (tiny-perceptiondlm-base), held-out attribute questions: accuracy "
                      f"{qa['accuracy']:.2f} over {qa['questions']} questions "
                      + ", ".join(f"{a} {v:.2f}" for a, v in qa["attribute_accuracy"].items()) + "."]
    return "\n".join(lines) + "\n"


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
