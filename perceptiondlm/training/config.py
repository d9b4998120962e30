"""Training configs: YAML files with `_BASE_` inheritance and `--SECTION.key value` overrides, checked into one
typed dataclass per section (spec §1.1, §1.2). `_BASE_` paths are relative to the file that names them; every
other path in a config (data, checkpoints, output) is relative to the working directory.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import logging
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Union

import torch
import yaml
from transformers import TrainingArguments

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.io import write_text_atomic
from perceptiondlm.models.configuration import MASK_ACTIVITY_MODES

logger = logging.getLogger(__name__)

CONFIG_FILE = "training_config.yaml"  # the merged config, written into the output directory
BASE_KEY = "_BASE_"
SECTIONS = ("TRAINING_CONFIG", "DATA_CONFIG", "PROCESSOR_CONFIG", "MODEL_CONFIG")
COMMAND_LINE = "the command line"
MODEL_TYPES = ("dmllm", "pdmllm")
DTYPES = ("bfloat16", "float16", "float32")
PART_LRS = ("language_model_lr", "vision_model_lr", "vision_abstractor_lr", "mask_id_embedding_lr")
REGION_FLAGS = ("roi_skips_first_tile", "roi_double_scaling", "mask_activity", "prefix_attends_answers")


class _Invalid(ValueError):
    """(key, message) of a bad value found by a section's `__post_init__`; the loader adds the path and file."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise _Invalid(key, message)


def _lr(part: str) -> Any:
    return field(default=None, metadata={"help": f"Learning rate of {part}; None = learning_rate."})


@dataclass
class PerceptionDLMTrainingArguments(TrainingArguments):
    """`TRAINING_CONFIG`: the transformers `TrainingArguments` plus the settings of `PerceptionDLMTrainer`."""

    # One optimizer group per model part (spec §2.1), each with its own learning rate.
    language_model_lr: float | None = _lr("the LLaDA backbone")
    vision_model_lr: float | None = _lr("the SigLIP2 vision tower")
    vision_abstractor_lr: float | None = _lr("the MLP projector")
    mask_id_embedding_lr: float | None = _lr("the region mask-id embedding")
    length_grouping: bool = field(default=True, metadata={"help": "Group batches by sequence length (less padding)."})

    def __post_init__(self) -> None:
        if bad := [n for n in PART_LRS if getattr(self, n) is not None and getattr(self, n) <= 0]:
            raise ValueError(f"{bad[0]} must be > 0 (or null for learning_rate)")
        super().__post_init__()


@dataclass
class DataConfig:
    """`DATA_CONFIG`: what a stage trains on (spec §1.5, §1.6, §3)."""

    # A data-config YAML listing the sources (configs/*/data/*.yaml), or one data file / parquet folder.
    data_path: str
    max_length: int = 4096  # tokens per sample after image-token expansion; longer samples are truncated
    # Most regions per region sample; None = MODEL_CONFIG.prompt_numbers (the reference's never exceeded 4, §6.4).
    max_regions_per_sample: int | None = None
    image_root: str | None = None  # directory that relative image paths of the records start from
    question: str | None = None  # region instruction; None = the trained "Describe each masked region in detail."
    caption_length: int | None = None  # pad region captions with <|eot_id|> to this many tokens (None = no padding)
    # Pad chat answers (their closing <|eot_id|> included) with <|eot_id|> to this many tokens, in the loss: LLaDA's
    # SFT EOS padding, so a short answer ends inside a longer generation window (None = no padding, as the reference).
    answer_length: int | None = None
    seed: int = 0  # source subsampling and region grouping

    def __post_init__(self) -> None:
        _require(self.max_length > 0, "max_length", "must be > 0")
        _require(self.max_regions_per_sample is None or self.max_regions_per_sample >= 1,
                 "max_regions_per_sample", "must be >= 1 (or null for prompt_numbers)")
        _require(self.answer_length is None or self.answer_length >= 1, "answer_length", "must be >= 1 (or null)")
        _require(self.caption_length is None or self.caption_length >= 1, "caption_length", "must be >= 1 (or null)")


