"""How `make` starts a stage: `accelerate launch`, with two differences that matter at the terminal.

    python -m pipeline.launch [accelerate launch arguments] stages/ppo.py --recipe my.yaml ...

1. It returns only when every process of the stage has exited. After Ctrl-C the stage's ranks
   save a checkpoint before they exit, but `accelerate launch` returns at once, so `make` would give
   the prompt back while they still write, and an immediate re-run would race them. Here the
   launcher runs in a process group of its own; Ctrl-C / SIGTERM / SIGHUP are passed on to the
   whole group, and this process waits until the group is empty.
2. A stage that fails has already said why (one line, or its traceback): its exit code is passed
   on without the launcher's own traceback (CalledProcessError / ChildFailedError) below it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _launch(argv: list[str]) -> int:
    """`accelerate launch` in this process, its failures reduced to the stage's exit code."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    # torch elastic logs every failed rank; the stage has reported its own error (below: other exits)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    for sig in FORWARDED:  # the group leader gets the signal too: wait for the stage, do not die first
        signal.signal(sig, lambda *_: None)
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except subprocess.CalledProcessError as e:  # one process: the stage's own exit code
        return e.returncode if e.returncode > 0 else 128 - e.returncode
    except Exception as e:  # several processes: torch elastic's ChildFailedError lists each rank's code
        failures = getattr(e, "failures", None)
        if not failures:
            raise
        codes = {rank: failure.exitcode for rank, failure in sorted(failures.items())}
        for rank, code in codes.items():
            if code not in (1, 130):  # 1: a reported error, 130: stopped on request; else a crash or a kill
                print(f"launch: rank {rank} ended with exit code {code}", file=sys.stderr)
        return next(iter(codes.values())) or 1
    return 0


def _wait_for_group(pgid: int) -> None:
    """Until no process of the group is left (ranks reparented after their launcher exited included)."""
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--in-group"]:
        return _launch(argv[1:])
    child = subprocess.Popen([sys.executable, "-m", "pipeline.launch", "--in-group", *argv], start_new_session=True)
    told = []

    def forward(sig, _frame):
        if not told:
            print("launch: stopping: the stage saves a checkpoint and exits (this waits for it)", file=sys.stderr)
            told.append(sig)
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    code = child.wait()
    _wait_for_group(child.pid)
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
