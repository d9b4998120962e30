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
from transformers import SiglipConfig, SiglipModel

from perceptiondlm.data.synthetic import (
    ATTRIBUTES,
    language_pretraining_texts,
    tiny_world_texts,
    write_benchmark_split,
    write_conversation_split,
    write_region_split,
)
from perceptiondlm.data.tiny_tokenizer import train_tiny_tokenizer
from perceptiondlm.io import write_json_atomic
from perceptiondlm.models.configuration import LLaDAConfig
from perceptiondlm.models.llada import LLaDAModelLM
from perceptiondlm.tiny_pretraining import (
    TINY_LLADA,
    TINY_SIGLIP_TEXT,
    TINY_SIGLIP_VISION,
    pretrain_language_model,
    pretrain_vision_tower,
    probe_vision_tower,
)

logger = logging.getLogger(__name__)

# Data split sizes and seeds: training and benchmark images never share a seed.
SPLITS = {"regions": (10000, 11), "conversations": (10000, 12), "benchmark": (120, 13), "language": (3000, 14)}
STAGES = ("s1", "s2", "s3", "s4", "region")
# One-region records added to the region stage's data (one object each of the first region images): one-region
# samples were 7 % of the stage's samples, and decoding one region at a time scored 2.4 points below decoding
# the regions together; with these they are about a fifth.
SINGLE_REGION_RECORDS = 2000
CONVERSATION_QA_TURNS = 6  # questions per image-level question conversation of the Base stages


def write_data(root: Path, sizes: dict[str, tuple[int, int]] = SPLITS) -> dict[str, Path]:
    """Region records, image-level conversations, the benchmark split and the tokenizer under `root`."""
    paths = {
        "regions": write_region_split(root / "regions", *sizes["regions"], single_regions=SINGLE_REGION_RECORDS),
        "conversations": write_conversation_split(root / "conversations", *sizes["conversations"],
                                                  qa_turns=CONVERSATION_QA_TURNS),
        "benchmark": write_benchmark_split(root / "benchmark", *sizes["benchmark"]),
    }
    texts = tiny_world_texts(2000, seed=sizes["regions"][1])
    train_tiny_tokenizer(texts, root / "tokenizer")
    paths["tokenizer"] = root / "tokenizer"
    return paths


