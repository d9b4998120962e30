"""Convert an original GSAI-ML LLaDA checkpoint into the HF layout (`perceptiondlm convert`).

Usage: python scripts/convert.py --model-path SRC --output-path DST
"""

import sys

from perceptiondlm.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
