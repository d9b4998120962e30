"""VLMEvalKit model class for PerceptionDLM-Base (`PerceptionDLMBaseChat`, registered as "PerceptionDLM-Base"):
the reference adapter's prompts, per-dataset generation settings, tiling and answer post-processing (spec §5).
VLMEvalKit is imported only when the class is first used; without it a stand-in base with its interface is used."""

from __future__ import annotations

import functools
import logging
import math
import re
import string
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from perceptiondlm.errors import PerceptionDLMError

logger = logging.getLogger(__name__)

__all__ = ["MODEL_NAME", "DEFAULT_GENERATION", "generation_config", "tiles_per_image", "dataset_type",
           "build_prompt", "reorganize_prompt", "postprocess", "use_custom_prompt", "build_chat_class", "register"]

MODEL_NAME = "PerceptionDLM-Base"
DEFAULT_GENERATION: dict[str, Any] = {"steps": 64, "gen_length": 64, "block_length": 64, "temperature": 0.0,
                                      "cfg_scale": 0.0, "remasking": "low_confidence"}
# (lower-case dataset-name substrings, steps / gen_length / block_length), first match wins (spec §5).
_GENERATION_OVERRIDES = (
    (("mathvista_mini", "mathverse_mini_vision_only"), (256, 256, 1)),
    (("chartqa_test", "docvqa_val", "infovqa_val"), (128, 128, 128)),
    (("mmstar", "seedbench_img", "mmbench_dev_en", "mmmu_dev_val", "ai2d", "mmvp", "blink", "realworldqa",
      "cv-bench-2d", "hallusionbench", "vstarbench"), (2, 2, 2)),
)
MAX_TILES, TOTAL_MAX_TILES = 6, 64
_NO_CUSTOM_PROMPT = ("atomic_dataset", "electro_dataset", "mechanics_dataset", "optics_dataset", "quantum_dataset",
                     "statistics_dataset")
_NO_CUSTOM_PROMPT_SUBSTRINGS = ("MMDU", "MME-RealWorld", "WeMath_COT", "MMAlignBench")
_OCR_GROUP = ("OCRVQA", "TextVQA", "ChartQA", "DocVQA", "InfoVQA", "OCRBench", "DUDE", "SLIDEVQA", "GQA",
              "MMLongBench_DOC")
_MATH_GROUP = ("MathVista", "MathVision", "VCR", "MTVQA", "MMVet", "MathVerse", "MMDU", "CRPE", "MIA-Bench",
               "MM-Math", "DynaMath", "QSpatial", "WeMath", "LogicVista", "MM-IFEval", "ChartMimic")
# Dataset types of the published benchmarks, used when VLMEvalKit's own DATASET_TYPE is not importable.
_KNOWN_TYPES = {"Y/N": ("HallusionBench", "AMBER", "MME", "POPE"),
                "MCQ": ("MMStar", "SEEDBench", "MMBench", "MMMU", "AI2D", "MMVP", "BLINK", "RealWorldQA", "CV-Bench",
                        "VStarBench", "ScienceQA"),
                "VQA": _OCR_GROUP + _MATH_GROUP + ("LLaVABench", "WildVision")}
_VIDEO_HINTS = ("Video", "MVBench", "TempCompass", "MLVU", "LongVideoBench")


def _contains(names: Sequence[str], dataset: str | None) -> bool:
    return dataset is not None and any(name in dataset for name in names)