@dataclass
class ProcessorConfig:
    """`PROCESSOR_CONFIG`: tokenizer and image tiling."""

    # Directory with the tokenizer (+ processor) files; None = MODEL_CONFIG.pretrained_path, else
    # language_model.name_or_path (LLaDA's tokenizer; the image and caption-slot tokens are added to it).
    processor_path: str | None = None
    min_sub_img: int = 1  # fewest 512-px tiles per image (spec §3.2)
    max_sub_img: int = 6  # most tiles per image; a thumbnail is added whenever there is more than one
    mask_activity: str | None = None  # which ViT patches a region marks; None = MODEL_CONFIG's / the checkpoint's

    def __post_init__(self) -> None:
        _require(self.min_sub_img >= 1, "min_sub_img", "must be >= 1")
        _require(self.max_sub_img >= self.min_sub_img, "max_sub_img", f"must be >= min_sub_img ({self.min_sub_img})")
        _require(self.mask_activity in (None, *MASK_ACTIVITY_MODES), "mask_activity",
                 f"must be one of {MASK_ACTIVITY_MODES} or null, got {self.mask_activity!r}")


@dataclass
class PartConfig:
    """One part of the model: where its weights come from and whether it trains."""

    # A checkpoint directory for this part alone (LLaDA for the LM, SigLIP2 for the ViT in stage 1); it replaces
    # that part of pretrained_path. None = the part comes from pretrained_path, or starts fresh if that lacks it.
    name_or_path: str | None = None
    freeze: bool | int = False  # no gradient for this part; the reference's 0/1 are read as false/true

    def __post_init__(self) -> None:
        _require(self.freeze in (0, 1), "freeze", f"must be true or false (or 0/1), got {self.freeze!r}")
        self.freeze = bool(self.freeze)


@dataclass
class ProjectorConfig(PartConfig):
    """The vision abstractor: pixel-shuffled ViT features -> LM embeddings."""

    projection_type: str | None = None  # "mlp{N}x_gelu"; None = the checkpoint's, "mlp2x_gelu" for a new one


@dataclass
class LoraConfig:
    """LoRA adapters on the nn.Linear layers whose full module name matches `target_modules` (spec §2.5)."""

    target_modules: str  # a regex fully matched against module names, e.g. "language_model\..*\.(q|v)_proj"
    r: int = 8  # adapter rank (PEFT's defaults)
    alpha: float = 8  # the update is scaled by alpha / r
    dropout: float = 0.0

    def __post_init__(self) -> None:
        try:
            re.compile(self.target_modules)
        except re.error as err:
            raise _Invalid("target_modules", f"is not a valid regex: {err}") from err
        _require(self.r >= 1, "r", "must be >= 1")
        _require(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


@dataclass
class ModelConfig:
    """`MODEL_CONFIG`: which model, where it starts from, what trains. The image settings are those of the
    model's config.json (spec §0) and apply when a model is assembled from its parts."""

    model_type: str = "dmllm"  # "dmllm" = PerceptionDLM-Base, "pdmllm" = the region captioner
    pretrained_path: str | None = None  # a PerceptionDLM(-Base) checkpoint directory to start from
    language_model: PartConfig = field(default_factory=PartConfig)
    vision_model: PartConfig = field(default_factory=PartConfig)
    vision_abstractor: ProjectorConfig = field(default_factory=ProjectorConfig)
    mask_id_embedding: PartConfig = field(default_factory=PartConfig)  # region models only
    dtype: str = "bfloat16"  # weights dtype (the reference cast the whole model to bf16)
    prompt_numbers: int = 6  # region slots per sequence (mask-id embeddings)
    roi_output_size: int = 4  # RoI tokens per region: a roi_output_size² grid
    image_size: int = 512  # tile side in pixels
    patch_size: int = 16
    downsample_ratio: float = 0.5  # pixel shuffle: 2x2 patches -> one LM token
    vision_select_layer: int = -2
    # Reference behaviours the released weights were trained with (docs/compatibility.md, spec §3.4, §3.6);
    # None = keep the loaded checkpoint's value (a Base checkpoint has the released ones).
    roi_skips_first_tile: bool | None = None
    roi_double_scaling: bool | None = None
    mask_activity: str | None = None  # "compat" | "coverage"
    prefix_attends_answers: bool | None = None
    lora: list[LoraConfig] | None = None

    def __post_init__(self) -> None:
        _require(self.model_type in MODEL_TYPES, "model_type", f"must be one of {MODEL_TYPES}, got {self.model_type!r}")
        _require(self.dtype in DTYPES, "dtype", f"must be one of {DTYPES}, got {self.dtype!r}")
        for key in ("prompt_numbers", "roi_output_size", "image_size", "patch_size"):
            _require(getattr(self, key) >= 1, key, "must be >= 1")
        _require(self.image_size % self.patch_size == 0, "image_size",
                 f"{self.image_size} is not a multiple of patch_size {self.patch_size}")
        _require(self.mask_activity in (None, *MASK_ACTIVITY_MODES), "mask_activity",
                 f"must be one of {MASK_ACTIVITY_MODES} or null, got {self.mask_activity!r}")
        for flag in REGION_FLAGS if self.model_type == "dmllm" else ():
            _require(getattr(self, flag) is None, flag, "is a region-model setting, but model_type is dmllm")
        parts = self.language_model.name_or_path and self.vision_model.name_or_path
        _require(bool(self.pretrained_path or parts), "pretrained_path", "is needed unless language_model.name_or_path "
                 "(LLaDA) and vision_model.name_or_path (SigLIP2) are both set: the model must start from weights")


_CHECKS = {type(None): lambda v: v is None, bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str),
           int: lambda v: isinstance(v, int) and not isinstance(v, bool), list: lambda v: isinstance(v, list),
           float: lambda v: isinstance(v, int | float) and not isinstance(v, bool), dict: lambda v: isinstance(v, dict)}


