"""docker/: the CPU image builds, serves the API as a non-root user with the model mounted read-only, reports
healthy, compiles its decode step (the image's g++) and answers a chat request like our own model does.

The build takes minutes (about 4 the first time, seconds when Docker's cache has it), so it runs only with
QWEN_DOCKER_TEST=1, and is skipped with the reason where Docker (with BuildKit) is not available. No registry is
needed: without a local Debian bookworm image, docker/make_base_image.sh builds one with debootstrap (kept
under its tag, so later runs reuse it). pip's CA bundle and find-links folder (`pip config list`) are handed to
the build as a secret and as a local wheel server, as the Dockerfile documents.
"""

import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO

DOCKER_DIR = REPO / "docker"
LAUNCHERS = sorted(DOCKER_DIR.glob("docker_*.sh"))
BASE_TAG = os.environ.get("QWEN_DOCKER_BASE", "qwen-local/debian:bookworm")
IMAGE_TAG = "qwen-test:cpu"
FINETUNE_TAG = "qwen-test:finetune"
WHEEL_PORT = 38765


# ---- the scripts, without Docker ----------------------------------------------------------------------------


def test_launchers_exist_and_parse():
    assert {p.name for p in LAUNCHERS} >= {
        "docker_cli_demo.sh", "docker_web_demo.sh", "docker_openai_api.sh", "docker_finetune.sh"
    }  # fmt: skip
    for script in [*LAUNCHERS, DOCKER_DIR / "common.sh", DOCKER_DIR / "make_base_image.sh"]:
        subprocess.run(["bash", "-n", str(script)], check=True)


def test_nothing_mounts_the_docker_socket_or_runs_as_root():
    for path in [*DOCKER_DIR.iterdir()]:
        text = path.read_text(encoding="utf-8")
        assert "docker.sock" not in text, path
        assert "--privileged" not in text, path
    dockerfile = (DOCKER_DIR / "Dockerfile").read_text(encoding="utf-8")
    runtime = dockerfile.split("AS runtime", 1)[1]
    assert "USER qwen" in runtime and "HEALTHCHECK" in runtime


@pytest.mark.parametrize("script", [p.name for p in LAUNCHERS])
def test_launchers_reject_bad_options(script, tmp_path):
    def run(*args):
        return subprocess.run(["bash", str(DOCKER_DIR / script), *args], capture_output=True, text=True)

    missing = run()
    assert missing.returncode == 2 and "-c CHECKPOINT_PATH is required" in missing.stderr
    wrong = run("-c", str(tmp_path / "nowhere"))
    assert wrong.returncode == 2 and "is not a directory" in wrong.stderr
    port = run("-c", str(tmp_path), "--port", "http")
    assert port.returncode == 2 and "--port must be a number" in port.stderr
    unknown = run("--bogus")
    assert unknown.returncode == 2 and "unknown option --bogus" in unknown.stderr


def test_an_adapter_without_its_base_says_to_pass_base(tmp_path):
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed (the launchers check for it first)")
    adapter = tmp_path / "output_qwen"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{\n  "base_model_name_or_path": "/models/Base-Chat",\n  "r": 8\n}')
    done = subprocess.run(["bash", str(DOCKER_DIR / "docker_openai_api.sh"), "--cpu", "-c", str(adapter)],
                          capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == (f"Error: {adapter} is a LoRA adapter on /models/Base-Chat, which is not on this machine: "
                           "pass the base checkpoint with --base DIR.\n")


# ---- the image ---------------------------------------------------------------------------------------------


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, **kwargs)


def _buildkit_docker() -> tuple[list[str], dict] | None:
    """A `docker build` command line that uses BuildKit (secret mounts): buildx, or a pre-23 client."""
    candidates = [c for c in dict.fromkeys([shutil.which("docker"), "/usr/bin/docker"]) if c and Path(c).exists()]
    for docker in candidates:
        if _run([docker, "buildx", "version"]).returncode == 0:
            return [docker, "buildx", "build", "--load"], {}
        version = _run([docker, "version", "--format", "{{.Client.Version}}"]).stdout.strip()
        if version and int(version.split(".")[0]) < 23:
            return [docker, "build"], {"DOCKER_BUILDKIT": "1"}
    return None


