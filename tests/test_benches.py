"""The benchmarks run on the installed versions and clean up after themselves (they are run by hand, not timed)."""

import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


def test_attention_bench_compares_ours_with_inductor_and_the_read_bound(tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    done = subprocess.run([sys.executable, "-m", "bench.attention_bench", "-c", str(checkpoint), "--rows", "1", "3",
                           "--widths", "70", "--runs", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "4 query heads, 4 kv heads of 16" in done.stdout
    for rows in (1, 3):
        assert all(f"rows {rows} width    70  {name}" in done.stdout for name in ("ours", "inductor", "read"))
        assert f"rows {rows} width    70  ours / inductor" in done.stdout and "ours / read bound" in done.stdout


@pytest.mark.slow
def test_decode_bench_runs_and_prints_the_ratio():
    small = ["--layers", "1", "--hidden-size", "64", "--heads", "4", "--mlp-width", "128", "--vocab-size", "1000",
             "--new-tokens", "4", "--prefill-tokens", "16", "--runs", "1"]  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "bench.decode_bench", *small], cwd=REPO, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "same function" in done.stdout and "with packed linear weights" in done.stdout
    assert "decode ratio QWenLMHeadModel / Qwen2ForCausalLM" in done.stdout and "prefill ratio" in done.stdout
    assert "bandwidth bound:" in done.stdout and "decode reaches QWenLMHeadModel" in done.stdout


def test_linear_bench_compares_the_three_layouts(tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    done = subprocess.run([sys.executable, "-m", "bench.linear_bench", "-c", str(checkpoint), "--rows", "1", "3",
                           "--runs", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    for rows in (1, 3):
        assert all(f"rows {rows:4d}  {layout}" in done.stdout for layout in ("blocked", "onednn", "plain"))
        assert f"rows {rows:4d}  blocked / oneDNN" in done.stdout
    assert "read bound:" in done.stdout


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


@pytest.mark.slow
def test_serve_bench_drives_a_peer_with_the_same_load(tmp_path):
    from bench.serve_bench import process_state, running_server

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    with running_server(str(checkpoint), 1, []) as (peer_url, peer_pid):  # any OpenAI-compatible server
        done = subprocess.run(
            [sys.executable, "-m", "bench.serve_bench", "-c", str(checkpoint), "--threads", "1", "--clients", "2",
             "--max-tokens", "4", "--rounds", "1", "--peer", peer_url, "--peer-name", "other",
             "--peer-pid", str(peer_pid), "--plot", str(tmp_path / "serve.png")],
            cwd=REPO, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        peer_state = process_state(peer_pid)
    assert done.returncode == 0, done.stderr
    for line in ("ours  2 client(s)", "other  2 client(s)", "ours / other, 2 client(s)", "peak memory ours / other",
                 "the other server paused (SIGSTOP)"):
        assert line in done.stdout, done.stdout
    assert (tmp_path / "serve.png").stat().st_size > 0
    assert peer_state != "T"  # resumed once the bench is done


def test_paused_stops_a_server_and_its_children_then_resumes_them():
    from bench.serve_bench import paused, process_state, process_tree

    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"])
    try:
        deadline = time.monotonic() + 30
        while len(process_tree(parent.pid)) < 2 and time.monotonic() < deadline:  # the child is started
            time.sleep(0.1)
        tree = process_tree(parent.pid)
        assert len(tree) == 2
        with paused([parent.pid]):
            assert [process_state(p) for p in tree] == ["T", "T"]
        deadline = time.monotonic() + 10  # SIGCONT is delivered asynchronously too
        while "T" in [process_state(p) for p in tree] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "T" not in [process_state(p) for p in tree]
    finally:
        for p in process_tree(parent.pid)[::-1]:
            os.kill(p, signal.SIGKILL)
        parent.wait()


def autogroup_enabled() -> bool:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as flag:
            return flag.read().strip() == "1"
    except OSError:
        return False


@pytest.mark.skipif(not autogroup_enabled(), reason="this kernel does not group CPU time by session "
                    "(/proc/sys/kernel/sched_autogroup_enabled)")
def test_a_peer_in_this_session_is_told_apart_from_one_in_its_own_session():
    """A peer started from the bench's own shell shares one CPU share with the bench's clients (autogroup)."""
    from bench.serve_bench import shares_our_scheduling_group

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    here, alone = subprocess.Popen(sleeper), subprocess.Popen(sleeper, start_new_session=True)
    try:
        assert shares_our_scheduling_group(here.pid)
        assert not shares_our_scheduling_group(alone.pid)
        assert not shares_our_scheduling_group(2**22 + 1)  # no such process: nothing to warn about
    finally:
        for child in (here, alone):
            child.kill()
            child.wait()


def test_vllm_peer_gets_every_cpu_and_its_reported_binding_is_read_back(tmp_path):
    from bench.serve_bench import vllm_binding, vllm_environment

    cpus = sorted(os.sched_getaffinity(0))
    env = vllm_environment("all", sys.executable)
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == ",".join(map(str, cpus)) and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert "VLLM_CPU_OMP_THREADS_BIND" not in vllm_environment("auto", sys.executable)  # vLLM's own choice
    log = tmp_path / "vllm.log"  # the lines vLLM 0.32's CPU worker logs (vllm/utils/ompmultiprocessing.py)
    prefix = "(EngineCore pid=1) INFO 12-04 22:00:00 [ompmultiprocessing.py:185] "
    log.write_text("".join(prefix + line + "\n" for line in [
        "OpenMP thread binding info: ", "\tVLLM_CPU_OMP_THREADS_BIND='auto', auto_setup=True, skip_setup=False",
        "\tlocal_world_size=1, reserve_cpu_num=1", "\tlocal_rank=0, core ids=[1]", "\treserved_cpus=[0]"])
        + "(EngineCore pid=1) INFO 12-04 22:00:01 [core.py:1] next\n")  # fmt: skip
    assert vllm_binding(log) == ("VLLM_CPU_OMP_THREADS_BIND='auto', auto_setup=True, skip_setup=False; "
                                 "local_world_size=1, reserve_cpu_num=1; local_rank=0, core ids=[1]; reserved_cpus=[0]")


def fake_python(prefix: Path) -> str:
    """A "python" that answers `sys.prefix` with `prefix` (all vllm_preloads asks it)."""
    program = prefix / "bin" / "python"
    program.parent.mkdir(parents=True)
    program.write_text(f"#!/bin/sh\necho {prefix}\n")
    program.chmod(0o755)
    return str(program)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="Intel's OpenMP is asked for on x86 only")
def test_vllm_is_started_with_the_libraries_its_guide_asks_to_preload(tmp_path):
    """TCMalloc from the system, Intel's OpenMP from vLLM's environment: preloaded when found, named when not."""
    from bench.serve_bench import describe_vllm_start, vllm_environment, vllm_preloads

    with_iomp = fake_python(tmp_path / "with")
    (tmp_path / "with" / "lib").mkdir()
    (tmp_path / "with" / "lib" / "libiomp5.so").write_bytes(b"")
    found, missing = vllm_preloads(with_iomp)
    assert str(tmp_path / "with" / "lib" / "libiomp5.so") in found
    assert vllm_environment("all", with_iomp)["LD_PRELOAD"].split(":")[: len(found)] == found
    tcmalloc = [path for path in found if "libtcmalloc" in Path(path).name]
    assert (missing == []) if tcmalloc else (missing == ["apt-get install libtcmalloc-minimal4"])
    without = describe_vllm_start("all", fake_python(tmp_path / "without"))
    assert "WITHOUT a library its CPU guide asks to preload (pip install intel-openmp, in vLLM's environment)" in without
    assert "VLLM_CPU_OMP_THREADS_BIND=" in without and "libiomp5" not in without.split(";")[0]


def test_serve_bench_multiturn_chats_resend_their_history(tmp_path):
    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    done = subprocess.run(
        [sys.executable, "-m", "bench.serve_bench", "-c", str(checkpoint), "--threads", "1", "--clients", "2",
         "--max-tokens", "3", "--rounds", "1", "--workload", "multiturn", "--turns", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "2-turn chats resending the history, 3 tokens per request" in done.stdout
    assert "ours  2 client(s)" in done.stdout and "ended early" not in done.stdout  # ignore_eos is honoured


def test_gpu_suite_dry_run_writes_one_json_and_a_table(tmp_path):
    import json

    assert subprocess.run(["bash", "-n", "bench/gpu_suite.sh"], cwd=REPO).returncode == 0
    done = subprocess.run(["bash", "bench/gpu_suite.sh", "--dry-run", str(tmp_path)], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "SUITE_STEPS": "decode gptq"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["dry_run"] and report["steps"]["decode"]["status"] == "ok"
    assert any("bandwidth bound" in line for line in report["steps"]["decode"]["results"])
    assert report["steps"]["gptq"]["status"] == "skipped"
    assert "| decode | ok |" in (tmp_path / "gpu_suite.md").read_text()


# A stand-in for vLLM's offline API (vLLM itself lives in its own environment, never in CI): it records what it is
# asked and answers max_tokens tokens a prompt, so the bench's plumbing (driver, pausing, report) runs for real.
FAKE_VLLM = '''
import json, os, time
class SamplingParams:
    def __init__(self, **kwargs):
        self.kwargs = kwargs
class _Out:
    def __init__(self, n):
        self.outputs = [type("C", (), {"token_ids": [0] * n})()]
class LLM:
    def __init__(self, model, **kwargs):
        print("INFO a log line on stdout", flush=True)
        if os.environ.get("FAKE_VLLM_FAIL"):  # an engine process started, then the start fails
            import subprocess, sys
            engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            open(os.environ["FAKE_VLLM_FAIL"], "w").write(str(engine.pid))
            raise RuntimeError("Engine core initialization failed")
        self.record = open(os.environ["FAKE_VLLM_RECORD"], "a")
        self.record.write(json.dumps({"model": model, **kwargs}) + "\\n")
    def generate(self, prompts, params, use_tqdm=True):
        self.record.write(json.dumps({"prompts": prompts, "params": params.kwargs}) + "\\n")
        self.record.flush()
        time.sleep(0.05)
        return [_Out(params.kwargs["max_tokens"]) for _ in prompts]
'''


def test_offline_bench_gives_vllm_the_prompt_ids_ours_decodes_and_prints_the_ratio(tmp_path):
    import json

    from qwen.loading import load_model_and_tokenizer

    checkpoint = make_tiny_checkpoint(tmp_path / "tiny")
    (tmp_path / "fake" / "vllm").mkdir(parents=True)
    (tmp_path / "fake" / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    record = tmp_path / "record.jsonl"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "FAKE_VLLM_RECORD": str(record)}
    done = subprocess.run(
        [sys.executable, "-m", "bench.offline_bench", "-c", str(checkpoint), "--peer-vllm", sys.executable,
         "--clients", "2", "--max-tokens", "3", "--rounds", "1", "--threads", "1", "--no-compile"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "ours: 1 threads, decode step eager" in done.stdout
    assert "1 prompt(s): ours" in done.stdout and "2 prompt(s): ours" in done.stdout and "ours / vLLM" in done.stdout
    assert "1 prompt against the memory bound (" in done.stdout and "vLLM " in done.stdout.splitlines()[-1]
    loaded, *calls = [json.loads(line) for line in record.read_text().splitlines()]
    assert loaded["dtype"] == "float32" and loaded["model"].endswith("qwen2")  # the to-qwen2 export
    assert all(call["params"] == {"max_tokens": 3, "temperature": 0, "ignore_eos": True} for call in calls)
    measured = calls[1:]  # after the warm-up: 1 prompt, then 2
    assert [len(call["prompts"]) for call in measured] == [1, 2]
    _, tokenizer = load_model_and_tokenizer(str(checkpoint), cpu_only=True)
    text = tokenizer.decode(measured[1]["prompts"][1]["prompt_token_ids"])
    assert text.startswith("<|im_start|>system\n") and "Write a long, detailed story about a lighthouse." in text


def test_offline_bench_stops_what_vllm_started_when_its_start_fails(tmp_path):
    (tmp_path / "fake" / "vllm").mkdir(parents=True)
    (tmp_path / "fake" / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    engine_pid = tmp_path / "engine.pid"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "fake"), "FAKE_VLLM_RECORD": str(tmp_path / "record.jsonl"),
           "FAKE_VLLM_FAIL": str(engine_pid)}  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "bench.offline_bench", "-c", str(make_tiny_checkpoint(tmp_path / "tiny")),
         "--peer-vllm", sys.executable, "--threads", "1", "--no-compile"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert done.returncode == 1 and "Error: vLLM stopped" in done.stderr and "Engine core initialization" in done.stderr
    pid = int(engine_pid.read_text())
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


@pytest.mark.parametrize("bench, flag", [("offline_bench", "--peer-vllm"), ("serve_bench", "--peer-vllm"),
                                         ("vllm_bench", "--vllm-python")])  # fmt: skip
@pytest.mark.parametrize("python", [sys.executable, "/nonexistent/bin/python"], ids=["no-vllm", "no-such-program"])
def test_the_benches_say_when_the_given_python_has_no_vllm(bench, flag, python):
    done = subprocess.run([sys.executable, "-m", f"bench.{bench}", flag, python],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1 and "`import vllm` fails" in done.stderr and "Traceback" not in done.stderr
