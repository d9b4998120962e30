"""Entry point of a training stage: `perceptiondlm train --config CONFIG [--SECTION.key value ...]`
(also `python -m perceptiondlm.training.train ...`; `scripts/train.sh` launches it on many GPUs/nodes)."""

from __future__ import annotations

import argparse
import logging
import sys

from perceptiondlm.errors import PerceptionDLMError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="perceptiondlm train",
        description="Train PerceptionDLM(-Base) from a YAML config; any --SECTION.key value pair overrides "
        "the config (SECTION = TRAINING_CONFIG, DATA_CONFIG, PROCESSOR_CONFIG or MODEL_CONFIG).",
    )
    parser.add_argument("--config", required=True, help="the stage's YAML config, e.g. configs/base/s1.yaml")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from perceptiondlm.training.config import load_config
        from perceptiondlm.training.trainer import run_training

        output = run_training(load_config(args.config, overrides))
    except PerceptionDLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"model saved to {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
