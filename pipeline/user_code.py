"""The user's Python code the RL stage calls (reward functions and judges): where it is, what it
depends on, importing it, and calling it with a deadline.

- Where: `path/to/file.py:name` is looked up relative to the recipe's directory, then the working
  directory; `package.module:name` imports from those two directories, then installed packages.
- Importing a file: its directory goes first on `sys.path`, as when Python runs the file, so its
  siblings import; the module is registered in `sys.modules` under its file name (unless another
  module holds that name), so dataclasses, pickling and a later `import my_rewards` see this module.
- What it depends on (`fingerprint`): its file and every local module it imports, found by reading
  the import statements (nothing is imported: `make` asks before anything heavy loads). Editing a
  helper the function imports re-runs the stage; installed packages are the environment's.
- Calling (`call`): in the main thread, because libraries that time themselves out with
  `signal.alarm` (math_verify) work only there; a watchdog thread interrupts the call at its deadline
  with a signal. Async functions run on one event loop that lives as long as the process (trl does the
  same), so a module-level `asyncio.Semaphore` keeps working, and several run concurrently.

Nothing here imports torch: `pipeline.plans` fingerprints through it.
"""

from __future__ import annotations

import ast
import asyncio
import concurrent.futures
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import signal
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, RewardError

# A call past its deadline by this much more has not reacted to the interrupt (stuck in C code):
# its process says why and ends, so the other processes are not left waiting in a collective.
HARD_STOP_S = 30.0
INTERRUPT = signal.SIGURG  # ignored by default: one that arrives after the call has returned is harmless


def one_line(e: BaseException | str) -> str:
    return " ".join(str(e).split())


def split_spec(spec: str) -> tuple[str, str]:
    """'pkg.module:name' or 'dir/file.py:name' -> (module or file, name)."""
    module, _, name = spec.rpartition(":")
    return module, name


def search_dirs(base_dir: str | None) -> list[Path]:
    """Where a relative file or a local module is looked for: the recipe's directory, then the working one."""
    dirs = [Path(base_dir).resolve()] if base_dir else []
    cwd = Path.cwd().resolve()
    return dirs + ([cwd] if cwd not in dirs else [])


def find_file(path: str, base_dir: str | None) -> Path | None:
    """A reward function's file: absolute, or relative to the recipe's directory, then the working one."""
    candidates = [Path(path)] if Path(path).is_absolute() else [d / path for d in search_dirs(base_dir)]
    return next((p.resolve() for p in candidates if p.is_file()), None)


def _module_files(dotted: str, roots: list[Path]) -> list[Path]:
    """The local files `import dotted` executes (its packages' `__init__.py` and the module), from the
    first root that has it; [] if none does (an installed or standard-library module)."""
    parts = dotted.split(".")
    for root in roots:
        leaf = root.joinpath(*parts)
        for found in (leaf.with_suffix(".py"), leaf / "__init__.py"):
            if found.is_file():
                inits = [root.joinpath(*parts[:i], "__init__.py") for i in range(1, len(parts))]
                return [p for p in inits if p.is_file()] + [found]
    return []


@functools.cache
def _installation() -> tuple[Path, ...]:
    return tuple(Path(sysconfig.get_paths()[key]).resolve() for key in ("purelib", "platlib", "stdlib"))


def _outside_environment(path: Path) -> bool:
    """Not part of the Python installation or its site-packages (a local root may hold a virtualenv)."""
    return not any(root in path.parents for root in _installation()) and "site-packages" not in path.parts


def local_closure(file: Path, base_dir: str | None) -> list[Path]:
    """`file` and every local module it imports, directly or through others (absolute imports from
    the importing file's directory, the recipe's and the working directory; relative imports from
    its package). Imports anywhere in a file count, those inside functions too."""
    seen, todo = set(), [file.resolve()]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            tree = ast.parse(current.read_text(), filename=str(current))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # importing it will say what is wrong
        roots = [current.parent, *search_dirs(base_dir)]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names, where = [a.name for a in node.names], roots
            elif isinstance(node, ast.ImportFrom) and node.level:  # from . import x / from .m import y
                if node.level > len(current.parents):
                    continue
                prefix = f"{node.module}." if node.module else ""
                names = ([node.module] if node.module else []) + [prefix + a.name for a in node.names]
                where = [current.parents[node.level - 1]]
            elif isinstance(node, ast.ImportFrom):  # from m import x: x may be a submodule
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                where = roots
            else:
                continue
            for name in names:
                todo += [p.resolve() for p in _module_files(name, where) if _outside_environment(p.resolve())]
    return sorted(seen)


def fingerprint(spec: str, base_dir: str | None, key: str) -> dict:
    """What a function's scores depend on besides the recipe: the content of its file and of the local
    modules it imports (`local_closure`); an installed module counts by its own file. One line naming
    `key` when the file or module cannot be found."""
    module, _ = split_spec(spec)
    if module.endswith(".py"):
        found = [find_file(module, base_dir)]
        if found[0] is None:
            raise ConfigError(f"{key}: file '{module}' not found in {' or '.join(map(str, search_dirs(base_dir)))}")
    else:  # a local module with its packages' __init__.py, or an installed one's file
        found = _module_files(module, search_dirs(base_dir)) or [_installed_file(module, base_dir)]
        if found[0] is None:
            raise ConfigError(
                f"{key}: cannot find module '{module}' (looked in "
                f"{', '.join(map(str, search_dirs(base_dir)))} and the installed packages)"
            )
    files = sorted({f for start in found for f in local_closure(start, base_dir)})
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return {"function": spec, "files": [f.name for f in files], "fingerprint": h.hexdigest()}


