"""The command line of the region-benchmark inference scripts (evaluation/ParaDLC-Bench/infer.py,
evaluation/DLC-Bench/infer.py): one parser and one run function, with per-benchmark defaults."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def inference_main(description: str, *, annotations: Path, images: Path, output: Path, one_region_per_call: bool,
                   argv: list[str] | None = None) -> None:
    """Parses the arguments, captions every region with `run_benchmark` and prints the summary.

    `one_region_per_call` is the benchmark's default (DLC-Bench's reference script captioned one region per
    call; ParaDLC-Bench captions them in parallel); `--sequential` / `--parallel` switch it.
    """
    from perceptiondlm.evaluation.regionbench import load_model, region_filter_from, run_benchmark, summary_path

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True, help="PerceptionDLM checkpoint directory")
    parser.add_argument("--anno-json", default=annotations)
    parser.add_argument("--image-root", default=images)
    parser.add_argument("--qa-json", default=None, help="caption only the regions of this qa.json")
    parser.add_argument("--class-names-json", default=None, help="else only the regions of this class_names.json")
    parser.add_argument("--output", default=output)
    parser.add_argument("--gen-length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--decoding", default="reference", choices=["reference", "threshold"])
    parser.add_argument("--prompt", default=None, help="default: the prompt the model was trained with")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--sequential", dest="sequential", action="store_true", default=one_region_per_call,
                       help="one region per call (the paper's comparison)")
    order.add_argument("--parallel", dest="sequential", action="store_false", help="all regions of an image at once")
    parser.add_argument("--chunking", default="reference", choices=["reference", "batched"],
                        help="reference: chunks of prompt_numbers regions in annotation order, one call each; "
                        "batched: all regions of an image in one call")
    parser.add_argument("--save-every", type=int, default=20, help="write the outputs every N images")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    model = load_model(args.model_path, device=args.device, dtype=args.dtype)
    summary = run_benchmark(
        model, args.anno_json, args.image_root, args.output, prompt=args.prompt, gen_length=args.gen_length,
        steps=args.steps, decoding=args.decoding, chunking=args.chunking, sequential=args.sequential,
        save_every=args.save_every, region_filter=region_filter_from(args.qa_json, args.class_names_json),
    )
    print(json.dumps(summary, indent=2))
    print(f"captions: {args.output}\nsummary: {summary_path(args.output)}")
