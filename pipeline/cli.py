"""The command line every stage shares: `--recipe FILE`, `--force`, then `key.path=value` overrides."""

from __future__ import annotations

import argparse
import atexit
import errno
import os
import signal
import sys
from typing import Callable

from pipeline import artifacts
from pipeline.config import Recipe, UserError, load_recipe

DEFAULT_RECIPE = "stages/recipes/demo.yaml"


def parse(description: str, argv: list[str] | None = None) -> tuple[Recipe, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--recipe", default=DEFAULT_RECIPE, help="recipe YAML (default: the embedded demo)")
    parser.add_argument("--force", action="store_true", help="re-run even if the artifact is up to date")
    parser.add_argument("overrides", nargs="*", metavar="key.path=value", help="recipe overrides")
    args = parser.parse_intermixed_args(argv)  # `--force` may stand between overrides
    return load_recipe(args.recipe, args.overrides), args


def run(main: Callable[[], object]) -> None:
    """Run a stage's `main`: a mistake the user must fix ends it with one line, `error: ...`, and
    exit code 1; with RLHF_DEBUG=1 in the environment the traceback is shown as well.

    A rank torch elastic started (several processes) whose stage succeeded (every rank has passed
    its last barrier, nothing collective is in flight) then leaves at once, after the atexit handlers,
    without the interpreter's teardown: there gloo's and other libraries' C++ objects are destroyed in
    no set order, and a thread still joinable can abort the rank ("terminate called without an active
    exception", SIGABRT, seen once in CI): the launcher would report a finished run failed. A stage
    that stopped (an error, a checkpoint on request) exits the ordinary way: another rank may still
    be on its way out of a collective."""
    _run(main)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        atexit._run_exitfuncs()  # what the interpreter runs first at exit (logging's flush, finalizers)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _run(main: Callable[[], object]) -> None:
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
        print("stopped outside training: run the same command again (it resumes from the last checkpoint, if any)",
              file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        if not _disk_full(e) or os.environ.get("RLHF_DEBUG") == "1":
            raise
        # finished artifacts are never touched by a failed run; the work directory is kept to resume
        sys.exit(f"error: no space left on the device while writing {getattr(e, 'filename', None) or 'the run'}: "
                 f"free some space and run the same command again (finished artifacts are intact; checkpoints "
                 f"are kept)")
    finally:
        _exit_on_its_own()
        artifacts.release_locks()
        _end_process_group()


def _exit_on_its_own() -> None:
    """A rank torch elastic started ignores SIGTERM once its stage has ended: as soon as one rank has
    exited with an error (or after Ctrl-C, 130), elastic SIGTERMs the others, and a rank still leaving
    (saying its error, flushing, or in the interpreter's shutdown after an unexpected exception, where
    Python's own handlers are gone) would die of it: the launcher would report a kill, not the error
    the rank had said, or the checkpoint it had saved. (A Python handler cannot do better:
    finalisation resets it to the default, which is the kill. A rank that hung in its shutdown is
    still ended: elastic SIGKILLs what is left 30 s after its SIGTERM.)"""
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


def _end_process_group() -> None:
    """Tear the process group down before the interpreter exits: left to exit-time destructors,
    gloo's threads can abort a rank ("terminate called without an active exception") after the
    stage has finished. torch is only looked up, never imported, here (make's checks stay light)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
