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
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from pipeline.errors import ConfigError, CorruptManifest, DiskError, MissingArtifact, RecipeChanged, StageBusy

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
    their stamp, so a mistake leaves nothing behind (a resumable partial run is kept)."""
    for partial in _opened:
        if partial.is_dir() and {p.name for p in partial.iterdir()} <= {STAMP, PLAN}:
            shutil.rmtree(partial)


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
        raise StageBusy(
            f"{stage} is already running for {run_dir} ({who}): wait for it to finish, or stop it "
            f"(Ctrl-C saves a checkpoint) and run again"
        ) from None
    holder = os.pread(fd, 200, 0).decode(errors="replace").split()
    if holder:
        print(
            f"{stage}: taking over the lock of pid {holder[0]} on {holder[1] if len(holder) > 1 else '?'}, "
            f"which ended without releasing it"
        )
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


def check_writable(run_dir: Path) -> None:
    """Before anything is loaded: the run directory can be created and written to."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise DiskError(
            f"cannot write to the run directory {run_dir} ({e.strerror or e}): set runs_dir to a writable directory"
        ) from None


def gigabytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def size(directory: Path) -> int:
    """Bytes the files under `directory` take on the disk."""
    return sum(f.stat().st_blocks * 512 for f in Path(directory).rglob("*") if f.is_file())


def check_free_space(directory: Path, need: int, what: str) -> None:
    """Before training: the disk holding `directory` has room for what the stage will write."""
    free = shutil.disk_usage(directory).free
    if free < need:
        raise DiskError(
            f"{directory} has {gigabytes(free)} free, but {what} need about {gigabytes(need)}: free "
            f"some space or set runs_dir to a larger disk"
        )


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON so that readers see either the old file or the whole new one, never half."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


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
        raise MissingArtifact(
            f"the {stage} artifact {directory} {state}: run `{MAKE_TARGET[stage]}` first (with the same RECIPE)"
        )
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


STAMP, PLAN = "fingerprint", "plan.json"  # in a work directory: the fingerprint it is built for, and its plan
# A checkpoint a resumed run goes on from (pipeline/rl/run_state.py's, the Trainer's), complete once this is written.
CHECKPOINT_MARKERS = ("checkpoint*/ppo_state.json", "checkpoints/checkpoint-*/trainer_state.json")


@dataclass
class Resume:
    """How a stage that checkpoints treats the work directory an interrupted run of it left."""

    safe: tuple[str, ...] = ()
    """Keys of the plan record whose change cannot alter the run (`plans`): resumed across, saying which
    changed. `*` matches any text; a key matches its whole subtree."""
    changed: bool = False
    """Resume across any change (`RESUME=1`, `--resume`)."""
    force: bool = False
    """Start over (`FORCE=1`): checkpoints are moved aside, never deleted."""


def flatten(node, prefix: str = "") -> dict:
    """A nested recipe section as dotted keys: {'ppo.rewards[0].timeout_s': 5.0, ...}."""
    if isinstance(node, dict) and node:
        return {
            k: v
            for key, value in node.items()
            for k, v in flatten(value, f"{prefix}.{key}" if prefix else str(key)).items()
        }
    if isinstance(node, list) and node:
        return {k: v for i, value in enumerate(node) for k, v in flatten(value, f"{prefix}[{i}]").items()}
    return {prefix: node}


UNSET = object()  # a key one of two recipes does not have


def recipe_changes(old: dict, new: dict) -> list[str]:
    """The keys in which two plan records (`plans.Plan.record`) differ: recipe settings dotted, inputs
    as 'inputs:<name>' (data files, a reward function's code, an upstream artifact's build)."""
    a, b = flatten(old.get("config", {})), flatten(new.get("config", {}))
    settings = [k for k in sorted(a.keys() | b.keys()) if a.get(k, UNSET) != b.get(k, UNSET)]
    ins_a, ins_b = old.get("inputs", {}), new.get("inputs", {})
    return settings + [f"inputs:{k}" for k in sorted(ins_a.keys() | ins_b.keys()) if ins_a.get(k) != ins_b.get(k)]


def _matches(key: str, pattern: str) -> bool:
    """`key` is `pattern` (where `*` stands for text without brackets: one list index, one label) or
    lies under it."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", r"[^\[\]]*"), key) is not None or key.startswith(
        (pattern + ".", pattern + "[")
    )


def describe_changes(keys: list[str], old: dict, new: dict, most: int = 6) -> str:
    """The changed keys of `recipe_changes` in words, for a one-line message: "ppo.learning_rate
    0.0003 -> 0.001, the code of ppo.rewards 'correct'"."""
    a, b = flatten(old.get("config", {})), flatten(new.get("config", {}))
    short = lambda v: "unset" if v is UNSET else repr(v) if len(repr(v)) <= 40 else "(changed)"  # noqa: E731
    said = []
    for key in keys:
        if not key.startswith("inputs:"):
            said.append(f"{key} {short(a.get(key, UNSET))} -> {short(b.get(key, UNSET))}")
            continue
        name = key[len("inputs:") :]
        before, after = old.get("inputs", {}).get(name), new.get("inputs", {}).get(name)
        if name.endswith("_manifest"):
            said.append(f"the {name[: -len('_manifest')]} artifact (built again)")
        elif ":" in name:  # a reward source or judge: 'ppo.rewards:<label>'
            section, label = name.split(":", 1)
            kind = "code" if "function" in (after or before or {}) else "model"
            said.append(f"the {kind} of {section} '{label}'")
        elif isinstance(before, dict) and isinstance(after, dict):  # {file: content hash}
            said += [
                f"the data in {path}"
                for path in sorted(before.keys() | after.keys())
                if before.get(path) != after.get(path)
            ]
        else:
            said.append(name)
    return ", ".join(said[:most]) + (f" and {len(said) - most} more" if len(said) > most else "")


