"""Training stages end to end on tiny models: loss goes down, resume continues the same run, freezing, the
stage-1 start from separate checkpoints, the region stage from a Base model, LoRA, and DeepSpeed on 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, write_base_checkpoint
from safetensors.torch import load_file
from transformers import SiglipConfig, SiglipModel

from perceptiondlm import PerceptionDLM
from perceptiondlm.data.synthetic import write_region_split
from perceptiondlm.training.config import load_config
from perceptiondlm.training.model_setup import build_model, build_processor
from perceptiondlm.training.trainer import run_training

CHECKPOINT = FIXTURES / "pdmllm" / "checkpoint"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def region_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("regions")
    write_region_split(root, 6, seed=1)
    return root / "regions_datasets.yaml"


def write_config(path: Path, output: Path, data: Path, *, training: str = "", model: str = "", base: str = "") -> Path:
    path.write_text(f"""{base}
TRAINING_CONFIG:
  output_dir: {output}
  per_device_train_batch_size: 2
  learning_rate: 1.0e-3
  lr_scheduler_type: constant
  logging_steps: 1
  save_steps: 1000
  report_to: none
  dataloader_num_workers: 0
  remove_unused_columns: false
  seed: 0
{training}
DATA_CONFIG:
  data_path: {data}
PROCESSOR_CONFIG:
  processor_path: {CHECKPOINT}
MODEL_CONFIG:
  model_type: pdmllm
  pretrained_path: {CHECKPOINT}
  dtype: float32
{model}
""")
    return path


def losses(output: Path) -> list[float]:
    state = json.loads(next(output.glob("checkpoint-*/trainer_state.json")).read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_training_lowers_the_loss_and_saves_a_loadable_model(tmp_path, region_data):
    config = write_config(tmp_path / "c.yaml", tmp_path / "out", region_data,
                          training="  max_steps: 24\n  save_steps: 24")
    output = run_training(load_config(config))
    history = losses(output)
    assert len(history) == 24 and sum(history[-6:]) < sum(history[:6])
    model = PerceptionDLM.from_pretrained(output)
    assert model.processor is not None and (output / "training_config.yaml").is_file()


def final_weights(output: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output / "model.safetensors"))


def test_resume_continues_the_same_run(tmp_path, region_data):
    straight = write_config(tmp_path / "a.yaml", tmp_path / "a", region_data, training="  max_steps: 4")
    expected = final_weights(run_training(load_config(straight)))
    resumed = write_config(tmp_path / "b.yaml", tmp_path / "b", region_data,
                           training="  max_steps: 2\n  save_steps: 2")
    run_training(load_config(resumed))
    output = run_training(load_config(resumed, ["--TRAINING_CONFIG.max_steps", "4"]))  # finds checkpoint-2
    assert (output / "checkpoint-2").is_dir()
    got = final_weights(output)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5, msg=key)


def test_frozen_parts_stay_bit_identical(tmp_path, region_data):
    config = write_config(tmp_path / "c.yaml", tmp_path / "out", region_data, training="  max_steps: 2",
                          model="  language_model: {freeze: true}\n  vision_model: {freeze: true}")
    before = load_file(str(CHECKPOINT / "model.safetensors"))
    after = final_weights(run_training(load_config(config)))
    for key, value in after.items():
        if key.startswith(("language_model.", "vision_model.")):
            assert torch.equal(value, before[key]), key
    assert not torch.equal(after["mask_id_embedding.weight"], before["mask_id_embedding.weight"])


def test_lora_trains_adapters_and_saves_the_released_layout(tmp_path, region_data):
    config = write_config(
        tmp_path / "c.yaml", tmp_path / "out", region_data, training="  max_steps: 2",
        model="  language_model: {freeze: true}\n  lora:\n"
              "    - {target_modules: 'language_model\\..*\\.(q_proj|v_proj)', r: 4, alpha: 8}",
    )
    output = run_training(load_config(config))
    before = load_file(str(CHECKPOINT / "model.safetensors"))
    after = final_weights(output)
    assert set(after) <= set(before)  # adapters merged away
    changed = [k for k in after if k.startswith("language_model.") and not torch.equal(after[k], before[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    PerceptionDLM.from_pretrained(output)


def siglip_checkpoint(directory: Path) -> Path:
    """A tiny SigLIP (vision + text towers) saved as transformers saves `google/siglip2-*`."""
    vision = json.loads((CHECKPOINT / "config.json").read_text())["vision_model_config"]
    config = SiglipConfig(text_config=vision["text_config"], vision_config=vision["vision_config"])
    SiglipModel(config).save_pretrained(directory)
    return directory


def test_stage_one_loads_the_llada_and_siglip_weights(tmp_path):
    siglip = siglip_checkpoint(tmp_path / "siglip")
    config = write_config(
        tmp_path / "c.yaml", tmp_path / "out", tmp_path / "unused.yaml",
        model=f"  pretrained_path: null\n  model_type: dmllm\n  image_size: 64\n"
              f"  language_model: {{name_or_path: {FIXTURES / 'llada_hf'}, freeze: true}}\n"
              f"  vision_model: {{name_or_path: {siglip}, freeze: true}}",
    ).read_text().replace(f"processor_path: {CHECKPOINT}", f"processor_path: {FIXTURES / 'llada_hf'}")
    (tmp_path / "c.yaml").write_text(config)
    loaded = load_config(tmp_path / "c.yaml")
    processor = build_processor(loaded.model, loaded.processor)
    model = build_model(loaded.model, processor)
    llada = load_file(str(FIXTURES / "llada_hf" / "model.safetensors"))
    state = model.state_dict()
    for key, value in llada.items():  # the rows the tokenizer grew are new, the others are LLaDA's
        ours = state[f"language_model.{key}"]
        assert torch.equal(ours[: value.shape[0]], value), key
    vit = load_file(str(siglip / "model.safetensors"))
    assert torch.equal(state["vision_model.vision_model.embeddings.patch_embedding.weight"],
                       vit["vision_model.embeddings.patch_embedding.weight"])
    assert processor.special_tokens.image_context is not None and not hasattr(model, "mask_id_embedding")


def test_region_stage_starts_from_a_base_checkpoint(tmp_path, region_data):
    base = write_base_checkpoint(tmp_path / "base")
    weights = load_file(str(CHECKPOINT / "model.safetensors"))
    yaml_path = write_config(tmp_path / "c.yaml", tmp_path / "out", region_data,
                             model="  roi_double_scaling: false\n  mask_activity: coverage")
    text = yaml_path.read_text().replace(str(CHECKPOINT), str(base))
    yaml_path.write_text(text)
    loaded = load_config(yaml_path)
    model = build_model(loaded.model, build_processor(loaded.model, loaded.processor))
    assert model.config.model_type == "pdmllm" and not model.config.roi_double_scaling
    assert model.config.mask_activity == "coverage" and model.processor.mask_activity == "coverage"
    assert torch.equal(model.state_dict()["vision_abstractor.projection.0.weight"],
                       weights["vision_abstractor.projection.0.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_deepspeed_run_saves_a_loadable_checkpoint(tmp_path, region_data, stage):
    pytest.importorskip("deepspeed")
    config = write_config(
        tmp_path / "c.yaml", tmp_path / "out", region_data, training="  max_steps: 2\n  bf16: false",
        base=f"_BASE_: {REPO / 'configs' / 'envs' / f'zero{stage}.yaml'}",
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(29600 + stage), "-m", "perceptiondlm.training.train", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    model = PerceptionDLM.from_pretrained(tmp_path / "out")
    assert model.config.prompt_numbers == 6
