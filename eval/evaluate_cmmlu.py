"""cmmlu: see eval/EVALUATION.md. Run from the repository root: python eval/evaluate_cmmlu.py --help"""

import sys
from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(EVAL_DIR.parent))  # the repository root, when run as a script from anywhere

from qwen.scripts import quiet_libraries  # noqa: E402

if __name__ == "__main__":
    quiet_libraries()  # before the libraries are imported: their import-time chatter stays off the terminal
    from qwen.evaluation.runner import main

    main("cmmlu", eval_dir=EVAL_DIR)
