"""Ask PerceptionDLM-Base about an image from the command line, with the published script's arguments.

    python demo/infer_dmllm.py --image assets/demo.png --prompt "What colour is the circle?"

`--model-path` defaults to the embedded tiny Base model. Same as `perceptiondlm chat`.
"""

from __future__ import annotations

import argparse
import sys

from perceptiondlm.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default=None, help="checkpoint (default: the embedded tiny Base model)")
    parser.add_argument("--image", required=True, help="the image file")
    parser.add_argument("--prompt", default="Describe the image in detail.", help="the question")
    parser.add_argument("--gen-length", type=int, default=128, help="answer tokens")
    parser.add_argument("--block-length", type=int, default=None, help="tokens per block (default: gen length)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: gen length)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus mass when temperature > 0")
    args = parser.parse_args(argv)
    forwarded = ["chat", "--image", args.image, "--prompt", args.prompt, "--gen-length", str(args.gen_length),
                 "--temperature", str(args.temperature)]
    for flag, value in (("--model-path", args.model_path), ("--block-length", args.block_length),
                        ("--steps", args.steps), ("--top-p", args.top_p)):
        forwarded += [flag, str(value)] if value is not None else []
    return cli_main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
