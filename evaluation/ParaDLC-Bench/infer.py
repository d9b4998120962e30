"""ParaDLC-Bench inference: caption every annotated region in parallel and write {"<image_id>_<index>": caption}.

Example (the published setting):
    python evaluation/ParaDLC-Bench/infer.py --model-path /ckpt/PerceptionDLM \
        --gen-length 32 --steps 32 --output outputs/paradlc_outputs.json
"""

from pathlib import Path

from perceptiondlm.evaluation.cli import inference_main

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    inference_main(__doc__, annotations=HERE / "annotations" / "annotations.json",
                   images=HERE / "annotations" / "images",
                   output=HERE / "outputs" / "paradlc_outputs.json", one_region_per_call=False)