def recipe_fingerprint(configs: Path = Path("configs/tiny")) -> str:
    """A hash of what a build is made from (the stages' configs, the split sizes and seeds, the data knobs): two
    builds reproduce each other only if their fingerprints match."""
    import hashlib

    digest = hashlib.sha256(json.dumps([SPLITS, SINGLE_REGION_RECORDS, CONVERSATION_QA_TURNS]).encode())
    for path in sorted(configs.glob("*.yaml")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


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


def train_stages(configs: Path, stages: tuple[str, ...] = STAGES, overrides: dict[str, list[str]] | None = None,
                 steps: BuildSteps | None = None) -> dict[str, float]:
    """Runs the stages' configs in order (through `steps`, which skips the ones a resumed build has already
    trained); returns the wall time of each, in seconds."""
    from perceptiondlm.training.config import load_config
    from perceptiondlm.training.trainer import run_training

    steps = steps or BuildSteps(None)
    for stage in stages:
        config = load_config(configs / f"{stage}.yaml", (overrides or {}).get(stage, []))
        steps.run(stage, json.dumps(config.to_dict(), sort_keys=True, default=str), lambda c=config: run_training(c))
    return {stage: steps.seconds[stage] for stage in stages}


class BuildSteps:
    """Runs a build's steps in order and records each finished one (its key, what it was made from, and its time)
    in `record` (a JSON file). A resumed build reuses recorded steps up to the first one whose key changed or that
    never finished; that step and every later one are made anew. Keys cover configs and data knobs, not code: after
    a change of code, build from scratch."""

    def __init__(self, record: Path | None, resume: bool = False):
        self.record = record
        self.done = json.loads(record.read_text()) if resume and record is not None and record.exists() else {}
        self.reusing = bool(self.done)
        self.seconds: dict[str, float] = {}
        self.reused_seconds = 0.0  # the recorded time of the steps this run reused

    def run(self, name: str, key: str, step: Any) -> None:
        finished = self.done.get(name)
        if self.reusing and finished is not None and finished["key"] == key:
            self.seconds[name] = finished["seconds"]
            self.reused_seconds += finished["seconds"]
            logger.info("step %s: reusing the resumed build's (%.0f s)", name, finished["seconds"])
            return
        self.reusing = False
        start = time.perf_counter()
        step()
        self.seconds[name] = time.perf_counter() - start
        logger.info("step %s done in %.0f s", name, self.seconds[name])
        self.done[name] = {"key": key, "seconds": self.seconds[name]}
        if self.record is not None:
            write_json_atomic(self.record, self.done)


# The benchmark runs of each region variant (keyword arguments of `run_synthetic_bench`); the shipped variant is
# also decoded one region at a time, to compare parallel decoding with it.
EVALUATIONS = {"reference": {}, "threshold": {"decoding": "threshold", "cache": False},
               "threshold_cached": {"decoding": "threshold", "cache": True}}
SEQUENTIAL = {"sequential": True}
VARIANTS = ("region", "region_open")
# region_open (the released layout) is shipped only if it beats region by more than this many points: region's
# prompt never sees the answers, which makes its prefix KV cache exact. Two from-scratch builds put the layouts in
# opposite orders (92.4 vs 91.2, then 91.2 vs 92.7): differences under 2 points are run-to-run noise.
OPEN_LAYOUT_MARGIN = 2.0


def choose_variant(report: dict[str, Any]) -> tuple[str, str]:
    """The region variant to ship and why, from the threshold-decoding scores of both."""
    exact, released = (report[v]["threshold"] for v in VARIANTS)
    if released["avg"] > exact["avg"] + OPEN_LAYOUT_MARGIN:
        return "region_open", (f"the released layout scores {released['avg']:.1f} against {exact['avg']:.1f}, more "
                               f"than {OPEN_LAYOUT_MARGIN:.0f} points better, which outweighs its approximate cache")
    return "region", (f"it scores {exact['avg']:.1f} against the released layout's {released['avg']:.1f} (within "
                      f"{OPEN_LAYOUT_MARGIN:.0f} points or better) and its prompt never sees the answers, so the "
                      "prefix KV cache is exact")


def build(work: Path = Path("work_dirs/tiny"), configs: Path = Path("configs/tiny"),
          export: Path | None = None, previous: dict[str, Any] | None = None, resume: bool = False) -> dict[str, Any]:
    """Everything: data -> initial checkpoints (+ vision and language pretraining stand-ins) -> s1..s4 -> both
    region variants -> evaluation on the held-out benchmark -> export of the chosen region model and of the Base
    model. The report (and, with `export`, the model card) holds every time and score, and, given the `previous`
    build's report, how far its scores are from this build's (`compare_reports`). With `resume`, the steps an
    interrupted (or earlier) build in `work` finished with the same configs are reused (`BuildSteps`)."""
    from perceptiondlm.evaluation.synthetic import run_base_qa, run_synthetic_bench

    start = time.perf_counter()
    recipe = recipe_fingerprint(configs)
    steps = BuildSteps(work / "build_steps.json", resume=resume)
    data_key = json.dumps([SPLITS, SINGLE_REGION_RECORDS, CONVERSATION_QA_TURNS])
    steps.run("data", data_key, lambda: write_data(work / "data"))
    paths = {"benchmark": work / "data" / "benchmark", "tokenizer": work / "data" / "tokenizer"}
    llada_dir, siglip_dir = work / "init" / "llada", work / "init" / "siglip"
    steps.run("initial_checkpoints", json.dumps([TINY_LLADA, TINY_SIGLIP_VISION, TINY_SIGLIP_TEXT]),
              lambda: write_initial_checkpoints(work / "init", paths["tokenizer"]))
    steps.run("vision_pretraining", "default", lambda: pretrain_vision_tower(siglip_dir))
    steps.run("language_pretraining", json.dumps(SPLITS["language"]), lambda: pretrain_language_model(
        llada_dir, language_pretraining_texts(*SPLITS["language"])))
    seconds = {name: steps.seconds[name] for name in ("vision_pretraining", "language_pretraining")}
    report: dict[str, Any] = {"recipe": recipe, "vision_probe": probe_vision_tower(siglip_dir)}
    seconds.update(train_stages(configs, (*STAGES, "region_open"), steps=steps))
    report["train_seconds"] = seconds
    report["base_qa"] = run_base_qa(work / "s4", seed=SPLITS["benchmark"][1],
                                    output_path=work / "eval" / "base_qa.json")
    for variant in VARIANTS:
        report[variant] = {name: run_synthetic_bench(work / variant, paths["benchmark"], work / "eval" / variant / name,
                                                     **kwargs) for name, kwargs in EVALUATIONS.items()}
    shipped, reason = choose_variant(report)
    report["shipped"], report["shipped_because"] = shipped, reason
    report[shipped]["sequential"] = run_synthetic_bench(work / shipped, paths["benchmark"],
                                                        work / "eval" / shipped / "sequential", **SEQUENTIAL)
    report["total_seconds"] = time.perf_counter() - start + steps.reused_seconds  # from scratch, resumed or not
    if previous is not None:
        report["reproduction"] = compare_reports(report, previous)
    write_json_atomic(work / "build_report.json", report)
    if export is not None:
        export_model(work / shipped, export / "tiny-perceptiondlm")
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
        "(`perceptiondlm/tiny_pretraining.py`). It captions regions of the tiny world's pictures only.", "",
        "## How it was made", "",
        "| step | seconds |", "|---|---|",
        *(f"| {name} | {value:.0f} |" for name, value in seconds.items()),
        f"| total (with data and evaluation) | {report['total_seconds']:.0f} |", "",
        *(f"{note}\n" for note in report.get("notes", [])),
    ]
    if "vision_probe" in report:
        lines += ["Linear probes of the pretrained tower's mask-pooled features (held-out objects): "
                  + ", ".join(f"{a} {v:.2f}" for a, v in report["vision_probe"].items()) + ".", ""]
    lines += [
        "## Scores on the held-out synthetic benchmark (ParaDLC-Bench protocol, exact rule judge)", "",
        "`region`: the prompt never attends to the answers (`prefix_attends_answers: false`, exact prefix KV cache); "
        "`region_open`: the released models' layout. Gen length 16, 16 steps; threshold decoding at tau 0.9; "
        "`threshold_cached` reuses the prompt's keys and values; `sequential` decodes one region at a time, with "
        "reference decoding (compare it with the `reference` row).", "",
        "| model | decoding | avg | pos | neg | colour | shape | size | texture | position | TPF | regions/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in VARIANTS:
        for decoding, r in report.get(variant, {}).items():
            acc = r["attribute_accuracy"]
            lines.append(f"| {variant} | {decoding} | {r['avg']:.1f} | {r['avg_pos']:.1f} | {r['avg_neg']:.1f} | "
                         + " | ".join(f"{acc[a]:.2f}" for a in ATTRIBUTES)
                         + f" | {r['tpf']:.2f} | {r.get('regions_per_second', float('nan')):.1f} |")
    if "shipped" in report:
        lines += ["", f"Shipped: `{report['shipped']}`, because {report['shipped_because']}."]
        by_cover = report[report["shipped"]].get("threshold", {}).get("attribute_accuracy_by_cover")
        if by_cover:  # occluded objects are where colour and shape go wrong
            lines += ["", "Its threshold captions by occlusion: " + "; ".join(
                f"{name.replace('_', ' ')} ({g['regions']} regions) colour {g['colour']:.2f}, shape {g['shape']:.2f}"
                for name, g in by_cover.items()) + "."]
    if "base_qa" in report:
        qa = report["base_qa"]
        lines += ["", f"Base model (tiny-perceptiondlm-base), held-out attribute questions: accuracy "
                      f"{qa['accuracy']:.2f} over {qa['questions']} questions "
                      + ", ".join(f"{a} {v:.2f}" for a, v in qa["attribute_accuracy"].items()) + "."]
    if "reproduction" in report:
        lines += ["", *reproduction_lines(report["reproduction"])]
    return "\n".join(lines) + "\n"


# `scripts/build_tiny_model.sh` must reproduce the shipped model's scores within this (fractions: 0.02 = 2 points of
# the ParaDLC average).
REPRODUCTION_TOLERANCE = 0.02


def headline_scores(report: dict[str, Any]) -> dict[str, float]:
    """The scores a rebuild must reproduce, as fractions: each benchmark run's ParaDLC average and per-attribute
    accuracy, and the Base model's question accuracy."""
    scores = {}
    for variant in VARIANTS:
        for decoding, r in report.get(variant, {}).items():
            scores[f"{variant} {decoding} avg"] = r["avg"] / 100
            scores.update({f"{variant} {decoding} {a}": v for a, v in r["attribute_accuracy"].items()})
    if "base_qa" in report:
        scores["base qa"] = report["base_qa"]["accuracy"]
    return scores


def compare_reports(this: dict[str, Any], other: dict[str, Any],
                    tolerance: float = REPRODUCTION_TOLERANCE) -> dict[str, Any]:
    """How another from-scratch build's scores differ from this build's: every common headline score (delta =
    other - this), the largest difference, whether all are within `tolerance`, and the other build's time."""
    ours, theirs = headline_scores(this), headline_scores(other)
    rows = [{"score": k, "this": v, "other": theirs[k], "delta": theirs[k] - v} for k, v in ours.items() if k in theirs]
    worst = max((abs(r["delta"]) for r in rows), default=0.0)
    same_recipe = this.get("recipe") is not None and this.get("recipe") == other.get("recipe")
    return {"tolerance": tolerance, "max_abs_delta": worst, "within_tolerance": bool(rows) and worst <= tolerance,
            "same_recipe": same_recipe, "other_seconds": other.get("total_seconds"), "rows": rows}


def reproduction_lines(comparison: dict[str, Any]) -> list[str]:
    """The model card's reproduction section (the averages; `compare_reports` has every score)."""
    tolerance = comparison["tolerance"]
    outside = [f"{r['score']} ({r['delta']:+.3f})" for r in comparison["rows"] if abs(r["delta"]) > tolerance]
    verdict = (f"within ±{tolerance:.2f} of this model on every score, the attributes included" if not outside else
               f"within ±{tolerance:.2f} of this model on every score but " + ", ".join(outside))
    same_recipe = comparison.get("same_recipe", True)
    if same_recipe:
        intro = (f"Another from-scratch build of the same recipe (`bash scripts/build_tiny_model.sh`, "
                 f"{comparison['other_seconds']:.0f} s) scored {verdict} (largest difference "
                 f"{comparison['max_abs_delta']:.3f}):")
    else:  # the model this build replaced was made otherwise: a comparison, not a reproduction
        intro = ("Not reproduced yet: the model this build replaced was made with a different recipe (configs or "
                 "data), so its scores below show what the change did, not run-to-run noise. Rebuild once more "
                 "(`bash scripts/build_tiny_model.sh`) to measure the reproduction.")
    other = "other build" if same_recipe else "replaced model"
    lines = ["## Reproduction", "", intro, "",
             f"| score | this model | {other} | difference |", "|---|---|---|---|"]
    lines += [f"| {r['score']} | {r['this']:.3f} | {r['other']:.3f} | {r['delta']:+.3f} |"
              for r in comparison["rows"] if r["score"].endswith(("avg", "qa"))]
    return lines


def export_model(source: Path, target: Path) -> None:
    """Copies the loadable files of a trained checkpoint (no optimizer states, no intermediate checkpoints)."""
    keep = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "chat_template.json", "processor_config.json", "preprocessor_config.json", "training_config.yaml"}
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name in keep:
            shutil.copy(path, target / path.name)


def main(argv: list[str] | None = None) -> None:
    """`python -m perceptiondlm.tiny_world [--resume]`: the whole build, exported to perceptiondlm/assets/."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m perceptiondlm.tiny_world", description=main.__doc__)
    parser.add_argument("--resume", action="store_true",
                        help="reuse the steps an earlier build in work_dirs/tiny finished with the same configs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    assets = Path(__file__).parent / "assets"
    shipped = assets / "tiny-perceptiondlm" / "build_report.json"  # the model this build replaces
    report = build(export=assets, previous=json.loads(shipped.read_text()) if shipped.exists() else None,
                   resume=args.resume)
    print(json.dumps(report, indent=2))
    if "reproduction" in report:
        print("\n".join(reproduction_lines(report["reproduction"])))


if __name__ == "__main__":
    main()
