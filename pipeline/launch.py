"""How `make` starts a stage: `accelerate launch`, with two differences that matter at the terminal.

    python -m pipeline.launch [accelerate launch arguments] stages/ppo.py --recipe my.yaml ...

1. It returns only when every process of the stage has exited. After Ctrl-C the stage's ranks
   save a checkpoint before they exit, but `accelerate launch` returns at once (and with several
   processes torch elastic SIGKILLs the ranks 30 s later), so `make` would give the prompt back
   while they still write, and an immediate re-run would race them. Here the launcher runs in a
   process group of its own; Ctrl-C / SIGTERM (SIGHUP: as SIGTERM) are passed on to the whole group
   and this process waits until the group is empty (with several processes torch elastic passes the
   signal on to the ranks and waits for them, here up to 10 minutes). A third Ctrl-C kills the
   launcher's group.
2. A stage that fails has already said why (one line, or its traceback): its exit code is passed
   on without the launcher's own traceback (CalledProcessError / ChildFailedError) below it.
3. The stage follows its launcher. Killed outright (kill -9, a closed tmux pane, a scheduler ending
   the job's first process), this process could not pass anything on, and the group of its own would
   train on, orphaned, holding the run's lock after `make` has returned. The group's leader asks the
   kernel for a signal when this process dies (Linux: PR_SET_PDEATHSIG) and then stops the stage as
   on Ctrl-C: SIGTERM to its group, a checkpoint, exit; the same `make` then resumes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
STRAGGLER_WAIT_S = 10  # after the launcher itself has exited (its ranks have), for leftover group members
STOP_TIMEOUT_S = 600  # several processes: how long the ranks may take to save after Ctrl-C


def exit_code(code: int) -> int:
    """A process's code as a shell reports it: 128 + N for death by signal N."""
    return 128 - code if code < 0 else code


PR_SET_PDEATHSIG = 1  # linux/prctl.h
PARENT_DEATH = signal.SIGUSR1  # a signal of its own: the forwarded ones also reach the group's leader


def _follow_parent(parent: int) -> None:
    """When `parent` (the launcher make started) dies, SIGTERM this process group: the stage saves a
    checkpoint and exits as on Ctrl-C (with several processes, torch elastic passes it to the ranks)."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere a killed launcher still orphans its stage
    signal.signal(PARENT_DEATH, lambda *_: os.killpg(os.getpgrp(), signal.SIGTERM))
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, PARENT_DEATH)
    if os.getppid() != parent:  # it died before the request was in place
        os.killpg(os.getpgrp(), signal.SIGTERM)


def _launch(argv: list[str]) -> int:
    """`accelerate launch` in this process, its failures reduced to the stage's exit code."""
    from accelerate.commands.launch import launch_command, launch_command_parser

    # Several processes: torch elastic starts each rank in a session of its own and passes the signal
    # on to them, then SIGKILLs them after TORCH_ELASTIC_SHUTDOWN_TIMEOUT (30 s by default, less than
    # a large model's rollout and checkpoint take): they get STOP_TIMEOUT_S. Its per-rank failure log
    # repeats what the stage has reported (other exits are reported below).
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(STOP_TIMEOUT_S))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    for sig in FORWARDED:  # one process: it is in this group, so it has the signal; wait for it
        signal.signal(sig, lambda *_: None)
    try:
        launch_command(launch_command_parser().parse_args(argv))
    except subprocess.CalledProcessError as e:  # one process: the stage's own exit code
        return exit_code(e.returncode)
    except Exception as e:  # several processes
        if type(e).__name__ == "SignalException":  # elastic passed the stop on and the ranks have exited
            return 130
        if not hasattr(e, "get_first_failure"):  # ChildFailedError names each failed rank
            raise
        codes = {rank: exit_code(failure.exitcode) for rank, failure in sorted(e.failures.items())}
        for rank, code in codes.items():
            if code not in (1, 130):  # 1: a reported error, 130: stopped on request; else a crash or a kill
                print(f"launch: rank {rank} ended with exit code {code}", file=sys.stderr)
        if codes.get(0) != 1 and 1 in codes.values():  # rank 0 reports errors; these ranks had their own
            print(
                f"launch: ranks {[r for r, c in codes.items() if c == 1]} stopped with an error of their own: "
                f"run again with RLHF_DEBUG=1 to see it",
                file=sys.stderr,
            )
        return exit_code(e.get_first_failure()[1].exitcode) or 1
    return 0


def _wait_for_group(pgid: int, deadline: float) -> None:
    """Until no process of the group is left (ranks reparented after their launcher exited included)."""
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--in-group"]:
        _follow_parent(int(argv[1]))
        return _launch(argv[2:])
    child = subprocess.Popen(
        [sys.executable, "-m", "pipeline.launch", "--in-group", str(os.getpid()), *argv], start_new_session=True
    )
    received = []

    def forward(sig, _frame):
        received.append(sig)
        # 1st and 2nd: the stage saves and exits; 3rd: killed. SIGHUP (a closed terminal) as SIGTERM,
        # which the stages handle; the default for SIGHUP would end them without a checkpoint.
        send = signal.SIGKILL if len(received) >= 3 else signal.SIGTERM if sig == signal.SIGHUP else sig
        try:
            os.killpg(child.pid, send)
        except ProcessLookupError:
            pass
        try:  # after a closed terminal, writing may fail: that must not stop the forwarding
            if len(received) == 1:
                print(
                    "launch: stopping: the stage saves a checkpoint and exits (Ctrl-C twice more kills it)",
                    file=sys.stderr,
                )
            elif send == signal.SIGKILL:
                print("launch: killed: what was done since the last checkpoint is lost", file=sys.stderr)
        except OSError:
            pass

    for sig in FORWARDED:
        signal.signal(sig, forward)
    code = child.wait()
    _wait_for_group(child.pid, time.time() + STRAGGLER_WAIT_S)
    return exit_code(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
