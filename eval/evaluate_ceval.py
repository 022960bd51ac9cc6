"""ceval: see eval/EVALUATION.md. Run from the repository root: python eval/evaluate_ceval.py --help"""

import sys
from pathlib import Path

EVAL_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(EVAL_DIR.parent))  # the repository root, when run as a script from anywhere

from qwen.evaluation.tasks import main  # noqa: E402

if __name__ == "__main__":
    main("ceval", eval_dir=EVAL_DIR)
