"""The `perceptiondlm` command. A table maps each subcommand to a function of this module; the function's
signature is the command line and its docstring the help. Errors a user can cause end with one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import re
import sys
import typing
from collections.abc import Callable
from pathlib import Path

from perceptiondlm.errors import PerceptionDLMError


def smoke(model_path: Path, prompt: str = "Describe the image in detail.", gen_length: int = 16,
          dtype: str = "float32") -> str:
    """Backbone smoke run: load a LLaDA checkpoint and fill a masked answer in one forward pass.

    Args:
        model_path: directory of a LLaDA checkpoint in the HF layout (config.json, safetensors, tokenizer)
        prompt: the user message
        gen_length: number of masked answer tokens to fill
        dtype: float32 or bfloat16
    """
    from perceptiondlm.smoke import backbone_smoke_run

    return str(backbone_smoke_run(model_path, prompt, gen_length, dtype))


def convert(model_path: Path, output_path: Path) -> str:
    """Convert an original GSAI-ML LLaDA checkpoint into the HF layout that LLaDAModelLM loads.

    Args:
        model_path: directory of the GSAI-ML checkpoint (config.json, shards + index, tokenizer files)
        output_path: directory to create; it must not exist yet (written atomically)
    """
    from perceptiondlm.models.loading import convert_gsai_checkpoint

    return f"Converted checkpoint written to {convert_gsai_checkpoint(model_path, output_path)}"


COMMANDS: dict[str, Callable[..., str]] = {"smoke": smoke, "convert": convert}


def _argument_help(doc: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(\w+): (.+)$", doc.split("Args:", 1)[-1], flags=re.MULTILINE))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perceptiondlm", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, function in COMMANDS.items():
        doc = inspect.getdoc(function) or ""
        sub = subparsers.add_parser(name, help=doc.split("\n")[0], description=doc.split("\n")[0])
        helps, types = _argument_help(doc), typing.get_type_hints(function)
        for param in inspect.signature(function).parameters.values():
            required = param.default is inspect.Parameter.empty
            sub.add_argument(
                "--" + param.name.replace("_", "-"), dest=param.name, type=types[param.name], required=required,
                default=None if required else param.default,
                help=helps.get(param.name, "") + ("" if required else f" (default: {param.default})"),
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = vars(build_parser().parse_args(argv))
    function = COMMANDS[args.pop("command")]
    try:
        print(function(**args))
    except PerceptionDLMError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
