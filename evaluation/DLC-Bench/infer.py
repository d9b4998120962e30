"""DLC-Bench inference: caption every annotated region (COCO annotations) and write {"<annotation id>": caption}.

Example (one region per call, as the reference script):
    python evaluation/DLC-Bench/infer.py --model-path /ckpt/PerceptionDLM \
        --gen-length 32 --steps 32 --output outputs/dlc_outputs.json
"""

from pathlib import Path

from perceptiondlm.evaluation.cli import inference_main

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    inference_main(__doc__, annotations=HERE / "DLC-bench" / "annotations.json", images=HERE / "DLC-bench" / "images",
                   output=HERE / "outputs" / "dlc_outputs.json", one_region_per_call=True)
