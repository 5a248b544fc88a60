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
from pipeline.errors import ConfigError
from pipeline.recipe_loader import load_recipe
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
    check = subprocess.run([sys.executable, "-m", "pipeline.plans", "eval", "--check", *changed], cwd=REPO)
    assert check.returncode == 1


def test_a_no_op_make_demo_is_one_process_that_asks_each_stage_once(tmp_path, monkeypatch):
    """Everything up to date: one interpreter answers for the whole chain, asking each stage once in
    the graph's order, and launches nothing."""
    asked = []
    monkeypatch.setattr(plans, "nothing_to_do", lambda recipe, name: asked.append(name) or f"{name}: up to date")
    monkeypatch.setattr(plans, "run", lambda command: pytest.fail(f"launched {command}"))
    assert plans.main(["eval", "--all", f"runs_dir={tmp_path}"]) == 0
    assert asked == ["base", "sft", "rm", "ppo", "eval"]
    lines = dry_run("demo").stdout.strip().splitlines()
    assert len(lines) == 1 and "-m pipeline.plans eval" in lines[0]  # make starts one interpreter for the chain


def test_a_stage_script_reports_user_errors_in_one_line(tmp_path):
    run = subprocess.run(
        [sys.executable, "stages/ppo.py", f"runs_dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        f"error: the sft artifact {tmp_path}/demo/sft does not exist: run `make sft` first (with the same RECIPE)"
    )


def dry_run(target: str, *variables: str) -> subprocess.CompletedProcess:
    """What `make -n` would run: the target's one pipeline.plans command."""
    return subprocess.run(
        ["make", "-n", "--no-print-directory", target, *variables], cwd=REPO, capture_output=True, text=True, timeout=60
    )


def launches(target: str, tmp_path, *variables: str) -> list[str]:
    """The stage commands `make TARGET DRY_RUN=1` prints for a run with nothing built yet."""
    run = subprocess.run(
        ["make", "-s", target, "DRY_RUN=1", f"ARGS=runs_dir={tmp_path}", *variables],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return [line for line in run.stdout.splitlines() if " stages/" in line]


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
        "test-fast",
        "lint",
        "DRY_RUN",
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


def test_force_and_resume_reach_the_stages_named_only(tmp_path):
    """`make ppo RESUME=1` hands --resume to PPO, not to the SFT and RM run first; `make demo` to all."""
    lines = launches("ppo", tmp_path, "RESUME=1")
    assert [line.split(" stages/")[1].split()[0] for line in lines][-3:] == ["sft.py", "rm.py", "ppo.py"]
    assert ["--resume" in line for line in lines[-3:]] == [False, False, True]
    assert all("--force" in line for line in launches("demo", tmp_path, "FORCE=1"))
    lines = dry_run("serve-rm", "SERVE_HOST=0.0.0.0", "API_KEY_ENV=RM_KEY").stdout
    assert "--host 0.0.0.0 --port 8000 --api-key-env RM_KEY" in lines


def test_launch_takes_the_config_files_process_count_and_node_place(tmp_path):
    ppo_line = launches("ppo", tmp_path, "ACCELERATE_CONFIG=accelerate_configs/zero3.yaml")[-1]
    assert "--config_file accelerate_configs/zero3.yaml" in ppo_line and "--num_processes" not in ppo_line
    assert "stages/ppo.py" in ppo_line
    line = launches("ppo", tmp_path, "ACCELERATE_CONFIG=accelerate_configs/fsdp2.yaml", "NPROC=4")[-1]
    assert "--num_processes 4" in line
    line = launches(
        "ppo",
        tmp_path,
        "ACCELERATE_CONFIG=accelerate_configs/multi_node.yaml",
        "NNODES=2",
        "NODE_RANK=1",
        "MAIN_ADDR=10.1.2.3",
    )[-1]
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


def test_the_chain_holds_the_stages_the_recipe_reads():
    """pipeline.plans' one graph: a recipe that optimises reward functions (demo-grpo.yaml) has no RM
    stage before its RL stage, unless a judge reads {model: rm}; one with ppo.model has no SFT (nor the
    demo base) before it; `make sft` itself always builds SFT."""
    demo = load_recipe(str(REPO / "stages/recipes/demo.yaml"))
    grpo = str(REPO / "stages/recipes/demo-grpo.yaml")
    assert plans.chain(demo, "eval") == ["base", "sft", "rm", "ppo", "eval"]
    assert plans.chain(load_recipe(grpo), "ppo") == ["base", "sft", "ppo"]
    assert plans.chain(load_recipe(grpo, ["ppo.judges=[{model: rm}]"]), "ppo") == ["base", "sft", "rm", "ppo"]
    instruct = load_recipe(grpo, ["ppo.model=HuggingFaceTB/SmolLM2-135M-Instruct"])
    assert plans.chain(instruct, "eval") == ["ppo", "eval"] and plans.chain(instruct, "sft") == ["base", "sft"]
    assert plans.chain(load_recipe(grpo, ["sft.model=gpt2"]), "sft") == ["sft"]  # not the demo base: none to build
    # a stage that starts from the demo's base (its base.output) has the base built first
    assert plans.chain(load_recipe(grpo, ["rm.model=data/models/demo-base"]), "rm") == ["base", "rm"]
    assert plans.chain(load_recipe(grpo, ["ppo.model=data/models/demo-base"]), "eval") == ["base", "ppo", "eval"]
    # a mistake only eval reads is eval's alone: the chains before it are planned as ever
    judged = load_recipe(
        str(REPO / "stages/recipes/demo.yaml"), ["eval.judges=[{function: 'pipeline.demo:gold_reward', name: rm}]"]
    )
    assert plans.chain(judged, "ppo") == ["base", "sft", "rm", "ppo"]
    with pytest.raises(ConfigError, match="'rm' already names another score"):
        plans.chain(judged, "eval")


def test_bench_builds_what_the_rl_stage_reads_and_force_reaches_none_of_it(tmp_path, capsys):
    """`make bench` runs `pipeline.plans ppo --upstream-only`: a recipe that optimises reward functions
    builds no reward model, and FORCE=1 (the bench's) retrains nothing upstream; a recipe with a model
    of its own has no base to build, even when forced."""
    grpo = ["--recipe", str(REPO / "stages/recipes/demo-grpo.yaml"), f"runs_dir={tmp_path}", "--dry-run", "--force"]
    assert plans.main(["ppo", "--upstream-only", *grpo]) == 0
    commands = [line for line in capsys.readouterr().out.splitlines() if " stages/" in line]
    assert [c.split(" stages/")[1].split()[0] for c in commands][-1:] == ["sft.py"]
    assert not any("--force" in c for c in commands)
    assert plans.main(["base", *grpo, "sft.model=gpt2"]) == 0
    out = capsys.readouterr().out
    assert "there is no demo base model to build" in out and " stages/" not in out
