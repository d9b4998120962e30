"""Sampler speed benchmark: wall time, NFE and tokens per forward (TPF) of `caption_regions`, reported as ratios.

One process, the same inputs (a synthetic 3:2 image, K in {1, 3, 8} random non-overlapping rectangles, gen_length
32, steps 32, greedy). Baseline: `reference` decoding without cache (32 full forwards scoring every answer
position). Compared: `threshold` decoding (tau 0.9) without cache, with `eos_stop` (K = 3), with the approximate
prefix cache refreshed every 4 (K = 3: also 8) steps on the released-style model (`prefix_attends_answers: true`),
and with the exact cache on the same weights with that flag false; at K = 8, all regions in one call (parallel;
8 > prompt_numbers 6 gives a batch of 2 rows) vs one call per region (sequential). Variants at K = 3: the
unsharpened random model and a 32k-row vocabulary.

The model is tiny and random, but its sequence has the real proportions: 128-px tiles with 4-px patches give 256
LM tokens per tile like the real 512/16 ones, a 3:2 image gives 3x2 tiles + thumbnail = 7 tiles = 1792 image
tokens, and each region adds 16 RoI tokens and a 32-token slot. Plain random weights predict the same
near-uniform distribution at every answer position, so tau commits one token per slot and step (or, sharpened
enough, all at once). The LM is therefore initialised with peaked attention (q/k std 0.6, other weights 0.1,
embeddings 1) and sharpened by scaling `lm_head` x40: confidences then spread over about (0.4, 1). Times are a
toy model's on CPU (1 thread by default); only the ratios are meant to transfer.

Run: python benchmarks/sampler_speed.py [--quick] [--out benchmarks/results/sampler_speed.json]
(full: about 4-6 min on 2 CPU cores; --quick: K = 3 only, one round, < 60 s). Never used by the tests.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import reduce
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import SiglipConfig
from transformers.utils import logging as hf_logging

from perceptiondlm import PerceptionDLM
from perceptiondlm.diffusion.sampler import SamplerStats
from perceptiondlm.models.configuration import PerceptionDLMConfig
from perceptiondlm.processing.tokens import SpecialTokens

LOG = logging.getLogger("sampler_speed")
CHECKPOINT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "pdmllm" / "checkpoint"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.json")
TILE, PATCH = 128, 4  # (128/4)^2 * 0.5^2 = 256 LM tokens per tile, as the real 512-px tiles with 16-px patches
IMAGE_WH = (384, 256)  # 3:2 -> a 3x2 grid + thumbnail = 7 tiles
LM_SHAPE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, max_position_embeddings=4096)
SHARPEN = 40.0  # lm_head scale of the "sharp" models
BIG_VOCAB = 32768  # a quarter of LLaDA-8B's 126464 rows (time)
MODES_EVERY_K = {False: ("reference", "threshold", "threshold+eos+cache~r4"),
                 True: ("reference", "threshold+eos+cache~r4")}  # by --quick
COMMON = dict(gen_length=32, steps=32, threshold=0.9)
MODES: dict[str, dict[str, Any]] = {
    "reference": dict(decoding="reference", cache=False),
    "threshold": dict(decoding="threshold", eos_stop=False, cache=False),
    "threshold+eos": dict(decoding="threshold", eos_stop=True, cache=False),
    "threshold+eos+cache~r4": dict(decoding="threshold", eos_stop=True, cache=True, cache_refresh_every=4),
    "threshold+eos+cache~r8": dict(decoding="threshold", eos_stop=True, cache=True, cache_refresh_every=8),
    "threshold+eos+exact cache": dict(decoding="threshold", eos_stop=True, cache=True),  # on the "closed" model
}


@dataclass
class Row:
    model: str
    k: int
    mode: str
    seconds: float  # median wall time of one caption_regions call (sequential: of all K calls)
    seconds_all: list[float]
    nfe: int
    tokens: int
    content_tokens: int
    tpf: float
    seconds_vision: float
    seconds_prefill: float
    seconds_denoise: float
    speedup: float  # median over rounds of reference seconds (same round, same K) / seconds


def build_checkpoint(directory: Path, vocab_size: int | None = None) -> Path:
    """Writes a tiny random model in the released layout, with the golden tokenizer and our tile size.
    `vocab_size` enlarges the embedding and lm_head beyond the tokenizer (ids unchanged)."""
    lm = json.loads((CHECKPOINT / "config.json").read_text())["language_model_config"]
    lm.update(LM_SHAPE, vocab_size=vocab_size or lm["vocab_size"])
    vision = SiglipConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=8, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=TILE, patch_size=PATCH),
    ).to_dict()
    config = PerceptionDLMConfig(language_model_config=lm, vision_model_config=vision, image_token_id=308,
                                 vision_abstractor_config={"projection_type": "mlp2x_gelu"}, image_size=TILE,
                                 patch_size=PATCH)
    torch.manual_seed(0)
    model = PerceptionDLM(config, special_tokens=SpecialTokens.from_tokenizer(CHECKPOINT))
    with torch.no_grad():  # peaked attention, so that answer positions get different predictions
        for name, param in model.language_model.named_parameters():
            if "norm" not in name and "lm_head" not in name:
                param.normal_(0.0, 1.0 if "embed" in name else 0.6 if ("q_proj" in name or "k_proj" in name) else 0.1)
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(CHECKPOINT / name, directory / name)
    tokens = {"image_token": "<IMG_CONTEXT>", "image_start_token": "<img>", "image_end_token": "</img>"}
    (directory / "processor_config.json").write_text(json.dumps(
        {"image_size": [TILE, TILE], "min_sub_img": 1, "max_sub_img": 6, **tokens}, indent=2))
    (directory / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": TILE, "width": TILE},
         "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3,
         "image_std": [0.5] * 3}, indent=2))
    return directory


def load(directory: Path, sharpen: float, prefix_attends_answers: bool = True) -> PerceptionDLM:
    config = PerceptionDLMConfig.from_pretrained(directory, prefix_attends_answers=prefix_attends_answers)
    model = PerceptionDLM.from_pretrained(directory, config=config).eval()
    with torch.no_grad():
        model.language_model.get_output_embeddings().weight.mul_(sharpen)
    return model


def synthetic_inputs(seed: int = 0, regions: int = 8) -> tuple[Image.Image, list[np.ndarray]]:
    """A random-noise 3:2 image and `regions` rectangles, one per cell of a 4x2 grid (so none overlap)."""
    rng = np.random.default_rng(seed)
    width, height = IMAGE_WH
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    cell_w, cell_h = width // 4, height // 2
    masks = []
    for i in range(regions):
        w, h = int(rng.integers(cell_w // 3, cell_w)), int(rng.integers(cell_h // 3, cell_h))
        x = (i % 4) * cell_w + int(rng.integers(0, cell_w - w + 1))
        y = (i // 4 % 2) * cell_h + int(rng.integers(0, cell_h - h + 1))
        mask = np.zeros((height, width), dtype=bool)
        mask[y : y + h, x : x + w] = True
        masks.append(mask)
    return image, masks


def sequence_shape(model: PerceptionDLM, image: Image.Image, masks: list[np.ndarray]) -> str:
    """"B x L" of the batch caption_regions decodes: more regions than prompt_numbers become more rows."""
    per_row = model.config.prompt_numbers
    chunks = [masks[i : i + per_row] for i in range(0, len(masks), per_row)]
    ids = model.processor.caption_inputs([image] * len(chunks), chunks)["input_ids"]
    return f"{ids.shape[0]} x {ids.shape[1]}"


Case = tuple[str, str, bool]  # (model name, mode, sequential: one call per region)


def make_call(model: PerceptionDLM, image: Image.Image, masks: list[np.ndarray], mode: str,
              sequential: bool) -> Callable[[], SamplerStats]:
    kwargs = {**COMMON, **MODES[mode]}

    def call() -> SamplerStats:
        if not sequential:
            return model.caption_regions(image, masks, **kwargs).stats
        return reduce(SamplerStats.merge, (model.caption_regions(image, [m], **kwargs).stats for m in masks))

    return call


def run_rounds(models: dict[str, PerceptionDLM], cases: list[Case], image: Image.Image, masks: list[np.ndarray],
               repeats: int) -> list[Row]:
    """A warm-up round, then `repeats` rounds that run every case once, in turn, so that load from other processes
    hits all cases alike. cases[0] is the reference; a case's speed-up is the median over rounds of
    reference time / case time (paired within the round)."""
    calls = {case: make_call(models[case[0]], image, masks, case[1], case[2]) for case in cases}
    for (name, mode, sequential), call in calls.items():  # warm-up (sequential: one single-region call)
        make_call(models[name], image, masks[:1], mode, False)() if sequential else call()
    times: dict[Case, list[float]] = {case: [] for case in cases}
    stats: dict[Case, list[SamplerStats]] = {case: [] for case in cases}
    for round_index in range(repeats):
        for case, call in calls.items():
            start = time.perf_counter()
            stats[case].append(call())
            times[case].append(time.perf_counter() - start)
        LOG.info("K=%d: round %d/%d done", len(masks), round_index + 1, repeats)
    rows = []
    for case in cases:
        name, mode, sequential = case
        median_run = sorted(range(repeats), key=times[case].__getitem__)[(repeats - 1) // 2]
        st = stats[case][median_run]
        label = f"{mode} (sequential)" if sequential else mode
        speedup = statistics.median(r / t for r, t in zip(times[cases[0]], times[case], strict=True))
        rows.append(Row(name, len(masks), label, statistics.median(times[case]), [round(t, 4) for t in times[case]],
                        st.nfe, st.tokens, st.content_tokens, st.tpf, st.seconds_vision, st.seconds_prefill,
                        st.seconds_denoise, speedup))
        LOG.info("%-6s K=%d %-34s %.3f s  x%.2f  NFE %3d  TPF %.2f", name, len(masks), label, rows[-1].seconds,
                 speedup, st.nfe, st.tpf)
    return rows


def benchmark(quick: bool) -> dict[str, Any]:
    repeats, ks = (1, (3,)) if quick else (3, (1, 3, 8))
    image, all_masks = synthetic_inputs()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        small = build_checkpoint(Path(tmp) / "small")  # the golden tokenizer's 334 rows
        models = {"sharp": load(small, SHARPEN), "closed": load(small, SHARPEN, prefix_attends_answers=False),
                  "random": load(small, 1.0)}
        lengths = {k: sequence_shape(models["sharp"], image, all_masks[:k]) for k in ks}
        for k in ks:
            full_set = k == 3 and not quick  # eos_stop alone, refresh period 8, unsharpened: at K = 3 only
            modes = ["reference", "threshold", "threshold+eos", "threshold+eos+cache~r4", "threshold+eos+cache~r8"]
            cases: list[Case] = [("sharp", m, False) for m in modes if full_set or m in MODES_EVERY_K[quick]]
            cases.append(("closed", "threshold+eos+exact cache", False))
            if full_set:  # paired with sharp's reference, which costs the same (32 forwards, same shapes)
                cases.append(("random", "threshold+eos+cache~r4", False))
            if k == ks[-1]:
                cases.append(("sharp", "reference", True))
            rows += run_rounds(models, cases, image, all_masks[:k], repeats)
        del models
        if not quick:
            big = {"v32k": load(build_checkpoint(Path(tmp) / "big", vocab_size=BIG_VOCAB), SHARPEN)}
            cases = [("v32k", mode, False) for mode in ("reference", "threshold", "threshold+eos+cache~r4")]
            rows += run_rounds(big, cases, image, all_masks[:3], repeats)
    return dict(
        settings=dict(quick=quick, repeats=repeats, warmup=1, threads=torch.get_num_threads(),
                      torch=torch.__version__, tile=TILE, patch=PATCH, image_wh=IMAGE_WH, tiles=7,
                      image_tokens=7 * (TILE // PATCH // 2) ** 2, sequence_length_by_k=lengths, lm=LM_SHAPE,
                      sharpen=SHARPEN, big_vocab=BIG_VOCAB, **COMMON),
        rows=[asdict(r) for r in rows], summary=summarize(rows, ks[-1]))


def summarize(rows: list[Row], k_parallel: int) -> dict[str, float]:
    def find(model: str, k: int, mode: str) -> Row | None:
        return next((r for r in rows if (r.model, r.k, r.mode) == (model, k, mode)), None)

    out: dict[str, float] = {}
    if (fast := find("sharp", 3, "threshold+eos+cache~r4")) is not None:
        out.update(K3_reference_over_threshold_eos_cache=fast.speedup, K3_threshold_eos_cache_tpf=fast.tpf)
    out.update({f"K{r.k}_threshold_tpf": r.tpf for r in rows if (r.model, r.mode) == ("sharp", "threshold")})
    if (seq := find("sharp", k_parallel, "reference (sequential)")) is not None:
        out[f"K{k_parallel}_sequential_over_parallel"] = 1 / seq.speedup
    if (big := find("v32k", 3, "threshold+eos+cache~r4")) is not None:
        out["v32k_K3_reference_over_threshold_eos_cache"] = big.speedup
    return out


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        "# Sampler speed (tiny random PerceptionDLM, CPU)", "",
        f"{s['tiles']} tiles x {s['image_tokens'] // s['tiles']} = {s['image_tokens']} image tokens; sequence "
        f"batch (rows x length) by K: {s['sequence_length_by_k']}; LM {s['lm']['num_hidden_layers']} layers x "
        f"{s['lm']['hidden_size']}; gen_length {s['gen_length']}, steps {s['steps']}, tau {s['threshold']}; "
        f"median of {s['repeats']} after {s['warmup']} warm-up; torch {s['torch']}, {s['threads']} threads; "
        f"{s['total_seconds']:.0f} s in all, 1-min load average {s['load_average_1min_before_after']} "
        "(before, after: other processes share the CPUs).",
        f"Models: sharp = lm_head x{s['sharpen']:g}; closed = sharp with prefix_attends_answers false; random = "
        f"unsharpened; v32k = sharp with {s['big_vocab']} vocabulary rows. Speed-up = median over rounds of "
        "reference time / time, paired within a round (same K; closed and random are paired with sharp's "
        "reference, which costs the same: 32 forwards of the same shapes).", "",
        "| model | K | mode | wall s | speed-up | NFE | TPF | content tok | vision s | prefill s | denoise s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['k']} | {r['mode']} | {r['seconds']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['nfe']} | {r['tpf']:.2f} | {r['content_tokens']}/{r['tokens']} | "
                     f"{r['seconds_vision']:.3f} | {r['seconds_prefill']:.3f} | {r['seconds_denoise']:.3f} |")
    lines += ["", "Key ratios:", ""] + [f"- {k}: {v:.2f}" for k, v in result["summary"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="K = 3 only, one repeat (< 60 s)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sampler_speed.json"))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: robust to other processes on a small machine)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    start, load_before = time.perf_counter(), round(os.getloadavg()[0], 1)
    result = benchmark(args.quick)
    result["settings"].update(total_seconds=round(time.perf_counter() - start, 1),
                              load_average_1min_before_after=[load_before, round(os.getloadavg()[0], 1)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    LOG.info("wrote %s and %s in %.0f s", args.out, args.out.with_suffix(".md"), result["settings"]["total_seconds"])


if __name__ == "__main__":
    main()
