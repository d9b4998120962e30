"""Training configs: `_BASE_` inheritance, typed overrides, strict sections, and every shipped config."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import yaml

from perceptiondlm.errors import PerceptionDLMError
from perceptiondlm.training.config import (
    CONFIG_FILE,
    PerceptionDLMTrainingArguments,
    load_config,
    save_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STAGES = sorted(CONFIGS.glob("base/s*.yaml")) + [CONFIGS / "region" / "perceptiondlm.yaml"]
ENVS = sorted(CONFIGS.glob("envs/*.yaml"))
MINIMAL = {"DATA_CONFIG": {"data_path": "data.json"}, "MODEL_CONFIG": {"pretrained_path": "ckpt"}}
NO_DEEPSPEED = ["--TRAINING_CONFIG.deepspeed", "null"]


def write(path: Path, tree: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def minimal(**sections: dict) -> dict:
    tree = {key: dict(value) for key, value in MINIMAL.items()}
    for key, value in sections.items():
        tree.setdefault(key, {}).update(value)
    return tree


# --- inheritance -------------------------------------------------------------------------------------------


def test_bases_load_first_in_list_order_relative_to_the_including_file(tmp_path):
    write(tmp_path / "envs" / "one.yaml", minimal(
        TRAINING_CONFIG={"learning_rate": 0.1, "save_steps": 10, "report_to": ["wandb", "tensorboard"],
                         "deepspeed": {"zero_optimization": {"stage": 2, "overlap_comm": True}}}))
    write(tmp_path / "envs" / "two.yaml", {"TRAINING_CONFIG": {
        "learning_rate": 0.2, "report_to": ["none"], "deepspeed": {"zero_optimization": {"stage": 3}}}})
    stage = write(tmp_path / "stages" / "s.yaml", {
        "_BASE_": ["../envs/one.yaml", "../envs/two.yaml"], "TRAINING_CONFIG": {"save_steps": 30}})
    config = load_config(stage)
    assert config.sources == [tmp_path / "envs/one.yaml", tmp_path / "envs/two.yaml", stage]
    kwargs = config.training_kwargs
    assert kwargs["learning_rate"] == 0.2 and kwargs["save_steps"] == 30  # later wins
    assert kwargs["report_to"] == ["none"]  # lists replace
    assert kwargs["deepspeed"] == {"zero_optimization": {"stage": 3, "overlap_comm": True}}  # dicts merge


def test_a_single_base_string_and_nested_bases(tmp_path):
    write(tmp_path / "root.yaml", minimal(DATA_CONFIG={"max_length": 100, "seed": 1}))
    write(tmp_path / "mid" / "mid.yaml", {"_BASE_": "../root.yaml", "DATA_CONFIG": {"max_length": 200}})
    leaf = write(tmp_path / "mid" / "leaf" / "leaf.yaml", {"_BASE_": "../mid.yaml", "DATA_CONFIG": {"seed": 3}})
    data = load_config(leaf).data
    assert (data.max_length, data.seed, data.data_path) == (200, 3, "data.json")


def test_base_cycles_are_refused_naming_the_files(tmp_path):
    write(tmp_path / "a.yaml", {"_BASE_": "b.yaml", **MINIMAL})
    write(tmp_path / "b.yaml", {"_BASE_": "a.yaml"})
    with pytest.raises(PerceptionDLMError, match=r"cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "self.yaml", {"_BASE_": "./self.yaml"})
    with pytest.raises(PerceptionDLMError, match="cycle"):
        load_config(tmp_path / "self.yaml")


def test_a_missing_base_names_the_including_file(tmp_path):
    write(tmp_path / "s.yaml", {"_BASE_": "nope.yaml", **MINIMAL})
    with pytest.raises(PerceptionDLMError, match=r"nope\.yaml \(a _BASE_ of .*s\.yaml\)"):
        load_config(tmp_path / "s.yaml")


def test_unknown_top_level_keys_and_bad_yaml_are_refused(tmp_path):
    write(tmp_path / "s.yaml", {**MINIMAL, "_REMOVE_": ["x"]})
    with pytest.raises(PerceptionDLMError, match=r"s\.yaml: unknown top-level key '_REMOVE_'"):
        load_config(tmp_path / "s.yaml")
    (tmp_path / "bad.yaml").write_text("TRAINING_CONFIG: [unclosed\n")
    with pytest.raises(PerceptionDLMError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_exponent_floats_without_a_dot_are_floats(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("TRAINING_CONFIG: {learning_rate: 1e-3, adam_epsilon: 1.0e-8}\n"
                    "DATA_CONFIG: {data_path: d}\nMODEL_CONFIG: {pretrained_path: p}\n")
    assert load_config(path).training_kwargs == {"learning_rate": 1e-3, "adam_epsilon": 1e-8}


# --- overrides -----------------------------------------------------------------------------------------------


def test_overrides_are_typed_yaml_values(tmp_path):
    path = write(tmp_path / "s.yaml", minimal(MODEL_CONFIG={"language_model": {"name_or_path": "llada"}}))
    config = load_config(path, [
        "--TRAINING_CONFIG.learning_rate", "1e-4", "--TRAINING_CONFIG.bf16", "true",
        "--TRAINING_CONFIG.report_to=[wandb, tensorboard]", "--TRAINING_CONFIG.max_steps=7",
        "--MODEL_CONFIG.language_model.freeze", "true", "--MODEL_CONFIG.language_model.name_or_path", "null",
        "--DATA_CONFIG.question", "Describe it.", "--DATA_CONFIG.seed", "1", "--DATA_CONFIG.seed=2",
        "--MODEL_CONFIG.lora", "[{target_modules: 'language_model\\..*_proj', r: 4}]",
    ])
    assert config.training_kwargs == {"learning_rate": 1e-4, "bf16": True, "report_to": ["wandb", "tensorboard"],
                                      "max_steps": 7}
    assert config.model.language_model.freeze is True and config.model.language_model.name_or_path is None
    assert (config.data.question, config.data.seed) == ("Describe it.", 2)
    assert config.model.lora[0].r == 4 and config.model.lora[0].alpha == 8
    assert config.overrides[:2] == ["--TRAINING_CONFIG.learning_rate", "1e-4"]


@pytest.mark.parametrize(("overrides", "message"), [
    (["--launcher", "pytorch"], "SECTION one of"),
    (["--TRAINING_CONFIG", "{}"], "SECTION one of"),
    (["TRAINING_CONFIG.seed", "1"], "Expected an override"),
    (["--TRAINING_CONFIG.seed"], "has no value"),
    (["--TRAINING_CONFIG.seed", "--DATA_CONFIG.seed", "1"], "has no value"),
    (["--TRAINING_CONFIG.lerning_rate", "1"], r"TRAINING_CONFIG\.lerning_rate .*learning_rate.*the command line"),
    (["--MODEL_CONFIG.language_model.freeze", "2"], r"freeze must be true or false .*the command line"),
    (["--TRAINING_CONFIG.learning_rate", "fast"], r"learning_rate must be float, got 'fast'"),
])
def test_bad_overrides_are_refused(tmp_path, overrides, message):
    with pytest.raises(PerceptionDLMError, match=message):
        load_config(write(tmp_path / "s.yaml", MINIMAL), overrides)


# --- strict sections -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dotted", [
    "TRAINING_CONFIG.max_input_length",  # the reference silently set unknown TrainingArguments keys
    "TRAINING_CONFIG.warmup_ratio",  # gone in transformers 5: warmup_steps < 1 is the ratio
    "DATA_CONFIG.visual_prompt_nums",
    "PROCESSOR_CONFIG.chat_template",
    "MODEL_CONFIG.architecture",
    "MODEL_CONFIG.language_model.attn_implementation",
    "MODEL_CONFIG.vision_abstractor.projector",
])
def test_unknown_keys_are_refused_naming_key_and_file(tmp_path, dotted):
    tree = minimal()
    node = tree
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = 1
    write(tmp_path / "base.yaml", {"TRAINING_CONFIG": {"seed": 1}})
    path = write(tmp_path / "stage.yaml", {"_BASE_": "base.yaml", **tree})
    with pytest.raises(PerceptionDLMError, match=rf"^{dotted} is not a known key.*set in .*stage\.yaml\)$"):
        load_config(path)


def test_unknown_lora_key_names_the_list_item(tmp_path):
    path = write(tmp_path / "s.yaml", minimal(MODEL_CONFIG={"lora": [{"target_modules": "x", "lora_r": 8}]}))
    with pytest.raises(PerceptionDLMError, match=r"MODEL_CONFIG\.lora\[0\]\.lora_r is not a known key.*s\.yaml"):
        load_config(path)


@pytest.mark.parametrize(("sections", "message"), [
    ({"TRAINING_CONFIG": {"per_device_train_batch_size": 1.5}}, "per_device_train_batch_size must be int"),
    ({"TRAINING_CONFIG": {"bf16": "yes please"}}, "bf16 must be bool"),
    ({"TRAINING_CONFIG": {"lr_scheduler_type": "cosinus"}}, "lr_scheduler_type must be"),
    ({"DATA_CONFIG": {"max_length": "long"}}, "DATA_CONFIG.max_length must be int"),
    ({"DATA_CONFIG": {"max_length": 0}}, "DATA_CONFIG.max_length must be > 0"),
    ({"PROCESSOR_CONFIG": {"min_sub_img": 2, "max_sub_img": 1}}, "max_sub_img must be >= min_sub_img"),
    ({"PROCESSOR_CONFIG": {"mask_activity": "exact"}}, "PROCESSOR_CONFIG.mask_activity must be one of"),
    ({"MODEL_CONFIG": {"model_type": "llava"}}, "MODEL_CONFIG.model_type must be one of"),
    ({"MODEL_CONFIG": {"dtype": "fp8"}}, "MODEL_CONFIG.dtype must be one of"),
    ({"MODEL_CONFIG": {"language_model": {"freeze": 2}}}, "language_model.freeze must be true or false"),
    ({"MODEL_CONFIG": {"language_model": "llada"}}, "language_model must be a mapping"),
    ({"MODEL_CONFIG": {"roi_double_scaling": False}}, "roi_double_scaling is a region-model setting"),
    ({"MODEL_CONFIG": {"lora": [{"target_modules": "(", "r": 4}]}}, r"lora\[0\]\.target_modules is not a valid"),
    ({"MODEL_CONFIG": {"lora": {"target_modules": "x"}}}, "MODEL_CONFIG.lora must be"),
    ({"MODEL_CONFIG": {"model_type": "pdmllm", "mask_activity": "compat"},
      "PROCESSOR_CONFIG": {"mask_activity": "coverage"}}, "disagrees with MODEL_CONFIG.mask_activity"),
])
def test_wrong_types_and_values_are_refused(tmp_path, sections, message):
    with pytest.raises(PerceptionDLMError, match=message):
        load_config(write(tmp_path / "s.yaml", minimal(**sections)))


def test_required_keys_and_a_weight_source(tmp_path):
    with pytest.raises(PerceptionDLMError, match=r"DATA_CONFIG\.data_path is required"):
        load_config(write(tmp_path / "a.yaml", {"MODEL_CONFIG": {"pretrained_path": "p"}}))
    with pytest.raises(PerceptionDLMError, match="pretrained_path is needed unless"):
        load_config(write(tmp_path / "b.yaml", {"DATA_CONFIG": {"data_path": "d"},
                                                "MODEL_CONFIG": {"language_model": {"name_or_path": "llada"}}}))


def test_reference_style_freeze_and_defaults(tmp_path):
    path = write(tmp_path / "s.yaml", minimal(MODEL_CONFIG={
        "model_type": "pdmllm", "language_model": {"freeze": 1}, "vision_model": {"freeze": 0},
        "mask_id_embedding": None}))
    model = load_config(path).model
    assert model.language_model.freeze is True and model.vision_model.freeze is False
    assert model.mask_id_embedding.freeze is False and model.vision_abstractor.projection_type is None
    assert (model.prompt_numbers, model.roi_output_size, model.dtype, model.lora) == (6, 4, "bfloat16", None)
    assert model.roi_double_scaling is None  # keep the checkpoint's


# --- TrainingArguments, saving -------------------------------------------------------------------------------


def test_training_arguments_carry_the_per_module_settings(tmp_path):
    path = write(tmp_path / "s.yaml", minimal(TRAINING_CONFIG={
        "output_dir": str(tmp_path / "out"), "learning_rate": 4e-5, "vision_model_lr": 2e-6,
        "mask_id_embedding_lr": 1e-4, "length_grouping": False, "bf16": True, "tf32": True, "warmup_steps": 0.03}))
    config = load_config(path)
    args = config.training
    assert isinstance(args, PerceptionDLMTrainingArguments) and config.training is args  # built once
    assert (args.learning_rate, args.vision_model_lr, args.mask_id_embedding_lr) == (4e-5, 2e-6, 1e-4)
    assert args.language_model_lr is None and args.vision_abstractor_lr is None and args.length_grouping is False
    assert args.use_cpu is not torch.cuda.is_available()
    if not torch.cuda.is_available():
        assert args.tf32 is None  # a CUDA-only mode; TrainingArguments would refuse it on CPU
    assert load_config(path, ["--TRAINING_CONFIG.use_cpu", "true"]).training.use_cpu is True


def test_training_argument_errors_name_the_config(tmp_path):
    path = write(tmp_path / "s.yaml", minimal(TRAINING_CONFIG={"bf16": True, "fp16": True}))
    with pytest.raises(PerceptionDLMError, match=r"TRAINING_CONFIG of .*s\.yaml: .*fp16 and bf16"):
        _ = load_config(path).training
    path = write(tmp_path / "t.yaml", minimal(TRAINING_CONFIG={"language_model_lr": 0}))
    with pytest.raises(PerceptionDLMError, match="language_model_lr must be > 0"):
        _ = load_config(path).training


def test_save_config_writes_yaml_that_loads_back_to_the_same_config(tmp_path):
    overrides = ["--TRAINING_CONFIG.learning_rate", "3e-5", "--DATA_CONFIG.question", "'What is: this?'"]
    config = load_config(CONFIGS / "region" / "perceptiondlm.yaml", overrides)
    saved = save_config(config, tmp_path / "run")
    assert saved == tmp_path / "run" / CONFIG_FILE and sorted(p.name for p in saved.parent.iterdir()) == [CONFIG_FILE]
    assert saved.read_text().startswith("# Merged from ")
    plain = yaml.safe_load(saved.read_text())  # plain YAML, no _BASE_
    assert list(plain) == ["TRAINING_CONFIG", "DATA_CONFIG", "PROCESSOR_CONFIG", "MODEL_CONFIG"]
    again = load_config(saved)
    assert again.to_dict() == config.to_dict() and again.sources == [saved]
    assert (again.model, again.data, again.processor) == (config.model, config.data, config.processor)


# --- the shipped configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", STAGES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_shipped_stage_config_loads_and_builds_its_arguments(path, tmp_path):
    config = load_config(path)
    assert [p.name for p in config.sources] == ["default.yaml", "zero2_offload.yaml", path.name]
    ds = config.training_kwargs["deepspeed"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_force_ds_cpu_optimizer"] is False  # the Trainer's optimizer is a torch AdamW (pitfall 7)
    assert (CONFIGS.parent / config.data.data_path).is_file()  # the data-config YAML ships; the data does not
    args = load_config(path, [*NO_DEEPSPEED, "--TRAINING_CONFIG.output_dir", str(tmp_path)]).training
    assert args.bf16 and args.activation_checkpointing and args.num_train_epochs == 1
    assert args.lr_scheduler_type.value == "cosine" and args.warmup_steps == 0.03 and args.weight_decay == 0
    assert args.optim.value == "adamw_torch" and args.save_total_limit == 20 and args.logging_steps == 1


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_every_shipped_env_config_loads(path):
    config = load_config(path, ["--DATA_CONFIG.data_path", "d", "--MODEL_CONFIG.pretrained_path", "p"])
    ds = config.training_kwargs.get("deepspeed")
    if path.name == "default.yaml":
        assert ds is None and config.training_kwargs["dataloader_num_workers"] > 0
        return
    zero = ds["zero_optimization"]
    assert zero["stage"] == int(path.stem[4]) and {"offload_optimizer", "offload_param"} <= set(zero)
    assert (zero["offload_optimizer"]["device"] == "cpu") == path.stem.endswith("_offload")
    assert ds.get("zero_force_ds_cpu_optimizer", True) is not path.stem.endswith("_offload")
    assert all(ds[key] == "auto" for key in ("train_batch_size", "train_micro_batch_size_per_gpu",
                                             "gradient_accumulation_steps", "gradient_clipping"))


def test_env_files_swap_completely_when_layered(tmp_path):
    path = write(tmp_path / "zero3.yaml", {"_BASE_": [str(CONFIGS / "base" / "s2.yaml"),
                                                     str(CONFIGS / "envs" / "zero3.yaml")]})
    zero = load_config(path).training_kwargs["deepspeed"]["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
@pytest.mark.parametrize("env", ["zero2", "zero2_offload", "zero3", "zero3_offload"])
def test_deepspeed_accepts_the_env_configs(tmp_path, env):
    from deepspeed.runtime.config import DeepSpeedConfig

    bases = [str(CONFIGS / "base" / "s2.yaml"), str(CONFIGS / "envs" / f"{env}.yaml")]
    path = write(tmp_path / "c.yaml", {"_BASE_": bases, "TRAINING_CONFIG": {"output_dir": str(tmp_path)}})
    args = load_config(path).training
    ds = DeepSpeedConfig(dict(args.hf_deepspeed_config.config))
    assert ds.zero_config.stage == int(env[4]) and ds.gradient_accumulation_steps == 8


def test_published_stage_numbers():
    s1, s2, s3, s4 = (load_config(CONFIGS / "base" / f"s{i}.yaml") for i in range(1, 5))
    # Stage 1: projector only, from the LLaDA and SigLIP2 checkpoints themselves (spec §6 pitfall 1).
    assert s1.model.pretrained_path is None
    assert s1.model.language_model.name_or_path and s1.model.vision_model.name_or_path
    assert s1.model.language_model.freeze and s1.model.vision_model.freeze and not s1.model.vision_abstractor.freeze
    assert (s1.processor.min_sub_img, s1.processor.max_sub_img, s1.data.max_length) == (1, 1, 2048)
    global_batch = {}
    for i, stage in enumerate((s1, s2, s3, s4), start=1):
        kw = stage.training_kwargs
        global_batch[i] = kw["per_device_train_batch_size"] * kw["gradient_accumulation_steps"] * 32
        assert kw["output_dir"] == f"work_dirs/base/s{i}" and kw["report_to"] == "wandb"
        assert kw["learning_rate"] == (1e-3 if i == 1 else 4e-5) and kw["save_steps"] == (1000 if i == 1 else 3000)
        if i > 1:
            assert stage.model.pretrained_path == f"work_dirs/base/s{i - 1}"
            assert not stage.model.language_model.freeze and stage.model.vision_model.freeze
            assert (stage.processor.min_sub_img, stage.processor.max_sub_img, stage.data.max_length) == (1, 6, 4096)
    assert global_batch == {1: 1024, 2: 512, 3: 512, 4: 512}


def test_region_stage_numbers():
    config = load_config(CONFIGS / "region" / "perceptiondlm.yaml")
    model, kw = config.model, config.training_kwargs
    assert model.model_type == "pdmllm" and model.pretrained_path == "work_dirs/base/s4"
    assert not any(getattr(model, p).freeze for p in ("language_model", "vision_model", "vision_abstractor",
                                                      "mask_id_embedding"))
    assert (kw["learning_rate"], kw["per_device_train_batch_size"], kw["gradient_accumulation_steps"]) == (4e-5, 1, 4)
    assert (model.prompt_numbers, model.roi_output_size) == (6, 4)
    # Released behaviours, so that the config reproduces the released model.
    assert (model.roi_skips_first_tile, model.roi_double_scaling, model.mask_activity,
            model.prefix_attends_answers) == (True, True, "compat", True)
    corrected = load_config(CONFIGS / "region" / "perceptiondlm.yaml", [
        "--MODEL_CONFIG.roi_skips_first_tile", "false", "--MODEL_CONFIG.roi_double_scaling", "false",
        "--MODEL_CONFIG.mask_activity", "coverage", "--MODEL_CONFIG.prefix_attends_answers", "false"]).model
    assert (corrected.roi_double_scaling, corrected.mask_activity) == (False, "coverage")


def _sources(node, found):
    if isinstance(node, dict) and "data_file" in node:
        found.append(node)
    elif isinstance(node, dict):
        for child in node.values():
            _sources(child, found)
    return found


@pytest.mark.parametrize(("name", "count", "samples"), [
    ("base/data/s1_data.yaml", 1, 994_839), ("base/data/s2_data.yaml", 6, 14_030_103),
    ("base/data/s3_data.yaml", 10, None), ("base/data/s4_data.yaml", 4, None),
    ("region/data/perceptiondlm_data.yaml", 3, None),
])
def test_data_configs_list_the_published_sources(name, count, samples):
    sources = _sources(yaml.safe_load((CONFIGS / name).read_text()), [])
    assert len(sources) == count and all(isinstance(s["data_file"], str) for s in sources)
    if samples is not None:
        assert sum(s["num_samples"] for s in sources) == samples
