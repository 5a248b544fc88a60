"""Faults a user meets, injected: two runs of one stage at once, a killed run's stale lock, a truncated
manifest, a full disk, an unwritable run directory, Ctrl-C at the terminal, and a stage error seen
through `make` (its one line, no launcher traceback)."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import namedtuple

import pytest
import transformers

from pipeline import process
from pipeline.artifacts import read_manifest
from pipeline.errors import DiskError
from stages import ppo, sft
from tests.conftest import REPO, base_overrides, ppo_args, read_jsonl, sft_args, sft_overrides
from tests.test_resume import kill_when, start

pytestmark = pytest.mark.e2e  # whole stages, several processes

LAUNCH = [
    sys.executable,
    "-m",
    "pipeline.launch",
    "--num_processes",
    "1",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def training_began(partial):
    return lambda: (partial / "metrics.jsonl").is_file() and '"loss"' in (partial / "metrics.jsonl").read_text()


def test_a_second_run_of_a_running_stage_stops_and_a_killed_runs_lock_is_taken_over(tmp_path, base_model):
    args = sft_args(tmp_path, base_model, "sft.trainer.num_train_epochs=30")  # outlasts the second's start-up
    partial = tmp_path / "demo" / "sft.partial"
    first = start("sft", args)
    deadline = time.time() + 300
    while not training_began(partial)():
        assert first.poll() is None and time.time() < deadline
        time.sleep(0.05)
    second = subprocess.run(
        [sys.executable, "stages/sft.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 1 and "Traceback" not in second.stderr
    assert second.stderr.strip().splitlines()[-1] == (
        f"error: sft is already running for {tmp_path}/demo (pid {first.pid} on {socket.gethostname()}): wait for it "
        f"to finish, or stop it (Ctrl-C saves a checkpoint) and run again"
    )
    assert partial.is_dir()  # the running stage's work directory was left alone
    kill_when(first, lambda: True)  # SIGKILL: the lock file still names it, but nobody holds the lock
    third = start("sft", sft_args(tmp_path, base_model))  # (another recipe: no need to wait for 30 epochs)
    output = third.communicate(timeout=300)[0]
    assert third.returncode == 0, output[-3000:]
    assert f"sft: taking over the lock of pid {first.pid} on {socket.gethostname()}, which ended without" in output
    assert read_manifest(tmp_path / "demo" / "sft") is not None
    assert (tmp_path / "demo" / ".sft.lock").read_text() == ""  # released cleanly


def make(target: str, overrides: list[str], *variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", target, f"ARGS={' '.join(overrides)}", *variables],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_truncated_manifest_is_named_with_its_fix_and_force_rebuilds_it(tmp_path, base_model):
    overrides = [*base_overrides(base_model), *sft_overrides(tmp_path, base_model)]
    sft.main(["--recipe", "stages/recipes/demo.yaml", *overrides[len(base_overrides(base_model)) - 1 :]])
    manifest = tmp_path / "demo" / "sft" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])  # as a full disk leaves it
    failed = make("rm", overrides)
    assert failed.returncode != 0 and "Traceback" not in failed.stderr + failed.stdout
    assert f"error: {manifest} is corrupt (truncated or not a manifest): run `make sft FORCE=1` to rebuild it" in (
        failed.stderr
    )
    rebuilt = make("sft", overrides, "FORCE=1")
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert read_manifest(manifest.parent)["stage"] == "sft"
    transformers.AutoModelForCausalLM.from_pretrained(manifest.parent)


def fake_disk(free: int):
    usage = namedtuple("usage", "total used free")
    return lambda path: usage(free * 4, free * 3, free)


def test_a_full_disk_is_found_before_training_and_leaves_the_finished_artifact_alone(runs_with_rm, monkeypatch):
    before = read_manifest(runs_with_rm / "demo" / "sft")["build_id"]
    monkeypatch.setattr(shutil, "disk_usage", fake_disk(2**19))  # 0.5 MiB free; the tiny models need a few
    with pytest.raises(
        DiskError,
        match=r"has 0.5 MiB free, but the ppo artifact and its checkpoints need about "
        r"[0-9.]+ MiB: free some space or set runs_dir to a larger disk",
    ):
        ppo.main(ppo_args(runs_with_rm))
    assert not (runs_with_rm / "demo" / "ppo.partial" / "metrics.jsonl").exists()
    with pytest.raises(DiskError, match="the sft artifact and its checkpoints need about"):
        sft.main(
            [
                "--recipe",
                "stages/recipes/demo.yaml",
                f"runs_dir={runs_with_rm}",
                "--force",
                f"sft.model={runs_with_rm / 'demo' / 'sft'}",
            ]
        )
    assert read_manifest(runs_with_rm / "demo" / "sft")["build_id"] == before


FULL = {  # what a full disk raises: Python's own writes, torch.save, safetensors
    "oserror": lambda path: OSError(errno.ENOSPC, "No space left on device", str(path)),
    "torch": lambda path: RuntimeError(
        "[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
        "PytorchStreamWriter failed writing file data/0: file write failed"
    ),
    "safetensors": lambda path: Exception(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
    ),
}


@pytest.mark.parametrize("raised", list(FULL))
def test_no_space_left_while_saving_is_one_line_and_the_old_artifact_survives(raised, runs_with_rm, monkeypatch):
    sft_dir = runs_with_rm / "demo" / "sft"
    build = read_manifest(sft_dir)["build_id"]

    def disk_full(self, path, *args, **kwargs):
        raise FULL[raised](path)

    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(SystemExit) as stop:
        process.run(
            lambda: sft.main(
                [
                    "--recipe",
                    "stages/recipes/demo.yaml",
                    f"runs_dir={runs_with_rm}",
                    "--force",
                    "sft.dataset.limit=64",
                    "sft.eval_dataset.limit=16",
                    "sft.trainer.num_train_epochs=1",
                    f"sft.model={sft_dir}",
                ]
            )
        )
    assert str(stop.value).startswith("error: no space left on the device while writing ") and "\n" not in str(
        stop.value
    )
    assert read_manifest(sft_dir)["build_id"] == build
    transformers.AutoModelForCausalLM.from_pretrained(sft_dir)


def test_an_unwritable_run_directory_fails_before_anything_loads(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(
        DiskError,
        match=rf"cannot write to the run directory {blocker}/runs/demo \(.*\): set runs_dir "
        r"to a writable directory",
    ):
        ppo.main(["--recipe", "stages/recipes/demo.yaml", f"runs_dir={blocker}/runs"])


def ppo_past_its_first_iteration(runs, processes: int, *extra: str, **popen):
    """PPO started as make starts it (1 or 2 processes, the launcher leading its own process group),
    returned once its first iteration is logged, with its work directory."""
    partial = runs / "demo" / "ppo.partial"
    launch = LAUNCH if processes == 1 else [*LAUNCH[:3], "--multi_gpu", "--num_processes", "2", *LAUNCH[5:]]
    proc = subprocess.Popen(
        [*launch, "stages/ppo.py", *ppo_args(runs, "ppo.save_every=100", *extra)],
        cwd=REPO,
        start_new_session=True,
        **popen,
    )
    deadline = time.time() + 300
    while not ((partial / "metrics.jsonl").is_file() and (partial / "metrics.jsonl").read_text()):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.02)
    return proc, partial


@pytest.mark.parametrize("processes", [1, 2])
def test_ctrl_c_at_the_terminal_returns_only_after_the_stage_has_saved(processes, runs_with_rm):
    """SIGINT to the whole foreground process group, as the terminal sends it: the launcher make uses
    exits after the stage's checkpoint is written and its processes have exited (the lock is free),
    with the stage's exit code (torch elastic, with 2 processes, neither re-signals nor kills them)."""
    proc, partial = ppo_past_its_first_iteration(
        runs_with_rm, processes, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    os.killpg(proc.pid, signal.SIGINT)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 130, output[-3000:]
    assert (partial / "checkpoint" / "ppo_state.json").is_file()
    with open(runs_with_rm / "demo" / ".ppo.lock") as f:  # the stage process has exited: nobody holds it
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert "Run `make ppo` again (same recipe) to resume." in output and "Traceback" not in output
    resumed = [h["iteration"] for h in read_jsonl(partial / "metrics.jsonl")]
    assert resumed == list(range(1, len(resumed) + 1))


def test_a_stage_error_through_make_is_its_one_line(tmp_path, base_model):
    result = make("ppo", [*base_overrides(base_model), *sft_overrides(tmp_path, base_model), "ppo.temperature=0"])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "CalledProcessError" not in result.stderr
    assert "error: 'ppo.temperature': 0.0 is out of range: it must be > 0" in result.stderr


EXITING_STAGE = """
import atexit, sys, threading, time
from pipeline import cli, process

class Teardown:  # freed only by the interpreter's teardown
    def __del__(self):
        print("teardown", flush=True)

kept = Teardown()

def main():
    atexit.register(lambda: print("atexit handler"))
    threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished"))).start()
    print("unflushed output", end="")
    sys.exit(EXIT)

process.run_and_exit(main)
"""


@pytest.mark.parametrize("exit_with, code, said", [("None", 0, ""), ("130", 130, ""), ("'error: x'", 1, "error: x\n")])
def test_a_stage_process_ends_with_its_code_and_output_but_without_the_teardown(exit_with, code, said):
    """A stage script's process ends without the interpreter's teardown (0.7 s of the demo's PPO
    stage), after what a normal exit does that anyone sees: threads waited for, atexit handlers,
    output flushed, the exit code and its message."""
    script = EXITING_STAGE.replace("EXIT", exit_with)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stderr) == (code, said)
    assert result.stdout.split("\n") == ["unflushed outputthread finished", "atexit handler", ""]


