"""Caption image regions with PerceptionDLM from the command line, with the published script's arguments.

    python demo/infer_pdmllm.py --image assets/demo.png --masks assets/demo_mask_0.png assets/demo_mask_1.png

`--model-path` defaults to the embedded tiny model. Unlike the published script, `--prompt` is used and the
captions print in the order the masks are given. Same as `perceptiondlm caption` (see its --help for more options).
"""

from __future__ import annotations

import argparse
import sys

from perceptiondlm.cli import main as cli_main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default=None, help="PerceptionDLM checkpoint (default: the embedded model)")
    parser.add_argument("--image", required=True, help="the image file")
    parser.add_argument("--masks", nargs="+", required=True, help="one binary mask image per region")
    parser.add_argument("--prompt", default=None, help="the question (default: the one the model was trained with)")
    parser.add_argument("--gen-length", type=int, default=None, help="answer tokens per region")
    parser.add_argument("--block-length", type=int, default=None,
                        help="accepted for compatibility: each region's slot is decoded as one block")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass when temperature > 0")
    parser.add_argument("--decoding", default="reference", help="reference or threshold")
    parser.add_argument("--save-overlay", default=None, help="write the image with the regions and captions here")
    args = parser.parse_args(argv)
    if args.block_length is not None and args.gen_length is not None and args.block_length != args.gen_length:
        parser.error("--block-length must equal --gen-length: each region's caption slot is decoded as one block")
    forwarded = ["caption", "--image", args.image, "--masks", *args.masks, "--temperature", str(args.temperature),
                 "--top-p", str(args.top_p), "--decoding", args.decoding]
    for flag, value in (("--model-path", args.model_path), ("--prompt", args.prompt),
                        ("--gen-length", args.gen_length), ("--steps", args.steps),
                        ("--save-overlay", args.save_overlay)):
        forwarded += [flag, str(value)] if value is not None else []
    return cli_main(forwarded)


if __name__ == "__main__":
    sys.exit(main())
