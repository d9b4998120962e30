"""ParaDLC-Bench judging: ask an OpenAI-compatible vision judge (published: GPT-5.2 on Azure) every question with
focal crops of image and mask, score with the published protocol, write <pred>_eval_gpt<suffix>.json/.md.

Example: export AZURE_OPENAI_ENDPOINT=https://...  AZURE_OPENAI_KEY=...
    python evaluation/ParaDLC-Bench/judge.py --pred outputs/paradlc_outputs.json --model gpt-5.2-2025-12-11 \
        --max-tokens-param max_completion_tokens --no-temperature
"""

import argparse
import logging
import os
from pathlib import Path

from perceptiondlm.evaluation.judges import OpenAIJudge, judge_and_score
from perceptiondlm.evaluation.scoring import format_markdown

HERE = Path(__file__).resolve().parent

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--pred", required=True, help="captions JSON written by infer.py")
parser.add_argument("--qa", default=HERE / "annotations" / "qa.json")
parser.add_argument("--class-names", default=HERE / "annotations" / "class_names.json")
parser.add_argument("--anno-json", default=HERE / "annotations" / "annotations.json")
parser.add_argument("--image-root", default=HERE / "annotations" / "images")
parser.add_argument("--model", default="gpt-5.2-2025-12-11", help="judge model (Azure: the deployment name)")
parser.add_argument("--azure-endpoint", default=os.environ.get("AZURE_OPENAI_ENDPOINT"))
parser.add_argument("--api-version", default="2024-10-21", help="Azure API version (not the model name)")
parser.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint when not using Azure")
parser.add_argument("--api-key-env", default=None, help="default AZURE_OPENAI_KEY (Azure) or OPENAI_API_KEY")
parser.add_argument("--api-key-file", default=None)
parser.add_argument("--concurrency", type=int, default=10)
parser.add_argument("--api-call-limit", type=int, default=5000)
parser.add_argument("--max-tokens", type=int, default=300)
parser.add_argument("--max-tokens-param", default="max_tokens", choices=["max_tokens", "max_completion_tokens"])
parser.add_argument("--no-temperature", action="store_true", help="send no temperature (GPT-5-class models)")
parser.add_argument("--suffix", default="")
parser.add_argument("--quiet", action="store_true")
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

out = Path(args.pred).with_name(f"{Path(args.pred).stem}_eval_gpt{args.suffix}.json")
judge = OpenAIJudge(  # raises here, before anything else, when there is no API key
    args.model, base_url=args.base_url, azure_endpoint=None if args.base_url else args.azure_endpoint,
    api_version=args.api_version, api_key_env=args.api_key_env, api_key_file=args.api_key_file, with_images=True,
    concurrency=args.concurrency, api_call_limit=args.api_call_limit, cache_path=out.with_suffix(".cache.json"),
    max_tokens=args.max_tokens, max_tokens_param=args.max_tokens_param,
    temperature=None if args.no_temperature else 0.0,
)
report = judge_and_score(judge, args.pred, args.qa, args.class_names, annotations=args.anno_json,
                         image_root=args.image_root, output_path=out, progress=not args.quiet, title="ParaDLC-Bench")
print(format_markdown(report, "ParaDLC-Bench"))
print(f"report: {out} and {out.with_suffix('.md')}")