def _installed_file(module: str, base_dir: str | None) -> Path | None:
    """An installed module's file, found without importing it (its parent packages are imported)."""
    importable(base_dir)
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    origin = getattr(found, "origin", None)
    return Path(origin) if origin not in (None, "built-in", "frozen") else None


def importable(base_dir: str | None) -> None:
    """Modules import from the recipe's directory and the working directory before the installed
    packages, as `fingerprint` looks them up. (Stages are launched as `stages/ppo.py`, whose folder,
    not the working directory, is on the path.)"""
    for d in reversed([str(d) for d in search_dirs(base_dir)]):
        if d in sys.path:
            sys.path.remove(d)
        sys.path.insert(0, d)


def load(spec: str, base_dir: str | None, who: str) -> Callable:
    """'pkg.module:name' or 'file.py:name' -> the callable, or one line (RewardError) naming `who`."""
    module, name = split_spec(spec)
    try:
        if module.endswith(".py"):
            path = find_file(module, base_dir)
            if path is None:
                raise RewardError(f"{who}: file '{module}' not found in {' or '.join(map(str, search_dirs(base_dir)))}")
            mod = _import_file(path)
        else:
            importable(base_dir)
            mod = importlib.import_module(module)
    except ImportError as e:
        raise RewardError(f"{who}: cannot import '{module}' ({one_line(e)})") from None
    except RewardError:
        raise
    except Exception as e:  # a syntax error, or a module that fails while importing
        raise RewardError(f"{who}: importing '{module}' raised {type(e).__name__}: {one_line(e)}") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise RewardError(f"{who}: '{module}' has no function '{name}'")
    return fn


_imported: dict[Path, tuple[int, int]] = {}  # file -> (mtime, size) when this process imported it


def _import_file(path: Path):
    """The module of a file under a stable name, its directory importable: imported once per process
    (a reward and a judge from one file share the module and its state), again if the file changed."""
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    name, stat = path.stem, path.stat()
    held = sys.modules.get(name)
    if held is not None and not (getattr(held, "__file__", None) and Path(held.__file__).resolve() == path):
        name = f"{path.stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"  # another module has the name
        held = sys.modules.get(name)
    if held is not None and _imported.get(path) == (stat.st_mtime_ns, stat.st_size):
        return held
    _imported[path] = (stat.st_mtime_ns, stat.st_size)
    found = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(found)
    sys.modules[name] = module  # before it runs: a @dataclass in it looks its module up there
    try:
        found.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def is_async(fn: Callable) -> bool:
    """A coroutine function, a partial of one, or an object whose `__call__` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))  # noqa: B004


class _Expired(BaseException):
    """Raised in the main thread when a call passes its deadline (a BaseException: a function's own
    `except Exception` does not swallow it)."""


def late(who: str, timeout_s: float) -> str:
    """What a call past its deadline says."""
    return f"{who} did not return within timeout_s = {timeout_s:g} s: make it faster, or raise its timeout_s"


def call(fn: Callable, kwargs: dict, timeout_s: float, who: str) -> Any:
    """`fn(**kwargs)` in this thread; a RewardError naming `who` if it takes longer than `timeout_s`.

    The call's watchdog sends the main thread a signal at the deadline, whose handler raises: a sleep,
    a socket read or any Python code stops there. A call stuck in C code that never returns to Python
    cannot be stopped that way: HARD_STOP_S later the process says why and ends. Outside the main
    thread (where no handler can be set) the call has no deadline."""
    if threading.current_thread() is not threading.main_thread():
        return fn(**kwargs)
    active, fired, returned = [True], threading.Event(), threading.Event()

    def expire(*_):  # (a late signal of an earlier call's watchdog finds `fired` unset: ignored)
        if fired.is_set() and active[0]:
            raise _Expired

    def watchdog():
        if returned.wait(timeout_s):
            return
        fired.set()
        signal.pthread_kill(threading.main_thread().ident, INTERRUPT)
        if not returned.wait(HARD_STOP_S):
            print(
                f"error: {who} did not return within timeout_s = {timeout_s:g} s and cannot be interrupted "
                f"(stuck outside Python): stopping the process",
                file=sys.stderr,
                flush=True,
            )
            os._exit(1)

    previous = signal.signal(INTERRUPT, expire)
    threading.Thread(target=watchdog, daemon=True, name="reward-deadline").start()
    try:
        try:
            return fn(**kwargs)
        finally:
            active[0] = False
            returned.set()
    except _Expired:
        raise RewardError(late(who, timeout_s)) from None
    finally:
        signal.signal(INTERRUPT, previous if previous is not None else signal.SIG_DFL)  # (None: set from C)


_loop: asyncio.AbstractEventLoop | None = None


def event_loop() -> asyncio.AbstractEventLoop:
    """The process's one event loop for async reward functions, running in a daemon thread. (trl's
    `start_event_loop_in_daemon` does the same, but importing trl.trainer.utils loads the Trainer's
    stack, peft and bitsandbytes: seconds that a PPO process otherwise never spends.)"""
    global _loop
    if _loop is None:
        loop = asyncio.new_event_loop()

        def run():
            asyncio.set_event_loop(loop)
            loop.run_forever()

        threading.Thread(target=run, daemon=True, name="reward-functions").start()
        _loop = loop
    return _loop


def start(fn: Callable, kwargs: dict) -> concurrent.futures.Future:
    """An async function's call, started on the process's event loop; its result with `wait`."""
    return asyncio.run_coroutine_threadsafe(fn(**kwargs), event_loop())


def wait(future: concurrent.futures.Future, deadline: float, timeout_s: float, who: str) -> Any:
    """The result of `start`, or a RewardError naming `who` at the deadline (the call is cancelled)."""
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise RewardError(late(who, timeout_s)) from None