def generation_config(dataset: str | None, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Sampler settings for a dataset: the defaults (64/64/64, greedy) with the per-dataset overrides of §5."""
    config = dict(DEFAULT_GENERATION if defaults is None else defaults)
    lower = (dataset or "").lower()
    for names, (steps, gen_length, block_length) in _GENERATION_OVERRIDES:
        if dataset is not None and any(n in lower for n in names):
            config.update(steps=steps, gen_length=gen_length, block_length=block_length)
            break
    return config


def tiles_per_image(n_images: int, video: bool = False) -> int:
    """The reference's tile budget: max(1, min(6, 64 // n_images)) per image (1 for video frames)."""
    return max(1, min(1 if video else MAX_TILES, TOTAL_MAX_TILES // max(n_images, 1)))


@functools.cache
def _vlmeval_dataset_helpers() -> tuple[Any, Any] | None:
    try:
        from vlmeval.dataset import DATASET_MODALITY, DATASET_TYPE
    except Exception:  # noqa: BLE001 - VLMEvalKit absent or broken: use the built-in table
        return None
    return DATASET_TYPE, DATASET_MODALITY


def dataset_type(dataset: str | None, line: Mapping[str, Any] | None = None) -> str | None:
    """"Y/N" | "MCQ" | "VQA" | other VLMEvalKit types: VLMEvalKit's DATASET_TYPE when importable, else the table
    of the published benchmarks, else MCQ when the line has options A and B, else VQA."""
    if dataset is None:
        return None
    helpers = _vlmeval_dataset_helpers()
    if helpers is not None:
        return helpers[0](dataset)
    for kind, names in _KNOWN_TYPES.items():
        if _contains(names, dataset):
            return kind
    return "MCQ" if line is not None and _present(line, "A") and _present(line, "B") else "VQA"


def is_video(dataset: str | None) -> bool:
    helpers = _vlmeval_dataset_helpers()
    if helpers is not None and dataset is not None:
        return helpers[1](dataset) == "VIDEO"
    return _contains(_VIDEO_HINTS, dataset)


def use_custom_prompt(dataset: str | None) -> bool:
    """True where the reference builds its own prompt (all image datasets but a few multi-turn/physics ones)."""
    if dataset is None or dataset in _NO_CUSTOM_PROMPT or _contains(_NO_CUSTOM_PROMPT_SUBSTRINGS, dataset):
        return False
    return not is_video(dataset)


def _present(line: Mapping[str, Any], key: str) -> bool:
    if key not in line:
        return False
    value = line[key]
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _chinese(text: str) -> bool:
    return re.search(r"[\u4e00-\u9fff]", text) is not None


def _multi_choice_prompt(line: Mapping[str, Any]) -> str:
    question = str(line["question"])
    if _present(line, "hint"):
        question = f"{line['hint']}\n{question}"
    options = [(c, line[c]) for c in string.ascii_uppercase if _present(line, c)]
    for letter, text in options:
        question += f"\n{letter}. {text}"
    if options:
        return question + ("\n请直接回答选项字母。" if _chinese(question) else
                           "\nAnswer with the option's letter from the given choices directly.")
    return question + ("\n请直接回答问题。" if _chinese(question) else "\nAnswer the question directly.")


def build_prompt(line: Mapping[str, Any], dataset: str | None) -> str:
    """The reference's question text for a benchmark line (Y/N, MCQ and VQA groups of spec §5)."""
    kind = dataset_type(dataset, line)
    question = str(line["question"])
    if kind == "Y/N":
        if _contains(("HallusionBench", "AMBER"), dataset):
            return question + " Please answer yes or no. Answer the question using a single word or phrase."
        return question
    if kind == "MCQ":
        return _multi_choice_prompt(line)
    if kind == "VQA":
        if _contains(("LLaVABench", "WildVision"), dataset):
            return question + "\nAnswer this question in detail."
        if _contains(_OCR_GROUP, dataset):
            return question + "\n\nPlease reason step by step, and answer the question using a single word or phrase."
        if _contains(_MATH_GROUP, dataset):
            return question + "\n\n\nPlease reason step by step."  # the reference's CoT builder adds "\n"
        return question + "\nAnswer the question using a single word or phrase."
    return question


def reorganize_prompt(message: Sequence[Mapping[str, str]]) -> str:
    """Interleaved items -> one question with `<image>` placeholders: "<image>\\n" + texts for one image;
    "Image-k: <image>\\n" headers (and `<Image-k>` marks where images sat, dropped when contiguous) for several."""
    texts = [m["value"] for m in message if m["type"] == "text"]
    n_images = sum(m["type"] == "image" for m in message)
    if n_images == 1:
        return "<image>\n" + "\n".join(texts)
    prompt, k = "", 0
    for item in message:
        if item["type"] == "text":
            prompt += item["value"]
        elif item["type"] == "image":
            k += 1
            prompt += f"<Image-{k}>"
    prompt = prompt.replace("".join(f"<Image-{i + 1}>" for i in range(n_images)), "")
    return "".join(f"Image-{i + 1}: <image>\n" for i in range(n_images)) + prompt


def postprocess(response: str) -> str:
    """Cut at `<|eot_id|>`, drop `<|im_end|>`, normalise a short Yes/No, "X. ..." -> "X"."""
    response = response.split("<|eot_id|>")[0].strip().replace("<|im_end|>", "")
    if ("Yes" in response or "No" in response) and len(response) <= 4:
        return "Yes" if "Yes" in response else "No"
    if len(response) > 2 and response[1] == "." and response[0] in "ABCDEF":
        return response[0]
    return response


class StandInBaseModel:
    """The part of `vlmeval.vlm.base.BaseModel` the adapter relies on, for use without VLMEvalKit."""

    INTERLEAVE = False
    allowed_types = ["text", "image"]

    def use_custom_prompt(self, dataset: str | None) -> bool:
        return False

    def dump_image(self, line: Mapping[str, Any], dataset: str | None) -> list[str]:
        paths = line.get("image_path") if hasattr(line, "get") else None
        if paths is None:
            raise PerceptionDLMError("Without VLMEvalKit a benchmark line needs 'image_path' (a path or a list)")
        return [str(p) for p in paths] if isinstance(paths, (list, tuple)) else [str(paths)]

    def generate(self, message: str | Sequence[Any], dataset: str | None = None) -> str:
        items = [message] if isinstance(message, str) else list(message)
        items = [m if isinstance(m, Mapping) else
                 {"type": "image" if Path(str(m)).suffix.lower() in (".jpg", ".jpeg", ".png", ".webp") else "text",
                  "value": str(m)} for m in items]
        return self.generate_inner(items, dataset)  # type: ignore[attr-defined]

    def generate_inner(self, message: list[dict[str, str]], dataset: str | None = None) -> str:
        raise NotImplementedError


class _ChatMixin:
    """PerceptionDLM-Base behind VLMEvalKit's model interface; `model` may be a loaded model (or a stub)."""

    INSTALL_REQ = False
    INTERLEAVE = True

    def __init__(self, model_path: str | Path | None = None, *, model: Any = None, device: str | None = None,
                 dtype: str = "bfloat16", **generation: Any) -> None:
        super().__init__()  # VLMEvalKit's BaseModel sets its image-dump hook here
        if model is None:
            if model_path is None:
                raise PerceptionDLMError("PerceptionDLMBaseChat needs model_path (a PerceptionDLM-Base checkpoint)")
            from perceptiondlm.evaluation.regionbench import load_model

            model = load_model(model_path, device=device, dtype=dtype)
        self.model, self.model_path = model, model_path
        self.generation = {**DEFAULT_GENERATION, **generation}
        self._warned_tiles = False

    def use_custom_prompt(self, dataset: str | None) -> bool:
        return use_custom_prompt(dataset)

    def build_prompt(self, line: Mapping[str, Any], dataset: str | None = None) -> list[dict[str, str]]:
        if not self.use_custom_prompt(dataset):
            raise PerceptionDLMError(f"dataset {dataset!r} uses VLMEvalKit's own prompt")
        paths = self.dump_image(line, dataset)  # type: ignore[attr-defined]
        return [{"type": "text", "value": build_prompt(line, dataset)}, *({"type": "image", "value": p} for p in paths)]

    def generate_inner(self, message: list[dict[str, str]], dataset: str | None = None) -> str:
        paths = [m["value"] for m in message if m["type"] == "image"]
        question = reorganize_prompt(message)
        budget = tiles_per_image(len(paths), video=is_video(dataset))
        images: list[Any] = list(paths)
        if images and _contains(("MMMU",), dataset):  # the first image is upscaled 2x (bilinear)
            with Image.open(images[0]) as img:
                first = img.convert("RGB")
            images[0] = first.resize((first.width * 2, first.height * 2), Image.Resampling.BILINEAR)
        processor = getattr(self.model, "processor", None)
        if len(images) > 1 and budget > 1 and not self._warned_tiles:
            logger.warning("the processor gives each of several images 1 tile; the reference gave %d", budget)
            self._warned_tiles = True
        saved = getattr(processor, "max_sub_img", None)
        if processor is not None and len(images) == 1:
            processor.max_sub_img = budget
        try:
            image = None if not images else images[0] if len(images) == 1 else images
            answer = self.model.chat(image, question, **generation_config(dataset, self.generation))
        finally:
            if processor is not None and saved is not None:
                processor.max_sub_img = saved
        return postprocess(answer.text)


def _vlmeval_base() -> type:
    try:
        from vlmeval.vlm.base import BaseModel
    except Exception as err:  # noqa: BLE001 - absent or broken VLMEvalKit: the stand-in keeps the adapter usable
        logger.debug("VLMEvalKit not importable (%s); using the stand-in base class", err)
        return StandInBaseModel
    return BaseModel


def build_chat_class(base: type | None = None) -> type:
    """`PerceptionDLMBaseChat` on `base` (default: VLMEvalKit's BaseModel if importable, else the stand-in)."""
    base = base or _vlmeval_base()
    return type("PerceptionDLMBaseChat", (_ChatMixin, base), {"__module__": __name__, "__doc__": _ChatMixin.__doc__})


@functools.cache
def _chat_class() -> type:
    return build_chat_class()


def __getattr__(name: str) -> Any:
    if name == "PerceptionDLMBaseChat":  # built on first use, so importing this module never imports VLMEvalKit
        return _chat_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register(model_path: str | Path, name: str = MODEL_NAME) -> functools.partial:
    """Adds `name` -> partial(PerceptionDLMBaseChat, model_path=...) to `vlmeval.config.supported_VLM`."""
    try:
        from vlmeval.config import supported_VLM
    except ImportError as err:
        raise PerceptionDLMError("VLMEvalKit is not installed: pip install -e the VLMEvalKit repository") from err
    entry = functools.partial(_chat_class(), model_path=str(model_path))
    supported_VLM[name] = entry
    return entry
