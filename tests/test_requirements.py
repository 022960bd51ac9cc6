"""The requirements files: every extra carries the core's tested ranges, and pip really resolves each file (alone,
in a fresh environment) to versions inside them.

The resolution asks the package index (`pip install --dry-run --ignore-installed --report`, nothing is installed):
about half a minute per file, so it is marked slow.
"""

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CORE = REPO / "requirements.txt"
FILES = sorted(REPO.glob("requirements*.txt"))
EXTRAS = [path for path in FILES if path != CORE]


def _lines(path):
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            yield line


def _included(path) -> set[str]:
    """The files `path` pulls in with -r, followed through."""
    names = set()
    for line in _lines(path):
        match = re.fullmatch(r"-r\s+(\S+)", line)
        if match and match[1] not in names:
            names.add(match[1])
            names |= _included(path.parent / match[1])
    return names


def _core_ranges() -> dict[str, Requirement]:
    return {canonicalize_name(req.name): req for req in map(Requirement, _lines(CORE))}


@pytest.mark.parametrize("path", EXTRAS, ids=lambda p: p.name)
def test_every_extra_carries_the_core_ranges(path):
    assert "requirements.txt" in _included(path), f"{path.name} lacks `-r requirements.txt`"


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_each_file_resolves_inside_the_tested_ranges(path, tmp_path):
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
         str(report), "-r", path.name],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    resolved = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    outside = {
        name: f"{resolved[name]} (requirements.txt: {req.specifier})"
        for name, req in _core_ranges().items()
        if name in resolved and not req.specifier.contains(resolved[name], prereleases=True)
    }
    assert not outside, f"{path.name} resolves outside the tested ranges: {outside}"
    assert _core_ranges().keys() <= resolved.keys()
