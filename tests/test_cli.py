"""The `perceptiondlm` command line: the smoke run and clean one-line errors."""

from __future__ import annotations

import subprocess
import sys

from conftest import FIXTURES

from perceptiondlm.cli import main
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