class StageDir:
    """The output directory of one stage of one run."""

    def __init__(self, run_dir: str | Path, stage: str):
        self.stage = stage
        self.final = Path(run_dir) / stage
        self.partial = Path(run_dir) / f"{stage}.partial"

    def is_current(self, fp: str) -> bool:
        manifest = read_manifest(self.final)
        return manifest is not None and manifest.get("fingerprint") == fp

    def begin(self, fp: str, record: dict | None = None, resume: Resume | None = None) -> Path:
        """Prepare the work directory, stamped with the fingerprint and the plan `record` it is built
        for. Without `resume`, whatever an older attempt left is removed. With it, what an interrupted
        run left is kept when it was built for the same fingerprint; and when it holds a checkpoint
        (`CHECKPOINT_MARKERS`) it is never deleted: a recipe changed only in `resume.safe` keys (any,
        with `resume.changed`) resumes, saying which keys changed; another change stops with one line
        (RecipeChanged) naming them and the two ways on; `resume.force` moves it aside."""
        if self.partial.exists() and not (resume is not None and self._resumable(fp, record, resume)):
            if resume is not None and self.holds_checkpoint():
                aside = self.partial.with_name(f"{self.stage}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
                while aside.exists():
                    aside = aside.with_name(aside.name + "-")
                os.replace(self.partial, aside)
                print(
                    f"{self.stage}: starting over; the interrupted run's checkpoints were moved to {aside} (delete "
                    f"it when you no longer need them)"
                )
            else:
                shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        (self.partial / STAMP).write_text(fp + "\n")
        if record is not None:
            write_json_atomic(self.partial / PLAN, record)
        _opened.append(self.partial)
        return self.partial

    def holds_checkpoint(self) -> bool:
        return any(any(self.partial.glob(marker)) for marker in CHECKPOINT_MARKERS)

    def _resumable(self, fp: str, record: dict | None, resume: Resume) -> bool:
        """Whether to go on from what an interrupted run left (see `begin`)."""
        stamp = self.partial / STAMP
        if resume.force:
            return False
        if stamp.is_file() and stamp.read_text().strip() == fp:
            return True
        if not self.holds_checkpoint():
            return False  # nothing worth keeping: the logs of a run that never saved
        try:
            old = json.loads((self.partial / PLAN).read_text())
        except (OSError, json.JSONDecodeError):
            old = None
        if old is None or record is None:
            said, altering = "which keys is unknown: its checkpoint predates recorded recipes", True
        else:
            keys = recipe_changes(old, record)
            altering = [k for k in keys if not any(_matches(k, pattern) for pattern in resume.safe)]
            said = describe_changes(keys, old, record)
        target = MAKE_TARGET[self.stage]
        if not altering:
            print(f"{self.stage}: resuming across recipe changes that do not alter the run: {said}")
        elif resume.changed:
            print(f"{self.stage}: resuming under the changed recipe, as asked (RESUME=1): {said}")
        else:
            if old is not None:
                said = describe_changes(altering, old, record)
            raise RecipeChanged(
                f"{self.stage}: the recipe changed since the interrupted run's last checkpoint ({said}): "
                f"`{target} RESUME=1` (--resume) goes on from that checkpoint under the new recipe; "
                f"`{target} FORCE=1` starts over, moving the checkpoints aside"
            )
        return True

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
        for stamp in (STAMP, PLAN):
            (self.partial / stamp).unlink(missing_ok=True)
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


def check_model_source(source: str, key: str, adapter: bool = False) -> None:
    """A model named in the recipe, checked before anything is loaded: a local path must be a saved
    model directory (`adapter`: or a PEFT adapter's, with adapter_config.json); anything else is taken
    as a hub id (resolved when loaded, see `models.load_tokenizer`)."""
    path = Path(source).expanduser()
    local = source.startswith(("/", ".", "~")) or path.exists()
    if not local:
        return
    if not path.exists():
        raise ConfigError(f"{key}: '{source}' does not exist: set {key} to a saved model directory or a hub model id")
    saved = path.is_dir() and ((path / "config.json").is_file() or adapter and (path / "adapter_config.json").is_file())
    if not saved:
        what = (
            "a directory with config.json, or a PEFT adapter's with adapter_config.json"
            if adapter
            else "a directory with config.json"
        )
        raise ConfigError(f"{key}: '{source}' is not a saved model ({what}): set {key} to one, or to a hub model id")


def adapter_base(path) -> str | None:
    """The base model of a local PEFT adapter directory (its adapter_config.json); None for anything else."""
    config = Path(str(path)) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    if not base:
        raise ConfigError(
            f"the adapter in '{path}' names no base model (base_model_name_or_path in adapter_config.json): set it"
        )
    return base
