"""torchrun for the finetune/*.sh launchers, with the workers' own words as the last thing printed.

    python -m qwen.sft.launch [torchrun options] finetune.py [finetune.py flags]

Takes torchrun's options. Differences from plain torchrun, all for a person at a terminal:
  - a worker's exit is not wrapped in torchrun's ChildFailedError report: a user mistake (exit 2: the worker
    printed one line) and an interruption (the worker printed where its checkpoint is) end quietly with the
    worker's exit code; a crash adds one line naming the rank under the worker's own traceback;
  - Ctrl-C and SIGTERM reach the workers (torchrun starts them in sessions of their own and forwards the
    signal): they finish the step, save a checkpoint and exit. torchrun gives them --shutdown-timeout seconds
    before SIGKILL: here $TORCH_ELASTIC_SHUTDOWN_TIMEOUT or 600 s (torchrun's 30 s can cut a large save short).
"""

import logging
import os
import signal
import sys

EXIT_QUIET = {2, 128 + signal.SIGINT, 128 + signal.SIGTERM}  # the worker already said what happened
SHUTDOWN_SECONDS = 600  # after SIGTERM, how long the workers get to save a checkpoint before SIGKILL


def main(argv: list[str] | None = None) -> int:
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(sys.argv[1:] if argv is None else argv)
    if args.shutdown_timeout is None:
        args.shutdown_timeout = int(os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", SHUTDOWN_SECONDS))
    # torchrun's own reports (closing signals, "failed (exitcode: 2)", the failure table) repeat what the
    # workers printed; its errors of its own (a port in use, a rendezvous timeout) still raise.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        torchrun.run(args)
    except ChildFailedError as failed:
        rank, failure = failed.get_first_failure()
        code = failure.exitcode
        if code < 0:
            print(f"{failed.name}: rank {rank} was killed by {signal.Signals(-code).name}", file=sys.stderr)
            return 128 - code
        if code not in EXIT_QUIET:
            print(f"{failed.name}: rank {rank} failed (exit code {code}); its traceback is above", file=sys.stderr)
        return code
    except SignalException as stopped:  # Ctrl-C / SIGTERM to torchrun: forwarded, and the workers have exited
        return 128 + stopped.sigval
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