def _type_ok(value: Any, hint: Any) -> bool:
    """Cheap type check of a YAML value; hints it cannot judge (Any, library objects) are left to the class."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if isinstance(value, str) and (enums := [a for a in args if isinstance(a, type) and issubclass(a, Enum)]):
            return any(value in {m.value for m in enum} for enum in enums)  # `Enum | str` takes only its values
        return any(_type_ok(value, a) for a in args)
    if isinstance(hint, type) and issubclass(hint, Enum):
        return value in {m.value for m in hint}
    check = _CHECKS.get(origin or hint)
    if check is None or not check(value):
        return check is None
    return origin is not list or all(_type_ok(v, args[0]) for v in value)


@dataclass
class _Checker:
    """Turns the merged tree into dataclasses; errors name the dotted key and the file that set it."""

    layers: list[tuple[str, dict]]  # (file or COMMAND_LINE, its own keys), in merge order

    def origin(self, dotted: str) -> str:
        for name, tree in reversed(self.layers):
            node: Any = tree
            for key in re.sub(r"\[\d+\]", "", dotted).split("."):
                if not isinstance(node, dict) or key not in node:
                    break
                node = node[key]
            else:
                return name
        return ", ".join(dict.fromkeys(name for name, _ in self.layers))

    def error(self, dotted: str, message: str) -> PerceptionDLMError:
        return PerceptionDLMError(f"{dotted} {message} (set in {self.origin(dotted)})")

    def kwargs(self, cls: type, raw: Any, where: str) -> dict[str, Any]:
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise self.error(where, f"must be a mapping, got {raw!r}")
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        if unknown := [key for key in raw if key not in fields]:
            close = difflib.get_close_matches(str(unknown[0]), fields, n=3)
            known = f"did you mean {', '.join(close)}?" if close else f"valid keys: {', '.join(fields)}"
            if cls is PerceptionDLMTrainingArguments and not close:
                known = "it is neither a transformers TrainingArguments field nor a PerceptionDLM one"
            raise self.error(f"{where}.{unknown[0]}", f"is not a known key; {known}")
        if missing := [n for n, f in fields.items() if n not in raw
                       and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]:
            raise PerceptionDLMError(f"{where}.{missing[0]} is required (in {self.origin(where)})")
        return {key: self.value(value, hints[key], f"{where}.{key}") for key, value in raw.items()}

    def build(self, cls: type, raw: Any, where: str) -> Any:
        try:
            return cls(**self.kwargs(cls, raw, where))
        except _Invalid as err:
            raise self.error(f"{where}.{err.args[0]}", err.args[1]) from None

    def value(self, value: Any, hint: Any, where: str) -> Any:
        if dataclasses.is_dataclass(hint):  # a nested section; null = all defaults
            return self.build(hint, value, where)
        lists = [typing.get_args(a)[0] for a in (hint, *typing.get_args(hint)) if typing.get_origin(a) is list]
        if lists and dataclasses.is_dataclass(item := lists[0]) and isinstance(value, list):
            return [self.build(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not _type_ok(value, hint):
            raise self.error(where, f"must be {getattr(hint, '__name__', hint)}, got {value!r}")
        return value


@dataclass
class TrainConfig:
    """A loaded, checked training config: the four sections and where they came from."""

    training_kwargs: dict[str, Any]  # TRAINING_CONFIG as written (checked); `training` builds the arguments
    data: DataConfig
    processor: ProcessorConfig
    model: ModelConfig
    sources: list[Path]  # the YAML files merged into it, bases first
    overrides: list[str] = field(default_factory=list)  # the command-line overrides applied on top

    @functools.cached_property
    def training(self) -> PerceptionDLMTrainingArguments:
        """The training arguments, built on first use: like any `TrainingArguments` this sets up the device,
        the process group under torchrun and the DeepSpeed state, so build it before the model (ZeRO-3).
        Without CUDA, `use_cpu` defaults to true and `tf32` (a CUDA matmul mode) is dropped."""
        kwargs = copy.deepcopy(self.training_kwargs)
        kwargs.setdefault("use_cpu", not torch.cuda.is_available())
        if kwargs.get("tf32") and not torch.cuda.is_available():
            logger.info("no CUDA device: TRAINING_CONFIG.tf32 is ignored")
            kwargs["tf32"] = None
        try:
            return PerceptionDLMTrainingArguments(**kwargs)
        except (ImportError, ValueError, TypeError) as err:  # ImportError: DeepSpeed is not installed
            hint = " (install the `train` extra, or --TRAINING_CONFIG.deepspeed null)" * isinstance(err, ImportError)
            raise PerceptionDLMError(f"TRAINING_CONFIG of {self.sources[-1]}: {err}{hint}") from err

    def to_dict(self) -> dict[str, Any]:
        """The four sections as plain YAML data; `load_config` of this data gives an equal config."""
        return {"TRAINING_CONFIG": copy.deepcopy(self.training_kwargs), "DATA_CONFIG": dataclasses.asdict(self.data),
                "PROCESSOR_CONFIG": dataclasses.asdict(self.processor), "MODEL_CONFIG": dataclasses.asdict(self.model)}


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-4` as a float (YAML 1.1 wants `1.0e-4`, else it is a string)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _parse(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise PerceptionDLMError(f"{where} is not valid YAML: {err}") from err


def _merge(base: dict, top: dict) -> dict:
    """Deep merge: dicts merge key by key, anything else in `top` replaces."""
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge(out[key], value) if both else copy.deepcopy(value)
    return out


def _read_layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """(file, its own keys) for `path` and, before it, all its bases, recursively."""
    if any(path.resolve() == p.resolve() for p in chain):
        raise PerceptionDLMError(f"_BASE_ cycle: {' -> '.join(str(p) for p in (*chain, path))}")
    if not path.is_file():
        raise PerceptionDLMError(f"Config file not found: {path}" + (f" (a _BASE_ of {chain[-1]})" if chain else ""))
    tree = _parse(path.read_text(), str(path)) or {}
    if not isinstance(tree, dict):
        raise PerceptionDLMError(f"{path} must be a mapping of sections, got {type(tree).__name__}")
    bases = tree.pop(BASE_KEY, None) or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise PerceptionDLMError(f"{path}: _BASE_ must be a path or a list of paths, got {bases!r}")
    if unknown := [key for key in tree if key not in SECTIONS]:
        raise PerceptionDLMError(f"{path}: unknown top-level key {unknown[0]!r}; a config has _BASE_ and {SECTIONS}")
    layers = []
    for base in bases:
        layers += _read_layers(Path(os.path.normpath(path.parent / base)), (*chain, path))
    layers.append((str(path), {k: {} if v is None else v for k, v in tree.items()}))
    return layers


def _override_layer(overrides: Sequence[str]) -> dict:
    """`--SECTION.a.b value` / `--SECTION.a.b=value` pairs as one nested dict; values are YAML."""
    tree: dict = {}
    tokens = list(overrides)
    while tokens:
        flag = tokens.pop(0)
        name, eq, text = flag.removeprefix("--").partition("=")
        if not flag.startswith("--"):
            raise PerceptionDLMError(f"Expected an override --SECTION.key value, got {flag!r}")
        if not eq:
            if not tokens or tokens[0].startswith("--"):
                raise PerceptionDLMError(f"Override {flag} has no value (write null for None)")
            text = tokens.pop(0)
        keys = name.split(".")
        if keys[0] not in SECTIONS or len(keys) < 2 or not all(keys):
            raise PerceptionDLMError(f"Override {flag}: expected --SECTION.key with SECTION one of {SECTIONS}")
        value = _parse(text, f"the value of {flag}")
        tree = _merge(tree, functools.reduce(lambda inner, key: {key: inner}, reversed(keys), value))
    return tree


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Reads a training config: its `_BASE_` files first (in list order, recursively), its own keys merged on
    top, then `overrides` (`["--TRAINING_CONFIG.learning_rate", "1e-4", "--MODEL_CONFIG.lora=null", ...]`,
    values parsed as YAML). Every section is checked against its dataclass; an unknown key, a wrong type or
    a bad value raises `PerceptionDLMError` naming the dotted key and the file (or the command line) that set
    it. Files the config points to (data, checkpoints) are not opened here."""
    layers = _read_layers(Path(os.path.normpath(path)))
    if overrides:
        layers.append((COMMAND_LINE, _override_layer(overrides)))
    tree = functools.reduce(_merge, (layer for _, layer in layers), {})
    check = _Checker(layers)
    config = TrainConfig(
        training_kwargs=check.kwargs(PerceptionDLMTrainingArguments, tree.get("TRAINING_CONFIG"), "TRAINING_CONFIG"),
        data=check.build(DataConfig, tree.get("DATA_CONFIG"), "DATA_CONFIG"),
        processor=check.build(ProcessorConfig, tree.get("PROCESSOR_CONFIG"), "PROCESSOR_CONFIG"),
        model=check.build(ModelConfig, tree.get("MODEL_CONFIG"), "MODEL_CONFIG"),
        sources=[Path(name) for name in dict.fromkeys(name for name, _ in layers) if name != COMMAND_LINE],
        overrides=list(overrides),
    )
    model_mode, processor_mode = config.model.mask_activity, config.processor.mask_activity
    if None not in (model_mode, processor_mode) and model_mode != processor_mode:
        raise check.error("PROCESSOR_CONFIG.mask_activity",
                          f"({processor_mode!r}) disagrees with MODEL_CONFIG.mask_activity ({model_mode!r})")
    return config


def save_config(config: TrainConfig, output_dir: str | Path) -> Path:
    """Writes the merged config to `<output_dir>/training_config.yaml` (atomically) and returns its path;
    `load_config` of that file gives the same sections."""
    overrides = " ".join(config.overrides).replace("\n", " ")
    header = f"# Merged from {', '.join(map(str, config.sources))}" + (f"; overrides: {overrides}" if overrides else "")
    text = header + "\n" + yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)
    path = Path(output_dir) / CONFIG_FILE
    write_text_atomic(path, text)
    return path
