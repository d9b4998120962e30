"""DLC-Bench inference: caption every annotated region (COCO annotations) and write {"<annotation id>": caption}.

Example (one region per call, as the reference script):
    python evaluation/DLC-Bench/infer.py --model-path /ckpt/PerceptionDLM \
        --gen-length 32 --steps 32 --output outputs/dlc_outputs.json
"""

import argparse
import json
import logging
from pathlib import Path

from perceptiondlm.evaluation.regionbench import load_model, region_filter_from, run_benchmark, summary_path

HERE = Path(__file__).resolve().parent

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model-path", required=True, help="PerceptionDLM checkpoint directory")
parser.add_argument("--anno-json", default=HERE / "DLC-bench" / "annotations.json")
parser.add_argument("--image-root", default=HERE / "DLC-bench" / "images")
parser.add_argument("--qa-json", default=None, help="caption only the regions of this qa.json")
parser.add_argument("--class-names-json", default=None, help="else only the regions of this class_names.json")
parser.add_argument("--output", default=HERE / "outputs" / "dlc_outputs.json")
parser.add_argument("--gen-length", type=int, default=32)
parser.add_argument("--steps", type=int, default=32)
parser.add_argument("--decoding", default="reference", choices=["reference", "threshold"])
parser.add_argument("--prompt", default=None, help="default: the prompt the model was trained with")
parser.add_argument("--parallel", action="store_true", help="all regions of an image in one call (the reference "
                    "script captioned one region per call, the default here too)")
parser.add_argument("--chunking", default="reference", choices=["reference", "batched"],
                    help="reference: chunks of prompt_numbers regions in annotation order, one call each; "
                    "batched: all regions of an image in one call")
parser.add_argument("--save-every", type=int, default=20, help="write the outputs every N images")
parser.add_argument("--device", default=None)
parser.add_argument("--dtype", default="bfloat16")
args = parser.parse_args()
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

model = load_model(args.model_path, device=args.device, dtype=args.dtype)
summary = run_benchmark(
    model, args.anno_json, args.image_root, args.output, prompt=args.prompt, gen_length=args.gen_length,
    steps=args.steps, decoding=args.decoding, chunking=args.chunking, sequential=not args.parallel,
    save_every=args.save_every,
    region_filter=region_filter_from(args.qa_json, args.class_names_json),
)
print(json.dumps(summary, indent=2))
print(f"captions: {args.output}\nsummary: {summary_path(args.output)}")