PROCESS_WATCH = """
import atexit, ctypes, gc, runpy, sys
full = []
gc.callbacks.append(lambda phase, info: phase == "start" and info["generation"] == 2 and full.append(1))
before = gc.get_threshold()


def mkl_pool_growth():  # MB kept by 29 shapes of one linear layer on 2 threads (malloc's mmapped blocks)
    import torch
    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks".split()]
    mallinfo = ctypes.CDLL("libc.so.6").mallinfo2
    mallinfo.restype = Info
    torch.set_num_threads(2)
    weight, start = torch.randn(512, 128), mallinfo().hblkhd
    for rows in range(500, 700, 7):
        torch.nn.functional.linear(torch.randn(1, rows, 128), weight)
    return (mallinfo().hblkhd - start) >> 20 if torch.backends.mkl.is_available() else 0


atexit.register(lambda: print(len(full), gc.get_freeze_count(), gc.get_threshold() == before, mkl_pool_growth()))
sys.argv = ["SCRIPT", "--help"]
runpy.run_path("SCRIPT", run_name="__main__")
"""


@pytest.mark.parametrize(
    "script",
    [
        "stages/base.py",
        "stages/sft.py",
        "stages/rm.py",
        "stages/ppo.py",
        "stages/eval.py",
        "pipeline/rl/reward_server.py",
    ],
)
def test_a_script_s_process_is_set_up_before_its_libraries_load(script):
    """While a script imports torch, transformers and datasets (~400k objects), no full collection
    scans them (six did, 0.3 s of each process's start; CPython's generational collector, up to 3.13);
    then they are frozen, so none scans them later, and the collector's thresholds are back. And
    MKL's buffer pool is off: matrix products of changing shapes leave nothing behind (with it, 45 MB
    here; glibc's malloc and an x86 torch, whose CPU products are MKL's)."""
    env = {k: v for k, v in os.environ.items() if k != "MKL_DISABLE_FAST_MM"}  # the script's own setting
    result = subprocess.run(
        [sys.executable, "-c", PROCESS_WATCH.replace("SCRIPT", script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    collections, frozen, thresholds_back, pool_mb = result.stdout.split()[-4:]
    assert int(frozen) > 100_000 and thresholds_back == "True", result.stdout[-500:]
    if sys.version_info < (3, 14):  # 3.14's incremental collector has no full collections to defer
        assert collections == "0", result.stdout[-500:]
    assert int(pool_mb) < 8, f"MKL's buffer pool kept {pool_mb} MB"


def test_a_nan_on_one_process_stops_every_process_at_once(runs_with_rm):
    """The value loss is NaN on process 1 only: both processes agree on the check before backward and
    stop within seconds with one line naming the metric and the iteration (without the agreement,
    process 0 waits in backward's gradient all-reduce for the process-group timeout). Process 0, which
    says the line, is the slower to exit: torch elastic SIGTERMs it as soon as process 1 has exited,
    and that must not turn its error into a kill. Process 1 leaves while gloo's worker thread still
    holds a collective's tensor (as it can for a moment on a busy machine): tearing the process group
    down would deadlock it until elastic SIGKILLs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    started = time.time()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "tests/probe.py",
            "--nan-on-rank",
            "1",
            "--slow-exit-on-rank",
            "0",
            "--busy-gloo-at-exit-on-rank",
            "1",
            "stages/ppo.py",
            *ppo_args(runs_with_rm),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    elapsed = time.time() - started
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert (
        lines[-1] == "error: ppo: loss/value is not finite at iteration 1, epoch 1 (on process 1): stopping. "
        "Lower ppo.learning_rate, or check the rewards."
    ), lines[-3:]
    assert elapsed < 120 and read_manifest(runs_with_rm / "demo" / "ppo") is None


def stage_processes(marker: str) -> list[int]:
    """Live processes whose command line names `marker` (zombies and this test excluded)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z" and int(pid) != os.getpid():
            found.append(int(pid))
    return found


@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_launcher_does_not_leave_its_stage_running(processes, runs_with_rm, capsys):
    """SIGKILL to the launcher make started (nothing can be passed on): its stage stops as on Ctrl-C,
    saving a checkpoint and leaving no process behind, and the same command resumes from it."""
    args = ppo_args(runs_with_rm, "ppo.save_every=100", "ppo.total_episodes=640")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    proc, partial = ppo_past_its_first_iteration(
        runs_with_rm, processes, "ppo.total_episodes=640", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    proc.kill()
    proc.wait()
    deadline = time.time() + 120
    while stage_processes(str(runs_with_rm)):
        assert time.time() < deadline, (
            f"still running after the launcher was killed: {stage_processes(str(runs_with_rm))}"
        )
        time.sleep(0.2)
    saved = json.loads((partial / "checkpoint" / "ppo_state.json").read_text())["iteration"]
    assert 1 <= saved < 20  # saved on the stop, not by save_every=100
    ppo.main(args)
    assert f"resuming from the checkpoint at iteration {saved}/20" in capsys.readouterr().out
    assert [h["iteration"] for h in read_jsonl(runs_with_rm / "demo" / "ppo" / "metrics.jsonl")] == list(range(1, 21))
