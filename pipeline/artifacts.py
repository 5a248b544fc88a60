"""Stage artifacts: where each stage writes, how it proves it finished, and how the next finds it.

Every stage builds its artifact in `<run>/<stage>.partial/` and only when everything is written
puts `manifest.json` there (atomically) and swaps the directory into `<run>/<stage>/`. So:
- a directory with a manifest is complete; without one it is not, and later stages refuse it;
- a failed or interrupted re-run never damages the previous complete artifact;
- the manifest records the stage's fingerprint (its config + the fingerprints of its inputs), so a
  re-run with nothing changed is skipped, and a change upstream re-runs everything after it;
- it also records a build id, new on every build: downstream stages fingerprint their upstream by
  it, so a forced re-build of one stage (which keeps its fingerprint) still re-runs those after it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import shutil
import socket
import time
import uuid
from importlib import metadata
from pathlib import Path

from pipeline.config import ConfigError, UserError

MANIFEST = "manifest.json"
# Part of every fingerprint: artifacts from a version of this code with other manifest contents or
# fingerprint rules are out of date, never misread.
MANIFEST_FORMAT = 2
PACKAGES = ["torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"]

# Which make target produces each stage, for error messages.
MAKE_TARGET = {"base": "make base", "sft": "make sft", "rm": "make rm", "ppo": "make ppo", "eval": "make eval"}


_opened: list[Path] = []  # work directories this process began (see discard_untouched)


def discard_untouched() -> None:
    """After a user error: remove the work directories this process began that hold nothing yet but
    their fingerprint, so a mistake leaves nothing behind (a resumable partial run is kept)."""
    for partial in _opened:
        if partial.is_dir() and [p.name for p in partial.iterdir()] == ["fingerprint"]:
            shutil.rmtree(partial)


class StageBusy(UserError, RuntimeError):
    """The same stage of the same run is already running."""


_locks: dict[Path, int] = {}  # lock file -> descriptor, held by this process


def lock_stage(run_dir: Path, stage: str) -> None:
    """Hold `<run>/.<stage>.lock` while this process runs the stage: a second run of the same stage
    on the same run stops with the holder's pid instead of deleting its work directory.

    An flock, which the kernel releases when its process ends however it ends (SIGKILL, OOM), so a
    stale lock is never mistaken for a live one; the file holds the holder's pid and host for the
    message, and is emptied on a clean exit (so a leftover pid means the holder was killed)."""
    path = Path(run_dir) / f".{stage}.lock"
    if path in _locks:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()
        os.close(fd)
        who = f"pid {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
        raise StageBusy(f"{stage} is already running for {run_dir} ({who}): wait for it to finish, or stop it "
                        f"(Ctrl-C saves a checkpoint) and run again") from None
    holder = os.pread(fd, 200, 0).decode(errors="replace").split()
    if holder:
        print(f"{stage}: taking over the lock of pid {holder[0]} on {holder[1] if len(holder) > 1 else '?'}, "
              f"which ended without releasing it")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _locks[path] = fd


def _close_in_child() -> None:
    """Forked children (DataLoader workers, datasets' map processes) share the lock's open file and so
    would keep it held after the stage dies: they close their copy."""
    for fd in _locks.values():
        os.close(fd)
    _locks.clear()


os.register_at_fork(after_in_child=_close_in_child)


def release_locks() -> None:
    """On a clean exit: empty and release every stage lock this process holds."""
    while _locks:
        _, fd = _locks.popitem()
        os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor releases the flock


class DiskError(UserError, OSError):
    """Not enough free space, or an output directory that cannot be written."""


def check_writable(run_dir: Path) -> None:
    """Before anything is loaded: the run directory can be created and written to."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DiskError(f"cannot write to the run directory {run_dir} ({e.strerror or e}): set runs_dir to a "
                        f"writable directory") from None


def gigabytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def size(directory: Path) -> int:
    """Bytes the files under `directory` take on the disk."""
    return sum(f.stat().st_blocks * 512 for f in Path(directory).rglob("*") if f.is_file())


def check_free_space(directory: Path, need: int, what: str) -> None:
    """Before training: the disk holding `directory` has room for what the stage will write."""
    free = shutil.disk_usage(directory).free
    if free < need:
        raise DiskError(f"{directory} has {gigabytes(free)} free, but {what} need about {gigabytes(need)}: free "
                        f"some space or set runs_dir to a larger disk")


class MissingArtifact(UserError, RuntimeError):
    """An upstream stage has not produced a complete artifact."""


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON so that readers see either the old file or the whole new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


