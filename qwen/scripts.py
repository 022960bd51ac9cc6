"""What every entry script shares: the checkpoint flags, quiet library logging, and "a user error prints one
line and exits 2".

    parser = argparse.ArgumentParser(...)
    add_checkpoint_args(parser)                    # -c/--checkpoint-path, --cpu-only, --dtype, --device, ...
    args = parser.parse_args(argv)
    with exit_on_user_error():                     # qwen.errors.UserError -> "Error: ..." on stderr, exit 2
        model, tokenizer = load_checkpoint(args)
"""

import argparse
import contextlib
import ipaddress
import logging
import os
import sys

from .errors import UserError

DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
EXIT_USER_ERROR = 2  # as argparse: a usage mistake


def add_checkpoint_args(parser: argparse.ArgumentParser, *, demo_default: bool = True) -> None:
    """-c/--checkpoint-path (default: the offline demo model), --cpu-only, --dtype, --device, the KV cache's
    precision and the CPU weight layout."""
    default = "the offline demo model" if demo_default else "required"
    parser.add_argument("-c", "--checkpoint-path", default=None,
                        help=f"hub id or checkpoint directory (default: {default})")
    parser.add_argument("--cpu-only", action="store_true", help="run on the CPU even when a GPU is present")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES,
                        help="weights' precision (auto: bf16 / fp16 on a GPU as the original, fp32 on the CPU)")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda, cuda:N, mps, or auto (default: every GPU when there is one, else cpu)")
    parser.add_argument("--use-cache-quantization", action="store_true", default=None,
                        help="store the KV cache in int8 (config.json's use_cache_quantization; ~1/4 of fp32)")
    parser.add_argument("--weight-layout", default="packed", choices=("packed", "plain"),
                        help="on the CPU, reorder linear weights once for oneDNN (packed, default: faster) or keep "
                             "them as loaded (plain); GPUs and quantized layers are not affected")


API_PORT, PAGE_PORT = 8000, 8080  # the servers' default ports: apart, so both run side by side


def add_server_args(parser: argparse.ArgumentParser, default_port: int) -> None:
    """What both servers (API, web page) take: --server-port, --server-name, --threads, --compile."""
    parser.add_argument("--server-port", type=port, default=default_port, help=f"port (default {default_port})")
    parser.add_argument("--server-name", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for the model's math (default: one per core, less one for the server "
                             "itself on machines with more than 2 cores)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="on the CPU, compile the decode step with torch.compile in the background from the "
                             "start (~40 s for the demo model on 2 cores; decoding is eager meanwhile, /health says "
                             "which); --no-compile: eager only")


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or address to listen on, or a request's Host without its port) is this machine only."""
    name = host.strip().strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):  # RFC 6761: always loopback
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def warn_if_exposed(server_name: str, protected: bool, how: str) -> None:
    """A loud stderr warning when a server without auth listens beyond this machine; `how` names the auth flag."""
    if not protected and not is_loopback(server_name):
        print(f"WARNING: listening on {server_name} without authentication: anyone who can reach this machine "
              f"can use it. Add {how}, or listen on 127.0.0.1.", file=sys.stderr, flush=True)


def prepare_server(args: argparse.Namespace) -> None:
    """Before a server loads its model: the port is free (UsageError naming --server-port), and args.threads
    becomes the engine thread's number of compute threads (the default above when not given).

    This thread keeps one: the model then runs its math only on the engine thread, so the process has a single
    OpenMP team. With a second team (this thread's, from loading) OpenMP counts more threads than cores and makes
    idle threads sleep at once, which cost 20-30% of decode speed whenever spinning is allowed (see README
    "Threads"). The OpenMP wait policy cannot change once torch is loaded: entry scripts set
    a short GOMP_SPINCOUNT (openmp_wait.py) before importing torch, unless it or OMP_WAIT_POLICY is set.
    """

    import torch

    from .errors import UsageError

    check_port_free(args.server_name, args.server_port)
    if args.threads is None:
        args.threads = default_engine_threads()
    elif args.threads < 1:
        raise UsageError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(1)


def default_engine_threads() -> int:
    """The engine thread's compute threads when --threads is not given: one per core this process may use, less one
    for the server's own threads on machines with more than 2 cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores - 1 if cores > 2 else cores


def load_checkpoint(args: argparse.Namespace, **kwargs):
    """(model, tokenizer) for inference, per the flags add_checkpoint_args() added; raises CheckpointError for a
    bad checkpoint. On the CPU the linear weights are packed for oneDNN unless --weight-layout plain."""
    from .loading import load_model_and_tokenizer
    from .packed_linear import pack_linear_weights

    model, tokenizer = load_model_and_tokenizer(
        args.checkpoint_path, cpu_only=args.cpu_only, dtype=args.dtype, device=args.device,
        use_cache_quantization=getattr(args, "use_cache_quantization", None), **kwargs
    )
    if args.weight_layout == "packed":
        pack_linear_weights(model)
    return model, tokenizer


def leave_served(engine, code: int = 0) -> int:
    """`code`, for a server script to return once it has shut down; stopped while the engine's decode step still
    compiles, the process leaves at once with it (os._exit): the compile thread is in native code, under which the
    interpreter's teardown can abort the process (exit -6 seen), and nothing is left to clean up."""
    if engine.decode_step == "compiling":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def port(value: str) -> int:
    """argparse type of --server-port: an integer in 0..65535, checked before any model is loaded."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"{number} is not a port: use 0..65535")
    return number


def check_port_free(host: str, number: int) -> None:
    """UsageError naming --server-port when host:number cannot be listened on (checked before loading a model)."""
    import socket

    from .errors import UsageError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT does not count
        try:
            probe.bind((host, number))
        except OSError as exc:
            raise UsageError(
                f"cannot listen on {host}:{number} ({exc.strerror or exc}): pick another --server-port, or stop "
                "the program using it."
            ) from None


def quiet_libraries() -> None:
    """Keep library chatter out of a person's terminal; call first thing in main(). (Libraries that log while
    being imported, e.g. bitsandbytes on CPUs without its optional kernels, are quieted by qwen._import_noise,
    which `import qwen` runs first.)

    transformers' own logging shows errors only and no "Loading weights" bar (the loader prints one line when
    done; download bars stay); Python warnings (FutureWarning, ...) go to the `py.warnings` logger; any library
    logger without handlers of its own reaches stderr from ERROR up.
    """
    from transformers.utils import logging as hf_logging

    from .quantize import quiet_gptqmodel

    hf_logging.set_verbosity_error()
    hf_logging.set_tqdm_hook(_without_loading_bar)
    quiet_gptqmodel()  # its import-time banner and notes (GPTQ checkpoints, and peft imports it when installed)
    logging.captureWarnings(True)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("qwen.engine").setLevel(logging.INFO)  # its few lines: the decode step compiled, or why not


def _without_loading_bar(factory, args, kwargs):
    """transformers' tqdm hook: every bar but the one over the weights being loaded."""
    from transformers.utils.logging import EmptyTqdm

    return (EmptyTqdm if kwargs.get("desc") == "Loading weights" else factory)(*args, **kwargs)


@contextlib.contextmanager
def exit_on_user_error():
    """Turn a qwen.errors.UserError into one line on stderr and SystemExit(2); anything else propagates."""
    try:
        yield
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR) from None


__all__ = ["API_PORT", "PAGE_PORT", "add_checkpoint_args", "add_server_args", "default_engine_threads", "prepare_server", "check_port_free", "exit_on_user_error", "load_checkpoint", "port", "quiet_libraries"]