def _pip_config() -> dict[str, str]:
    listing = _run(["python", "-m", "pip", "config", "list"]).stdout
    config = {}
    for line in listing.splitlines():
        key, _, value = line.partition("=")
        config[key.rsplit(".", 1)[-1]] = value.strip().strip("'\"")
    return config


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # pip fetches many files; their access log is noise in pytest -s
        pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def docker_env():
    if os.environ.get("QWEN_DOCKER_TEST") != "1":
        pytest.skip("the image build takes minutes: set QWEN_DOCKER_TEST=1 to run it")
    if shutil.which("docker") is None:
        pytest.skip("docker is not installed")
    if _run(["docker", "info"]).returncode != 0:
        pytest.skip("the docker daemon is not reachable (start dockerd)")
    build = _buildkit_docker()
    if build is None:
        pytest.skip("no BuildKit-capable docker client (install docker buildx)")
    if _run(["docker", "image", "inspect", BASE_TAG]).returncode != 0:
        if shutil.which("debootstrap") is None:
            pytest.skip(f"no base image {BASE_TAG} and no debootstrap to build one")
        subprocess.run(["bash", str(DOCKER_DIR / "make_base_image.sh"), BASE_TAG], check=True)
    return build


@pytest.fixture(scope="module")
def wheel_server():
    """pip's find-links folder served on localhost: the build reaches it through --network host."""
    folder = _pip_config().get("find-links")
    if not folder or not Path(folder).is_dir():
        yield ""
        return
    handler = functools.partial(_QuietHandler, directory=folder)
    try:  # a fixed port keeps the build argument, and so Docker's layer cache, the same from run to run
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEEL_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def _build(docker_env, wheel_server, tag: str, extras: str) -> str:
    command, env = docker_env
    command = [*command, "--network", "host", "-f", str(DOCKER_DIR / "Dockerfile"), "-t", tag,
               "--build-arg", f"BASE_IMAGE={BASE_TAG}", "--build-arg", "VARIANT=cpu",
               "--build-arg", f"EXTRAS={extras}"]  # fmt: skip
    if wheel_server:  # the CPU torch wheel is on this machine, not on PyTorch's index (unreachable here)
        command += ["--build-arg", f"PIP_FIND_LINKS={wheel_server}", "--build-arg", "TORCH_INDEX="]
    cert = _pip_config().get("cert")
    if cert and Path(cert).is_file():
        command += ["--secret", f"id=pip_cert,src={cert}"]
    started = time.monotonic()
    done = _run([*command, str(REPO)], env={**os.environ, **env})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"\nimage {tag} built in {time.monotonic() - started:.0f} s")
    return tag


@pytest.fixture(scope="module")
def image(docker_env, wheel_server):
    return _build(docker_env, wheel_server, IMAGE_TAG, "api web")


@pytest.fixture(scope="module")
def finetune_image(docker_env, wheel_server):
    """The README's fine-tuning image: DeepSpeed (source only on PyPI) is built with its ops off."""
    return _build(docker_env, wheel_server, FINETUNE_TAG, "api web finetune")


def _health(container: str) -> str:
    return _run(["docker", "inspect", "--format", "{{.State.Health.Status}}", container]).stdout.strip()


def _wait_healthy(container: str, timeout_s: float = 300) -> None:
    """Until the container's healthcheck passes; fails with its log if it goes unhealthy or takes too long."""
    deadline = time.monotonic() + timeout_s
    while _health(container) != "healthy":
        assert _health(container) in ("starting", ""), _run(["docker", "logs", container]).stderr[-3000:]
        assert time.monotonic() < deadline, f"not healthy after {timeout_s:.0f} s"
        time.sleep(3)


