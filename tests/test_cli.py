"""The `perceptiondlm` command line: the smoke run and clean one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES
from PIL import Image

from perceptiondlm.cli import main
from perceptiondlm.data.synthetic import make_scene, parse_caption
from perceptiondlm.demo import DEFAULT_MODEL_PATH
from perceptiondlm.smoke import backbone_smoke_run


def test_smoke_run_fills_the_masked_answer():
    report = backbone_smoke_run(FIXTURES / "llada_hf", "Describe the image.", gen_length=6)
    assert report.masked_tokens == 6 and report.prompt_tokens > 20
    assert report.parameters == 123_200
    assert "<|mdm_mask|>" not in report.filled_text


def test_cli_prints_the_report(capsys):
    assert main(["smoke", "--model-path", str(FIXTURES / "llada_hf"), "--gen-length", "4"]) == 0
    assert "one forward pass" in capsys.readouterr().out


def test_cli_errors_are_one_line_with_exit_code_2(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "perceptiondlm.cli", "smoke", "--model-path", str(tmp_path / "missing")],
        capture_output=True, text=True, check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: Checkpoint directory not found")
    assert "Traceback" not in done.stderr
    assert main(["smoke", "--model-path", str(FIXTURES / "llada_hf"), "--gen-length", "0"]) == 2


def test_caption_command_prints_one_caption_per_mask_in_order(capsys):
    inputs = FIXTURES / "pdmllm" / "inputs"
    argv = ["caption", "--model-path", str(FIXTURES / "pdmllm" / "checkpoint"), "--image", str(inputs / "image.png"),
            "--masks", str(inputs / "mask_a.png"), str(inputs / "mask_c.png"), "--gen-length", "4", "--steps", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in out[:2]] == ["[Caption 0", "[Caption 1"]
    assert out[2].startswith("NFE 4, tokens 8, TPF 2.00")
    assert main([*argv[:5], "--masks", str(inputs / "nothing.png")]) == 2


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "perceptiondlm.cli", *args], capture_output=True, text=True,
                          check=False)


def test_caption_bad_inputs_get_one_line_errors_and_exit_code_2(tmp_path):
    inputs = FIXTURES / "pdmllm" / "inputs"
    image, mask = inputs / "image.png", inputs / "mask_a.png"
    width, height = Image.open(image).size
    not_an_image = tmp_path / "mask.png"
    not_an_image.write_text("not a picture")
    Image.new("L", (width + 7, height + 3), 255).save(other_aspect := tmp_path / "other_aspect.png")
    Image.new("L", (width, height), 0).save(empty := tmp_path / "empty.png")
    base = ["caption", "--model-path", str(FIXTURES / "pdmllm" / "checkpoint"), "--gen-length", "4", "--steps", "4"]
    cases = {
        "image file not found": [*base, "--image", str(tmp_path / "missing.png"), "--masks", str(mask)],
        "cannot read mask": [*base, "--image", str(image), "--masks", str(not_an_image)],
        "different": [*base, "--image", str(image), "--masks", str(other_aspect)],
        "the mask is empty": [*base, "--image", str(image), "--masks", str(mask), str(empty)],
        "--masks": [*base, "--image", str(image)],  # no masks: argparse's usage error
    }
    for expected, argv in cases.items():
        done = _run_cli(*argv)
        assert done.returncode == 2, (expected, done.stderr)
        assert "Traceback" not in done.stderr and expected in done.stderr.strip().splitlines()[-1], done.stderr


def test_caption_resizes_a_same_aspect_mask_with_a_warning_and_saves_an_overlay(tmp_path):
    inputs = FIXTURES / "pdmllm" / "inputs"
    image = inputs / "image.png"
    width, height = Image.open(image).size
    Image.open(inputs / "mask_a.png").resize((width * 2, height * 2), Image.Resampling.NEAREST).save(
        big := tmp_path / "big_mask.png")
    done = _run_cli("caption", "--model-path", str(FIXTURES / "pdmllm" / "checkpoint"), "--image", str(image),
                    "--masks", str(big), str(inputs / "mask_c.png"), "--gen-length", "4", "--steps", "4",
                    "--save-overlay", str(tmp_path / "overlay.png"))
    assert done.returncode == 0, done.stderr
    assert "resizing it" in done.stderr and done.stdout.count("[Caption") == 2
    picture = Image.open(tmp_path / "overlay.png")
    scale = -(-256 // max(width, height))  # upscaled to >= 256 px, then a caption panel below
    assert picture.width == scale * width and picture.height > scale * height


def test_published_demo_scripts_take_the_published_arguments(tmp_path):
    inputs, checkpoint = FIXTURES / "pdmllm" / "inputs", str(FIXTURES / "pdmllm" / "checkpoint")
    root = Path(__file__).resolve().parents[1] / "demo"
    done = subprocess.run(
        [sys.executable, str(root / "infer_pdmllm.py"), "--model-path", checkpoint, "--image",
         str(inputs / "image.png"), "--masks", str(inputs / "mask_c.png"), str(inputs / "mask_a.png"),
         "--prompt", "Describe the masked region in detail.", "--gen-length", "4", "--block-length", "4",
         "--steps", "4", "--temperature", "0", "--top-p", "1.0"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert [line.split("]")[0] for line in done.stdout.splitlines()[:2]] == ["[Caption 0", "[Caption 1"]
    done = subprocess.run(
        [sys.executable, str(root / "infer_dmllm.py"), "--model-path", checkpoint, "--image",
         str(inputs / "image.png"), "--prompt", "What is it?", "--gen-length", "4", "--block-length", "2",
         "--steps", "4"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].startswith("NFE 4")
    done = subprocess.run([sys.executable, str(root / "infer_pdmllm.py"), "--image", "x.png", "--masks", "m.png",
                           "--gen-length", "8", "--block-length", "4"], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "--block-length must equal --gen-length" in done.stderr


@pytest.mark.skipif(not (DEFAULT_MODEL_PATH / "config.json").is_file(), reason="the embedded tiny model is not built")
def test_readme_main_command_names_each_regions_shape_and_colour(tmp_path):
    """The README's region-captioning command on the shipped assets, with the embedded model."""
    root = Path(__file__).resolve().parents[1]
    masks = [str(root / "assets" / f"demo_mask_{i}.png") for i in range(4)]
    done = subprocess.run([sys.executable, "-m", "perceptiondlm.cli", "caption", "--image",
                           str(root / "assets" / "demo.png"), "--masks", *masks, "--save-overlay",
                           str(tmp_path / "overlay.png")], capture_output=True, text=True, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    captions = [line.split("] ", 1)[1] for line in done.stdout.splitlines() if line.startswith("[Caption")]
    for caption, obj in zip(captions, make_scene(2, 118).objects, strict=True):  # assets/README.md
        parsed = parse_caption(caption)
        assert (parsed["shape"], parsed["colour"]) == (obj.shape, obj.colour), caption
