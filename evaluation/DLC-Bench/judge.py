"""DLC-Bench judging: ask a text-only OpenAI-compatible judge (published: Llama-3.1-8B-Instruct served by vLLM)
every question, score with the published protocol, write <pred>_eval<suffix>.json/.md.

Example: vllm serve meta-llama/Llama-3.1-8B-Instruct --served-model-name llama3.1-8b --api-key sk-api --port 8007
    OPENAI_API_KEY=sk-api python evaluation/DLC-Bench/judge.py --pred outputs/dlc_outputs.json
"""

import argparse
import logging
from pathlib import Path

from perceptiondlm.evaluation.judges import OpenAIJudge, judge_and_score
from perceptiondlm.evaluation.scoring import format_markdown

HERE = Path(__file__).resolve().parent

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--pred", required=True, help="captions JSON written by infer.py")
parser.add_argument("--qa", default=HERE / "DLC-bench" / "qa.json")
parser.add_argument("--class-names", default=HERE / "DLC-bench" / "class_names.json")
parser.add_argument("--base-url", default="http://localhost:8007/v1")
parser.add_argument("--model", default="llama3.1-8b", help="the served model name")
parser.add_argument("--api-key-env", default="OPENAI_API_KEY", help="variable holding the server's --api-key")
parser.add_argument("--api-key-file", default=None)
parser.add_argument("--concurrency", type=int, default=10)
parser.add_argument("--api-call-limit", type=int, default=1000)
parser.add_argument("--default-prediction", default=None, help="caption used for regions without a prediction")
parser.add_argument("--suffix", default="")
parser.add_argument("--quiet", action="store_true")
args = parser.parse_args()
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

out = Path(args.pred).with_name(f"{Path(args.pred).stem}_eval{args.suffix}.json")
judge = OpenAIJudge(  # raises here, before anything else, when there is no API key
    args.model, base_url=args.base_url, api_key_env=args.api_key_env, api_key_file=args.api_key_file,
    concurrency=args.concurrency, api_call_limit=args.api_call_limit, cache_path=out.with_suffix(".cache.json"),
)
report = judge_and_score(judge, args.pred, args.qa, args.class_names, default_prediction=args.default_prediction,
                         output_path=out, progress=not args.quiet, title="DLC-Bench")
print(format_markdown(report, "DLC-Bench"))
print(f"report: {out} and {out.with_suffix('.md')}")
