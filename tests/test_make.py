"""`make` follows the artifacts: finished stages are not re-run, a changed recipe section re-runs its
stage and those after it, FORCE re-runs the stage asked for and not its upstream."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from pipeline import plans
from pipeline.artifacts import read_manifest
from tests.conftest import PPO_RUN, REPO, RM_RUN, SFT_RUN, base_overrides, sft_overrides

pytestmark = pytest.mark.e2e  # whole stages, several processes

STAGES = ["base", "sft", "rm", "ppo", "eval"]


def make(target: str, overrides: list[str], *variables: str) -> str:
    run = subprocess.run(
        ["make", "-s", target, f"ARGS={' '.join(overrides)}", *variables],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def build_ids(runs, base_model) -> dict:
    dirs = {"base": base_model, **{s: runs / "demo" / s for s in STAGES[1:]}}
    return {s: (read_manifest(d) or {}).get("build_id") for s, d in dirs.items()}


def up_to_date(stdout: str) -> set[str]:
    """The stages make found up to date (and so did not launch)."""
    return {line.split(":")[0] for line in stdout.splitlines() if line.endswith("is up to date (FORCE=1 to re-run)")}


def test_make_demo_runs_only_what_is_out_of_date(tmp_path, rm_run, base_model):
    # The session's finished SFT and RM, with the very overrides that built them: make must see
    # them as done and run only PPO and eval (tiny settings for both).
    for stage in ("sft", "rm"):
        shutil.copytree(rm_run / "demo" / stage, tmp_path / "demo" / stage)
    overrides = [
        *base_overrides(base_model),
        *sft_overrides(tmp_path, base_model, *SFT_RUN),
        *RM_RUN,
        *PPO_RUN,
        "ppo.total_episodes=64",
        "eval.prompts.limit=16",
        "eval.max_new_tokens=8",
    ]
    before = build_ids(tmp_path, base_model)

    first = make("demo", overrides)
    assert up_to_date(first) == {"base", "sft", "rm"}, first
    built = build_ids(tmp_path, base_model)
    assert {s for s in STAGES if built[s] != before[s]} == {"ppo", "eval"}
    assert "report: " in first and "ppo win rate vs sft" in first  # make demo ends with the headline

    second = make("demo", overrides)  # nothing changed: no stage runs, the headline is printed again
    assert up_to_date(second) == set(STAGES), second
    assert build_ids(tmp_path, base_model) == built and "ppo win rate vs sft" in second

    changed = [*overrides, "rm.dataset.limit=600"]  # the rm section changes: rm, ppo and eval re-run
    third = make("demo", changed)
    assert up_to_date(third) == {"base", "sft"}, third
    rebuilt = build_ids(tmp_path, base_model)
    assert {s for s in STAGES if rebuilt[s] != built[s]} == {"rm", "ppo", "eval"}
    assert read_manifest(tmp_path / "demo" / "rm")["metrics"]["train_pairs"] == 600

    forced = make("ppo", changed, "FORCE=1")  # ppo again, its upstream left alone
    assert up_to_date(forced) == {"base", "sft", "rm"}, forced
    after = build_ids(tmp_path, base_model)
    assert {s for s in STAGES if after[s] != rebuilt[s]} == {"ppo"}
    # eval was built from the previous PPO artifact, so it is out of date now
    check = subprocess.run([sys.executable, "-m", "pipeline.plans", "eval", *changed], cwd=REPO)
    assert check.returncode == 1


def test_a_stage_script_reports_user_errors_in_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "stages/ppo.py", f"runs_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: the sft artifact {tmp_path}/demo/sft does not exist: run `make sft` first (with the same RECIPE)"
    )


def dry_run(target: str, *variables: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-n", target, *variables], cwd=REPO, capture_output=True, text=True, timeout=60)


def test_make_help_names_every_target_and_variable():
    out = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True, timeout=60).stdout
    named = set()  # what each help line names: a target, or variables ("NNODES, NODE_RANK, ..." or "RECIPE=...")
    for line in out.splitlines():
        head = re.match(r"^\s+([A-Za-z_-]+(?:, [A-Z_]+)*)", line)
        if head:
            named |= set(head.group(1).split(", "))
    for word in (
        "demo",
        "setup",
        "sft",
        "rm",
        "ppo",
        "eval",
        "bench",
        "test",
        "test-gpu",
        "clean",
        "RECIPE",
        "ARGS",
        "FORCE",
        "RESUME",
        "NPROC",
        "ACCELERATE_CONFIG",
        "NNODES",
        "NODE_RANK",
        "MAIN_ADDR",
        "BENCH_EPISODES",
        "RM",
        "SERVE_HOST",
        "SERVE_PORT",
        "API_KEY_ENV",
    ):
        assert word in named, word


def test_force_and_resume_reach_the_stages_named_only():
    """`make ppo RESUME=1 FORCE=1` hands --resume / --force to PPO, not to the SFT make visits first."""
    lines = dry_run("ppo", "RESUME=1").stdout.splitlines()
    assert all("--resume" in line for line in lines if "stages/ppo.py" in line)
    assert not any("--resume" in line for line in lines if "stages/sft.py" in line)
    lines = dry_run("serve-rm", "SERVE_HOST=0.0.0.0", "API_KEY_ENV=RM_KEY").stdout
    assert "--host 0.0.0.0 --port 8000 --api-key-env RM_KEY" in lines


def test_launch_takes_the_config_files_process_count_and_node_place():
    ppo_line = [
        line
        for line in dry_run("ppo", "ACCELERATE_CONFIG=accelerate_configs/zero3.yaml").stdout.splitlines()
        if "stages/ppo.py" in line
    ][0]
    assert "--config_file accelerate_configs/zero3.yaml" in ppo_line and "--num_processes" not in ppo_line
    line = dry_run("ppo", "ACCELERATE_CONFIG=accelerate_configs/fsdp2.yaml", "NPROC=4").stdout
    assert "--num_processes 4" in line
    line = dry_run(
        "ppo", "ACCELERATE_CONFIG=accelerate_configs/multi_node.yaml", "NNODES=2", "NODE_RANK=1", "MAIN_ADDR=10.1.2.3"
    ).stdout
    assert "--num_machines 2 --machine_rank 1 --main_process_ip 10.1.2.3 --main_process_port 29500" in line
    missing = dry_run("sft", "ACCELERATE_CONFIG=accelerate_configs/nope.yaml")
    assert missing.returncode != 0 and "accelerate_configs/nope.yaml does not exist" in missing.stderr


def test_the_shipped_accelerate_configs_load_with_the_engine_they_name():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {
        "single_gpu": "NO",
        "multi_gpu": "MULTI_GPU",
        "zero2": "DEEPSPEED",
        "zero3": "DEEPSPEED",
        "zero3_offload": "DEEPSPEED",
        "fsdp2": "FSDP",
        "multi_node": "MULTI_GPU",
    }
    assert {p.stem for p in (REPO / "accelerate_configs").glob("*.yaml")} == set(expected)
    for stem, kind in expected.items():
        config = load_config_from_file(str(REPO / "accelerate_configs" / f"{stem}.yaml"))
        assert config.distributed_type.value == kind and config.mixed_precision == "no", stem
    assert load_config_from_file(str(REPO / "accelerate_configs/zero3.yaml")).deepspeed_config["zero_stage"] == 3
    assert load_config_from_file(str(REPO / "accelerate_configs/fsdp2.yaml")).fsdp_config["fsdp_version"] == 2


def test_the_rm_stage_is_skipped_on_the_way_when_no_reward_reads_it(tmp_path, capsys):
    """`make ppo` / `make eval` visit `rm` with --if-needed: a recipe that optimises reward functions
    (demo-grpo.yaml) trains no reward model; one that reads {model: rm} still needs it."""
    grpo = ["rm", "--if-needed", "--recipe", str(REPO / "stages/recipes/demo-grpo.yaml"), f"runs_dir={tmp_path}"]
    assert plans.main(grpo) == 0 and "rm: skipped" in capsys.readouterr().out
    assert plans.main([*grpo, "ppo.judges=[{model: rm}]"]) == 1  # a judge that reads the RM needs it built
    assert (
        plans.main(["rm", "--if-needed", "--recipe", str(REPO / "stages/recipes/demo.yaml"), f"runs_dir={tmp_path}"])
        == 1
    )
    rm_line = lambda target: next(line for line in dry_run(target).stdout.splitlines() if "plans rm" in line)  # noqa: E731
    assert "--if-needed" in rm_line("ppo") and "--if-needed" not in rm_line("rm")


def test_the_sft_stage_is_skipped_on_the_way_when_the_rl_stage_starts_from_a_model_of_its_own(tmp_path, capsys):
    """With ppo.model, `make ppo` / `make eval` visit `base` and `sft` with --if-needed and skip them;
    without it, SFT is needed; `make sft` itself always may build it."""
    recipe = ["--recipe", str(REPO / "stages/recipes/demo-grpo.yaml"), f"runs_dir={tmp_path}"]
    assert plans.main(["sft", "--if-needed", *recipe, "ppo.model=HuggingFaceTB/SmolLM2-135M-Instruct"]) == 0
    assert (
        "sft: skipped, the RL stage starts from ppo.model (HuggingFaceTB/SmolLM2-135M-Instruct)"
        in capsys.readouterr().out
    )
    assert plans.main(["base", "--if-needed", *recipe, "ppo.model=HuggingFaceTB/SmolLM2-135M-Instruct"]) == 0
    assert plans.main(["sft", "--if-needed", *recipe]) == 1
    lines = dry_run("ppo").stdout.splitlines()
    assert all("--if-needed" in line for line in lines if "plans sft" in line or "plans base" in line)
    assert not any("--if-needed" in line for line in dry_run("sft").stdout.splitlines() if "plans sft" in line)
