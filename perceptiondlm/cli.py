"""The `perceptiondlm` command. A table maps each subcommand to a function of this module; the function's
signature is the command line and its docstring the help. Errors a user can cause end with one line on
stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import inspect
import io
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


def caption(image: Path, masks: list[Path], model_path: Path | None = None, prompt: str | None = None,
            gen_length: int | None = None, steps: int | None = None, decoding: str = "reference",
            threshold: float = 0.9, temperature: float = 0.0, top_p: float = 1.0, save_overlay: Path | None = None
            ) -> str:
    """Caption image regions in parallel with PerceptionDLM; captions print in the order the masks are given.

    Args:
        model_path: a PerceptionDLM checkpoint directory (default: the embedded tiny model)
        image: the image file
        masks: one binary mask image per region (white = region), same size or aspect ratio as the image
        prompt: the question (default: the one the model was trained with)
        gen_length: answer tokens per region (default: 16 for the tiny model, whose captions fit 16, else 64)
        steps: denoising steps of the reference decoding (default: 16 for the tiny model, else 32)
        decoding: reference (the released sampler) or threshold (faster: commits confident tokens early)
        threshold: confidence threshold of the threshold decoding
        temperature: 0 = greedy
        top_p: nucleus sampling mass when temperature > 0
        save_overlay: write the image with each region coloured, numbered and captioned to this PNG file
    """
    from perceptiondlm.demo import default_options, overlay, resolve_model_path
    from perceptiondlm.io import write_bytes_atomic
    from perceptiondlm.models.perceptiondlm import PerceptionDLM
    from perceptiondlm.processing.masks import load_masks
    from perceptiondlm.processing.processor import load_image

    path, notice = resolve_model_path(model_path)
    if notice:
        logging.getLogger("perceptiondlm").warning(notice)
    picture = load_image(image, "image")
    regions = load_masks(masks, picture.size)  # every mask checked before the model loads
    model = PerceptionDLM.from_pretrained(path).eval()
    defaults = default_options(model)
    gen_length = defaults["gen_length"] if gen_length is None else gen_length
    steps = defaults["steps"] if steps is None else steps
    result = model.caption_regions(picture, regions, prompt=prompt, gen_length=gen_length, steps=steps,
                                   decoding=decoding, threshold=threshold, temperature=temperature, top_p=top_p)
    lines = [f"[Caption {i}] {text}" for i, text in enumerate(result.captions)]
    s = result.stats
    lines.append(f"NFE {s.nfe}, tokens {s.tokens}, TPF {s.tpf:.2f}, time {s.seconds:.2f} s "
                 f"(vision {s.seconds_vision:.2f}, prefill {s.seconds_prefill:.2f}, denoise {s.seconds_denoise:.2f})")
    if save_overlay is not None:
        buffer = io.BytesIO()
        overlay(picture, regions, result.captions).save(buffer, format="PNG")
        write_bytes_atomic(save_overlay, buffer.getvalue())
        lines.append(f"overlay saved to {save_overlay}")
    return "\n".join(lines)


def chat(image: Path, model_path: Path | None = None, prompt: str = "Describe the image in detail.",
         gen_length: int = 128, block_length: int | None = None, steps: int | None = None,
         temperature: float = 0.0, top_p: float | None = None) -> str:
    """Ask PerceptionDLM-Base a question about an image (block diffusion decoding).

    Args:
        model_path: a PerceptionDLM(-Base) checkpoint directory (default: the embedded tiny Base model)
        image: the image file
        prompt: the question
        gen_length: answer tokens
        block_length: tokens per semi-autoregressive block (default: gen_length)
        steps: denoising steps (default: gen_length)
        temperature: 0 = greedy
        top_p: nucleus sampling mass when temperature > 0
    """
    from perceptiondlm.demo import resolve_model_path
    from perceptiondlm.models.perceptiondlm import PerceptionDLM

    path, notice = resolve_model_path(model_path, base=True)
    if notice:
        logging.getLogger("perceptiondlm").warning(notice)
    model = PerceptionDLM.from_pretrained(path).eval()
    answer = model.chat(image, prompt, gen_length=gen_length, block_length=block_length, steps=steps,
                        temperature=temperature, top_p=top_p)
    s = answer.stats
    return f"{answer.text}\nNFE {s.nfe}, TPF {s.tpf:.2f}, time {s.seconds:.2f} s"


def demo(model_path: Path | None = None, server_name: str = "127.0.0.1", server_port: int = 7860,
         assets: Path | None = None, max_tokens: int = 512, play_delay: float = 0.25) -> str:
    """Start the web demo: draw or upload region masks and watch every caption denoise in parallel.

    Args:
        model_path: a PerceptionDLM checkpoint (default: the embedded tiny model)
        server_name: address to listen on (127.0.0.1 = this machine only)
        server_port: port to listen on
        assets: folder of presets, demo*.png with demo*_mask_*.png (default: the repository's assets/)
        max_tokens: most answer tokens per run (gen length x regions)
        play_delay: seconds between frames of the replay
    """
    from perceptiondlm.demo import ASSETS_DIR, serve

    serve(model_path, server_name=server_name, server_port=server_port, assets=assets or ASSETS_DIR,
          max_tokens=max_tokens, play_delay=play_delay)
    return "Demo stopped."


COMMANDS: dict[str, Callable[..., str]] = {
    "caption": caption, "chat": chat, "demo": demo, "smoke": smoke, "convert": convert,
}


def _argument_help(doc: str) -> dict[str, str]:
    return dict(re.findall(r"^\s+(\w+): (.+)$", doc.split("Args:", 1)[-1], flags=re.MULTILINE))


def _argument_type(annotation: object) -> tuple[type, bool]:
    """(type of one value, takes several values) from an annotation such as `int`, `int | None`, `list[Path]`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return args[0], True
    return (args[0] if args else annotation), False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="perceptiondlm", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    subparsers.add_parser("train", help="Train a stage from a YAML config (see `perceptiondlm train --help`).")
    for name, function in COMMANDS.items():
        doc = inspect.getdoc(function) or ""
        sub = subparsers.add_parser(name, help=doc.split("\n")[0], description=doc.split("\n")[0])
        helps, types = _argument_help(doc), typing.get_type_hints(function)
        for param in inspect.signature(function).parameters.values():
            required = param.default is inspect.Parameter.empty
            kind, many = _argument_type(types[param.name])
            sub.add_argument(
                "--" + param.name.replace("_", "-"), dest=param.name, type=kind, required=required,
                nargs="+" if many else None, default=None if required else param.default,
                help=helps.get(param.name, "") + ("" if required else f" (default: {param.default})"),
            )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # training takes free-form --SECTION.key overrides: its own parser
        from perceptiondlm.training.train import main as train_main

        return train_main(argv[1:])
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
