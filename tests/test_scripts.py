"""What every entry script shares (qwen/scripts.py), seen as a person sees it: one-line errors before any model
loads, a taken port named with --server-port, no library warnings and no hint naming a flag we do not have."""

import os
import socket
import subprocess
import sys
import time

import pytest
from conftest import REPO

from qwen.checkpoints import make_tiny_checkpoint

SCRIPTS = ["openai_api.py", "web_demo.py"]


def run(*command: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("script", SCRIPTS)
def test_out_of_range_port_is_refused_before_loading(script):
    start = time.perf_counter()
    done = run(script, "--server-port", "99999", "-c", "/no/such/checkpoint")
    assert done.returncode == 2
    assert "--server-port" in done.stderr and "0..65535" in done.stderr and "Traceback" not in done.stderr
    assert "No such checkpoint" not in done.stderr  # refused before touching the checkpoint
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("script", SCRIPTS)
def test_taken_port_names_the_flag(script, tiny):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run(script, "-c", tiny, "--server-port", str(port))
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pick another --server-port" in lines[0], done.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_checkpoint_is_one_line(script):
    done = run(script, "-c", "/no/such/checkpoint", "--server-port", "0")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "Error: No such checkpoint directory: /no/such/checkpoint. Pass a directory holding config.json and the "
        "weights, or a hub id such as Qwen/Qwen-7B-Chat."
    ]


def test_web_demo_banner_names_our_share_flag(tiny):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, "web_demo.py", "-c", tiny, "--server-port", str(port)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        output = ""
        deadline = time.time() + 180
        while "Chat page on" not in output and time.time() < deadline and process.poll() is None:
            output += process.stdout.readline()
        assert f"Chat page on http://127.0.0.1:{port}" in output and "--share" in output, output
        time.sleep(3)  # gradio would print its own hint now
    finally:
        process.terminate()
        rest, _ = process.communicate(timeout=30)
    output += rest
    assert "share=True" not in output and "Warning" not in output, output


@pytest.mark.parametrize("given, expected", [([], None), (["--threads", "1"], 1)])
def test_prepare_server_gives_the_threads_to_the_engine_and_keeps_one(given, expected):
    import argparse
    import os

    import torch

    from qwen.scripts import API_PORT, add_server_args, prepare_server

    parser = argparse.ArgumentParser()
    add_server_args(parser, API_PORT)
    args = parser.parse_args(["--server-port", "0", *given])
    before = torch.get_num_threads()
    try:
        prepare_server(args)
        assert torch.get_num_threads() == 1  # loading and serving threads never start a second OpenMP team
        cores = len(os.sched_getaffinity(0))
        assert args.threads == (expected or (cores - 1 if cores > 2 else cores))
    finally:
        torch.set_num_threads(before)


def test_the_api_and_the_page_listen_on_different_default_ports():
    """Started side by side with their defaults, the API and the chat page do not collide."""
    import openai_api
    import web_demo

    assert openai_api.parse_args([]).server_port != web_demo.parse_args([]).server_port


def test_the_servers_choose_a_short_openmp_spin_before_anything_loads_torch(monkeypatch):
    """OpenMP reads its wait policy once, when torch loads it: both servers set it first, unless the user did."""
    from openmp_wait import SERVER_SPIN_COUNT, spin_briefly

    for script in ("openai_api.py", "web_demo.py"):
        lines = (REPO / script).read_text().splitlines()
        first_qwen = next(i for i, line in enumerate(lines) if line.startswith(("from qwen", "import qwen", "import torch")))
        assert "spin_briefly()" in "\n".join(lines[:first_qwen]), script
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    spin_briefly()
    assert os.environ["GOMP_SPINCOUNT"] == str(SERVER_SPIN_COUNT)
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    spin_briefly()
    assert os.environ["GOMP_SPINCOUNT"] == "300000"
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    spin_briefly()
    assert "GOMP_SPINCOUNT" not in os.environ