class CorruptManifest(UserError, RuntimeError):
    """A manifest that cannot be read (truncated by a full disk, edited by hand)."""


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a complete artifact; None if there is none. A manifest that cannot be read is
    an error naming the file and the command that rebuilds it (never a bare JSONDecodeError)."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or "fingerprint" not in manifest:
        stage = Path(directory).name
        fix = f"run `{MAKE_TARGET[stage]} FORCE=1` to rebuild it" if stage in MAKE_TARGET else "rebuild or remove it"
        raise CorruptManifest(f"{path} is corrupt (truncated or not a manifest): {fix}")
    return manifest


def require(directory: str | Path, stage: str) -> dict:
    """The manifest of a finished upstream stage, or an error saying which target to run."""
    manifest = read_manifest(directory)
    if manifest is None:
        state = "is incomplete (no manifest.json)" if Path(directory).exists() else "does not exist"
        raise MissingArtifact(f"the {stage} artifact {directory} {state}: run `{MAKE_TARGET[stage]}` first "
                              f"(with the same RECIPE)")
    return manifest


def build_id(manifest: dict) -> str:
    """What downstream stages know an artifact by (a manifest of an older format: its fingerprint,
    which no longer matches any current one, so whatever was built from it is re-built)."""
    return manifest.get("build_id") or manifest["fingerprint"]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def source_fingerprint(source: str) -> str:
    """Content hash of a local file or directory (a stage artifact: its build id); a hub id stands for
    itself (pin a revision in it)."""
    p = Path(source)
    if p.is_file():
        return file_digest(p)
    if p.is_dir():
        manifest = read_manifest(p)
        if manifest is not None:
            return build_id(manifest)
        h = hashlib.sha256()
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(str(f.relative_to(p)).encode())
            h.update(file_digest(f).encode())
        return h.hexdigest()
    return f"hub:{source}"


def fingerprint(config: dict, inputs: dict) -> str:
    blob = json.dumps({"format": MANIFEST_FORMAT, "config": config, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def package_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


class StageDir:
    """The output directory of one stage of one run."""

    def __init__(self, run_dir: str | Path, stage: str):
        self.stage = stage
        self.final = Path(run_dir) / stage
        self.partial = Path(run_dir) / f"{stage}.partial"

    def is_current(self, fp: str) -> bool:
        manifest = read_manifest(self.final)
        return manifest is not None and manifest.get("fingerprint") == fp

    def begin(self, fp: str, keep_partial: bool = False) -> Path:
        """Prepare the work directory. A partial run with the same fingerprint is kept if asked
        (resume); anything else left over from an older attempt is removed."""
        stamp = self.partial / "fingerprint"
        same = stamp.is_file() and stamp.read_text().strip() == fp
        if self.partial.exists() and not (keep_partial and same):
            shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        stamp.write_text(fp + "\n")
        _opened.append(self.partial)
        return self.partial

    def open(self, state, fp: str, force: bool, keep_partial: bool = False) -> Path | None:
        """For every process of a stage: None if the artifact is up to date (nothing to do), else the
        work directory, prepared by the main process before any process goes on."""
        if not force and self.is_current(fp):  # forced: a corrupt manifest is not even read
            state.print(f"{self.stage}: {self.final} is up to date (FORCE=1 to re-run)")
            return None
        if state.is_main_process:
            self.begin(fp, keep_partial=keep_partial)
        state.wait_for_everyone()
        return self.partial

    def commit(self, fp: str, config: dict, inputs: dict, metrics: dict, started: float) -> dict:
        """Write the manifest last, then swap the finished directory into place."""
        manifest = {
            "stage": self.stage,
            "fingerprint": fp,
            "build_id": uuid.uuid4().hex[:16],
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "duration_s": round(time.time() - started, 1),
            "inputs": inputs,
            "config": config,
            "versions": package_versions(),
            "metrics": metrics,
        }
        (self.partial / "fingerprint").unlink(missing_ok=True)
        write_json_atomic(self.partial / MANIFEST, manifest)
        old = self.final.with_name(self.final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if self.final.exists():
            os.replace(self.final, old)
        os.replace(self.partial, self.final)
        shutil.rmtree(old, ignore_errors=True)
        release_locks()  # complete: a new run of this stage may start (and will find it up to date)
        return manifest


def check_model_source(source: str, key: str) -> None:
    """A model named in the recipe, checked before anything is loaded: a local path must be a saved
    model directory; anything else is taken as a hub id (resolved when loaded, see `models.load_tokenizer`)."""
    path = Path(source).expanduser()
    local = source.startswith(("/", ".", "~")) or path.exists()
    if not local:
        return
    if not path.exists():
        raise ConfigError(f"{key}: '{source}' does not exist: set {key} to a saved model directory or a hub model id")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(f"{key}: '{source}' is not a saved model (a directory with config.json): set {key} to one, "
                          f"or to a hub model id")
