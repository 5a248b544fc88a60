"""The life of a stage's process: what it sets up before the ML libraries load, and how it ends (one
line for a mistake the user must fix, the stage's exit code however it ended, no interpreter teardown).
Every stage script calls `before_libraries()` first and `run_and_exit(main)` last."""

from __future__ import annotations

import atexit
import ctypes
import errno
import gc
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import NoReturn

from pipeline import artifacts
from pipeline.errors import UserError

_deferred_from: tuple[int, ...] | None = None  # the collector's thresholds before `before_libraries`


def before_libraries() -> None:
    """The first call of a script that loads the ML libraries (under `if __name__ == "__main__"`), to
    set up its process while they have not loaded yet:

    - CPython's full collections wait: while torch, transformers and datasets load (~400k objects),
      each would scan every object loaded so far. The third threshold of the generational collector
      holds them off (CPython up to 3.13; a no-op where a collector ignores it); the young generations'
      collections go on. `run_and_exit` then freezes what was loaded, so that no later collection
      scans it, and puts the thresholds back.
    - MKL's buffer pool is off (`MKL_DISABLE_FAST_MM=1`; MKL reads any value as off). MKL (torch's
      matrix products on x86 CPUs) keeps each product's workspace in a pool for the life of the
      process, and with more than one thread the pool grows with every new matrix shape; ours change
      from batch to batch (unpadded forwards, batches of varied lengths). Without it each product
      takes its workspace from malloc, which reuses freed blocks. MKL reads the variable when torch
      loads it, hence here. (Measured: docs/benchmarks.md, "Start-up and exit".)"""
    global _deferred_from
    _deferred_from = gc.get_threshold()
    gc.set_threshold(*_deferred_from[:2], 1 << 30)
    os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")


def run_and_exit(main: Callable[[], object]) -> NoReturn:
    """A stage script's entry point (`if __name__ == "__main__"`): `run`, then the process ends with
    the stage's exit code however the stage ended (done, an error, stopped on request), after the
    atexit handlers but without the interpreter's teardown (`_leave`), and never tears a process group
    down.

    In a multi-process run: freeing a gloo process group joins its worker threads with the GIL held,
    and a worker that has not yet let go of the last collective's tensor needs the GIL to do so: a
    deadlock (seen on a busy machine after a NaN: the rank hung until torch elastic SIGKILLed it). And
    in the teardown gloo's and other libraries' C++ objects are destroyed in no set order ("terminate
    called without an active exception" aborted a finished rank). Either way the launcher would report
    a kill, not what the stage said. (A rank leaving on an error of its own, with the others still in a
    collective, ends that collective for them: they fail on the closed connection, and the launcher
    stops them.) In any process: the teardown frees every module, tensor and object one by one, and
    everything the stage writes is closed or flushed before it (its own files, the trackers it ends,
    logging's atexit flush), so it does no work anyone sees, and it is skipped. An unexpected exception
    prints its traceback and exits 1, as Python would."""
    gc.freeze()  # what the script imported (see before_libraries)
    if _deferred_from is not None:
        gc.set_threshold(*_deferred_from)
    try:
        run(main)
    except SystemExit as e:
        _leave(e.code)
    except KeyboardInterrupt:
        _leave(130)
    except BaseException:
        _say(traceback.print_exc)
        _leave(1)
    _leave(0)


def _leave(code: int | str | None) -> NoReturn:
    """`sys.exit(code)` in effect, without the interpreter's teardown: as at a normal exit, the
    threads a library left running are waited for (after its thread pools are told to finish) and the
    atexit handlers run (logging's flush, finalizers, temporary directories); then Python's and C's
    output streams are flushed and the process ends."""
    if isinstance(code, str):
        _say(lambda: print(code, file=sys.stderr))
    threading._shutdown()  # what the interpreter's exit does first: thread pools' exit hooks, then the join
    atexit._run_exitfuncs()
    _say(sys.stdout.flush)
    _say(sys.stderr.flush)
    _say(lambda: ctypes.CDLL(None).fflush(None))  # C libraries' buffered output (stdio)
    os._exit(1 if isinstance(code, str) else code or 0)


def _say(write: Callable[[], object]) -> None:
    """A write to the terminal that may fail (a closed terminal: EIO, EPIPE) without keeping the
    process from leaving with its code."""
    try:
        write()
    except OSError:
        pass


def run(main: Callable[[], object]) -> None:
    """Run a stage's `main` in this process: a mistake the user must fix ends it with one line,
    `error: ...`, and exit code 1 (SystemExit); with RLHF_DEBUG=1 in the environment the traceback is
    shown as well. Scripts call it through `run_and_exit`."""
    try:
        main()
    except UserError as e:
        artifacts.discard_untouched()
        if os.environ.get("RLHF_DEBUG") == "1":
            raise
        # every rank meets the same error (settings and data are read by all): one of them says it;
        # an error one rank alone can meet (a reward function failing on its rollouts) is said by that rank
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            sys.exit(f"error: {e}")
        sys.exit(f"error (process {rank}): {e}" if getattr(e, "on_one_rank", False) else 1)
    except KeyboardInterrupt:  # Ctrl-C outside training (training itself saves a checkpoint and exits 130)
        print(
            "stopped outside training: run the same command again (it resumes from the last checkpoint, if any)",
            file=sys.stderr,
        )
        sys.exit(130)
    except Exception as e:
        if not _disk_full(e) or os.environ.get("RLHF_DEBUG") == "1":
            raise
        # finished artifacts are never touched by a failed run; the work directory is kept to resume
        sys.exit(
            f"error: no space left on the device while writing {getattr(e, 'filename', None) or 'the run'}: "
            f"free some space and run the same command again (finished artifacts are intact; checkpoints "
            f"are kept)"
        )
    finally:
        _exit_on_its_own()
        artifacts.release_locks()


def _exit_on_its_own() -> None:
    """A rank torch elastic started ignores SIGTERM once its stage has ended: as soon as one rank has
    exited with an error (or after Ctrl-C, 130), elastic SIGTERMs the others, and a rank still leaving
    (saying its error, running the atexit handlers, flushing) would die of it: the launcher would
    report a kill, not the error the rank had said, or the checkpoint it had saved. (A rank that hung
    on its way out is still ended: elastic SIGKILLs what is left 30 s after its SIGTERM.)"""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _disk_full(e: BaseException | None) -> bool:
    """ENOSPC anywhere in the exception's chain: an OSError from Python's own writes, or the messages
    of torch.save ("file write failed") and safetensors ("StorageFull"), which raise other types."""
    while e is not None:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if any(m in str(e) for m in ("No space left on device", "StorageFull", "file write failed")):
            return True
        e = e.__cause__ or e.__context__
    return False
