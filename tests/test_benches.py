"""The benchmarks run on the installed versions and clean up after themselves (they are run by hand, not timed)."""

import os
import signal
import subprocess
import sys
import time

from conftest import REPO

from qwen.checkpoints import make_tiny_checkpoint


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def test_decode_bench_runs_and_prints_the_ratio():
    small = ["--layers", "1", "--hidden-size", "64", "--heads", "4", "--mlp-width", "128", "--vocab-size", "1000",
             "--new-tokens", "4", "--runs", "1"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "bench.decode_bench", *small], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "same function" in done.stdout and "ratio QWenLMHeadModel / Qwen2ForCausalLM" in done.stdout


def test_serve_bench_interrupted_leaves_no_server_behind(tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    bench = subprocess.Popen([sys.executable, "-m", "bench.serve_bench", "-c", str(checkpoint)], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (servers := children_of(bench.pid)) and time.time() < deadline:
            time.sleep(0.2)
        assert servers, "serve_bench never started its server"
        time.sleep(1)
        os.killpg(bench.pid, signal.SIGINT)  # what a Ctrl-C in the terminal sends
        assert bench.wait(60) == 130
        assert b"Traceback" not in bench.stderr.read()
        for server in servers:
            assert not os.path.exists(f"/proc/{server}") or open(f"/proc/{server}/stat").read().split()[2] == "Z"
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