def _decode_step_after_compiling(port: int, timeout_s: float = 300) -> str:
    """The server's /health "decode_step" once it is no longer "compiling"."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while (step := httpx.get(f"http://127.0.0.1:{port}/health").json()["decode_step"]) == "compiling":
        assert time.monotonic() < deadline, f"still compiling after {timeout_s:.0f} s"
        time.sleep(3)
    return step


def test_api_image_serves_the_model_healthy_and_unprivileged(image, demo_checkpoint):
    from openai import OpenAI

    from qwen.loading import load_model_and_tokenizer

    name, port = f"qwen-test-api-{os.getpid()}", _free_port()
    started = _run(["bash", str(DOCKER_DIR / "docker_openai_api.sh"), "-i", image, "--cpu", "--network", "host",
                    "-c", str(demo_checkpoint), "--port", str(port), "-n", name])  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        _wait_healthy(name)

        user = _run(["docker", "exec", name, "id", "-u"]).stdout.strip()
        assert user not in ("", "0")
        mounts = json.loads(_run(["docker", "inspect", "--format", "{{json .Mounts}}", name]).stdout)
        assert [(m["Destination"], m["RW"]) for m in mounts] == [(f"/models/{demo_checkpoint.name}", False)]

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        assert [m.id for m in client.models.list()] == [demo_checkpoint.name]  # the checkpoint's own name
        # the image's compiler builds the fp32 kernel and inductor's decode step (without one: "failed", eager)
        assert _decode_step_after_compiling(port) == "compiled", _run(["docker", "logs", name]).stderr[-3000:]
        kernel = _run(["docker", "exec", name, "python", "-c",
                       "from qwen.cpu_kernels import cpu_kernels; print(cpu_kernels() is not None)"])
        assert kernel.stdout.strip() == "True", kernel.stderr[-3000:]
        question = "What is the capital of France?"
        reply = client.chat.completions.create(
            model=demo_checkpoint.name, messages=[{"role": "user", "content": question}], temperature=0,
            max_tokens=24,
        )
        model, tokenizer = load_model_and_tokenizer(str(demo_checkpoint), cpu_only=True)
        expected, _ = model.chat(tokenizer, question, history=[], max_new_tokens=24, do_sample=False)
        assert reply.choices[0].message.content == expected
    finally:
        _run(["docker", "rm", "-f", name])


def test_finetune_image_trains_an_adapter_that_the_api_image_serves(image, finetune_image, demo_checkpoint,
                                                                     tmp_path):
    """docker_finetune.sh trains LoRA on the demo model in the fine-tuning image (one step); the adapter, with its
    base mounted by --base, serves in the API image and answers as the same adapter loaded outside Docker."""
    from openai import OpenAI

    from qwen.loading import load_adapter_checkpoint

    output = tmp_path / "output_qwen"
    data = REPO / "examples" / "finetune_data.json"
    trained = _run(["bash", str(DOCKER_DIR / "docker_finetune.sh"), "-i", finetune_image, "--cpu", "-c",
                    str(demo_checkpoint), "-d", str(data), "-o", str(output), "--", "--", "--max_steps", "1",
                    "--model_max_length", "256"], timeout=3600)  # fmt: skip
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert "Fine-tuning done." in trained.stdout + trained.stderr
    assert (output / "adapter_config.json").is_file()

    refused = _run(["bash", str(DOCKER_DIR / "docker_finetune.sh"), "-i", image, "--cpu", "-c", str(demo_checkpoint),
                    "-d", str(data), "-o", str(tmp_path / "other")])  # fmt: skip
    assert refused.returncode == 2 and "this image has no fine-tuning packages" in refused.stderr

    name, port = f"qwen-test-adapter-{os.getpid()}", _free_port()
    started = _run(["bash", str(DOCKER_DIR / "docker_openai_api.sh"), "-i", image, "--cpu", "--network", "host",
                    "-c", str(output), "--base", str(demo_checkpoint), "--port", str(port), "-n", name])  # fmt: skip
    assert started.returncode == 0, started.stderr
    try:
        _wait_healthy(name)
        question = "What is the capital of France?"
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        reply = client.chat.completions.create(
            model=output.name, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=24,
        )
        model, tokenizer = load_adapter_checkpoint(output, base=str(demo_checkpoint), cpu_only=True)
        expected, _ = model.chat(tokenizer, question, history=[], max_new_tokens=24, do_sample=False)
        assert reply.choices[0].message.content == expected
    finally:
        _run(["docker", "rm", "-f", name])
