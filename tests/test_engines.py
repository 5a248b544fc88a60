"""PPO under the engines users scale out with, 2 gloo processes each: DDP, FSDP2, DeepSpeed ZeRO-2 and
ZeRO-3 (switched on by the test-only tests/engines.py, as accelerate will not pick them on CPU).

Sharding changes where parameters live, not the arithmetic: every engine must give DDP's metrics
and, after the consolidated save, DDP's weights."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pipeline.errors import ConfigError
from stages import ppo, sft
from tests.conftest import DEMO_RECIPE, RM_RUN, launch, ppo_args, read_jsonl, rm_args, sft_args

pytestmark = pytest.mark.e2e  # whole stages, several processes

# 2 iterations of 2 x 16 rollouts; a checkpoint at iteration 2 (save_state under the engine)
ARGS = ["ppo.total_episodes=64", "ppo.batch_size=16", "ppo.mini_batch_size=8", "ppo.learning_rate=1e-3"]


def ppo_under(engine: str | None, rm_run, runs, *extra: str, stop_after: int | None = None):
    """PPO launched under `engine`; with `stop_after`, stopped (as by Ctrl-C) once that iteration is done,
    which saves a checkpoint (its files are returned), and then resumed to the end by the same command.
    tests/probe.py reports what each rank loaded, held during generation and imported (runs/report)."""
    for stage in ("sft", "rm"):
        shutil.copytree(rm_run / "demo" / stage, runs / "demo" / stage)
    args = ppo_args(runs, *ARGS, *extra)
    if stop_after is not None:
        launch(
            2,
            "stages/ppo.py",
            *args,
            engine=engine,
            expect=130,
            probe=("--stop-after", str(stop_after), "--report", str(runs / "report")),
        )
        checkpoint = sorted(
            str(p.relative_to(runs / "demo" / "ppo.partial" / "checkpoint"))
            for p in (runs / "demo" / "ppo.partial" / "checkpoint").rglob("*")
            if p.is_file()
        )
        resumed = launch(2, "stages/ppo.py", *args, engine=engine)
        assert f"resuming from the checkpoint at iteration {stop_after}/2" in resumed.stdout
    else:  # a rank whose interpreter teardown would abort leaves without it (pipeline.process.run_and_exit)
        launch(
            2,
            "stages/ppo.py",
            *args,
            engine=engine,
            probe=("--report", str(runs / "report"), "--abort-at-exit-on-rank", "1"),
        )
        checkpoint = None
    out = runs / "demo" / "ppo"
    return (
        out,
        read_jsonl(out / "metrics.jsonl"),
        json.loads((out / "manifest.json").read_text())["metrics"],
        checkpoint,
    )


def report(runs, rank: int, event: str) -> list[dict]:
    return [r for r in read_jsonl(runs / "report" / f"rank{rank}.jsonl") if r["event"] == event]


@pytest.fixture(scope="module")
def ddp(rm_run, tmp_path_factory):
    return ppo_under(None, rm_run, tmp_path_factory.mktemp("ddp"))


def test_full_fine_tuning_imports_what_only_other_runs_need_on_no_rank(ddp):
    """peft and bitsandbytes (LoRA, QLoRA), deepspeed, matplotlib (eval's plots): about 2 s and 60 MB
    of start-up in every process of a run that does not use them; trl (PPO needs its helpers for the
    sharded engines and its Triton kernel on a GPU): 3.7 MB. Saving the artifact included:
    transformers' save_pretrained unwraps through accelerate, which imports deepspeed to recognise
    its engine (engine.saving skips that outside DeepSpeed runs)."""
    runs = ddp[0].parents[1]
    (exit_0,), (exit_1,) = report(runs, 0, "exit"), report(runs, 1, "exit")
    assert exit_0["imported"] == [] and exit_1["imported"] == []


def test_a_finished_rank_leaves_with_its_process_group_up(ddp):
    """The stage leaves the process group to the process's exit (accelerate's end_training would tear
    it down): freed later, with the models that hold it, it joins gloo's workers with the GIL held,
    which can hang a rank (pipeline.process.run_and_exit). Rank 1 also aborts in the interpreter's teardown
    (tests/probe.py), which a finished rank never reaches: the run succeeded all the same."""
    runs = ddp[0].parents[1]
    assert [r["process_group_up"] for rank in (0, 1) for r in report(runs, rank, "exit")] == [True, True]


@pytest.mark.parametrize(
    "engine, name", [("fsdp2", "fsdp2"), ("zero2", "deepspeed-zero2"), ("zero3", "deepspeed-zero3")]
)
def test_ppo_under_each_engine_matches_ddp(engine, name, ddp, rm_run, tmp_path):
    """The sharded engines are also stopped after iteration 1 and resumed from their checkpoint (FSDP2's
    is sharded: each rank wrote its own part); the resumed run logs what DDP's uninterrupted run logs.
    While the policy generates, its parameters are whole and the value network's decoder layers stay
    sharded."""
    sharded = engine in ("fsdp2", "zero3")
    out, history, manifest, checkpoint = ppo_under(engine, rm_run, tmp_path, stop_after=1 if sharded else None)
    ddp_out, ddp_history, ddp_manifest, _ = ddp
    assert manifest["engine"] == name and ddp_manifest["engine"] == "ddp"
    assert manifest["parameters"] == ddp_manifest["parameters"]  # full sizes, also from ZeRO-3's empty shards
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg", "lr"):
        assert [h[key] for h in history] == pytest.approx([h[key] for h in ddp_history], rel=1e-3, abs=1e-5), key
    # the consolidated artifact: full tensors, DDP's weights
    mine, theirs = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (out, ddp_out))
    assert mine.keys() == theirs.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], rtol=1e-3, atol=1e-4)
    sft = AutoModelForCausalLM.from_pretrained(out.parent / "sft").state_dict()
    assert any(not torch.equal(mine[k], sft[k]) for k in mine)  # and they did train
    if sharded:
        if engine == "fsdp2":  # one shard per rank, no full copy on one host
            assert {"pytorch_model_fsdp_0/__0_0.distcp", "pytorch_model_fsdp_0/__1_0.distcp"} <= set(checkpoint), (
                checkpoint
            )
        for rank in (0, 1):
            (generation,) = report(tmp_path, rank, "generate")
            assert generation["policy_whole"] and not all(generation["value_whole"]), generation
            # (left to itself, transformers decodes in sync under ZeRO-3 / FSDP2: an all-reduce per token)
            assert [d["synced_gpus"] for d in report(tmp_path, rank, "decode")] == [False]


def test_lora_ppo_under_zero3_matches_ddp(rm_run, tmp_path):
    """LoRA under ZeRO-3: the sharded policy with its adapter off is the reference; every iteration
    and the merged artifact equal a DDP LoRA run's."""
    lora = ("ppo.finetune=lora", "ppo.learning_rate=1e-2")
    out, history, manifest, _ = ppo_under("zero3", rm_run, tmp_path / "zero3", *lora)
    ddp_out, ddp_history, _, _ = ppo_under(None, rm_run, tmp_path / "ddp", *lora)
    assert manifest["engine"] == "deepspeed-zero3"
    assert history[-1]["objective/kl"] > 1e-4  # the adapter trained
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg"):
        assert [h[key] for h in history] == pytest.approx([h[key] for h in ddp_history], rel=1e-3, abs=1e-5), key
    merged, ddp_merged = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (out, ddp_out))
    for k in merged:
        torch.testing.assert_close(merged[k], ddp_merged[k], rtol=1e-3, atol=1e-4)


def test_ranks_that_do_not_share_the_run_directory_are_refused(tmp_path):
    """Two nodes without a shared filesystem, played by two ranks given different directories."""
    script = tmp_path / "check.py"
    script.write_text(
        "import sys\nfrom pathlib import Path\nfrom pipeline.dist import check_shared, process_state\n"
        "from pipeline.errors import ConfigError\n"
        "state = process_state()\nbase = Path(sys.argv[1])\n"
        "check_shared(state, base / 'shared')\n"  # the same directory on every rank: fine
        "try:\n    check_shared(state, base / f'node{state.process_index}')\n"
        "except ConfigError as e:\n    (base / f'rank{state.process_index}.txt').write_text(str(e))\n"
        "import os\nos._exit(0)\n"
    )  # leave as pipeline.process.run_and_exit does, without the process group's teardown
    launch(2, str(script), str(tmp_path))
    for rank in (0, 1):  # both ranks stop, with the same message
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert (
            message.startswith("ranks [1] do not see the run directory")
            and "filesystem shared by every node" in message
        )


@pytest.mark.parametrize(
    "env, message",
    [
        (
            {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3"},
            "QLoRA cannot run under deepspeed-zero3",
        ),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "QLoRA cannot run under fsdp2"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, "FSDP version 1 is not supported"),
    ],
)
def test_engine_mismatches_are_refused_before_anything_is_loaded(env, message, tmp_path, monkeypatch, base_model):
    """What `accelerate launch --config_file` sets in the environment, checked before any model loads."""
    from transformers import modeling_utils, tokenization_utils_base

    def no_loading(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the engine check")

    monkeypatch.setattr(modeling_utils.PreTrainedModel, "from_pretrained", no_loading)
    monkeypatch.setattr(tokenization_utils_base.PreTrainedTokenizerBase, "from_pretrained", no_loading)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message):
        sft.main(sft_args(tmp_path, base_model, "sft.finetune=qlora-4bit"))
    assert not (tmp_path / "demo").exists()  # nothing written


def test_a_batch_that_does_not_split_is_refused_when_the_recipe_is_read(runs_with_rm):
    with pytest.raises(ConfigError, match="batch_size 30 is not a multiple of mini_batch_size 8"):
        ppo.main(ppo_args(runs_with_rm, "ppo.batch_size=30"))
    assert not (runs_with_rm / "demo" / "ppo.partial").exists()


# SFT and RM through their Trainers under each engine: a short run of each
QUICK_SFT = [
    "sft.dataset.limit=256",
    "sft.eval_dataset.limit=32",
    "sft.trainer.num_train_epochs=1",
    "sft.trainer.per_device_train_batch_size=8",
    "sft.trainer.logging_steps=2",
]
QUICK_RM = [
    "rm.dataset.limit=512",
    "rm.eval_dataset.limit=64",
    "rm.trainer.num_train_epochs=1",
    "rm.reference_limit=32",
    "rm.trainer.per_device_train_batch_size=16",
    "rm.trainer.logging_steps=2",
]


def sft_rm_under(engine: str | None, runs, base_model, *sft_extra: str, stop_after: int | None = None):
    """SFT, RM and eval (of base and SFT) launched under one engine; with `stop_after`, SFT and RM are
    each stopped at that step (a checkpoint) and resumed."""
    stages = (("sft", sft_args(runs, base_model, *QUICK_SFT, *sft_extra)), ("rm", rm_args(runs, *QUICK_RM)))
    for stage, args in stages:
        if stop_after is not None:
            launch(
                2,
                f"stages/{stage}.py",
                *args,
                engine=engine,
                expect=130,
                probe=("--stop-after", str(stop_after), "--report", str(runs / "report")),
            )
            resumed = launch(2, f"stages/{stage}.py", *args, engine=engine)
            assert f"{stage}: resuming from the checkpoint at step {stop_after}" in resumed.stdout
        else:
            launch(2, f"stages/{stage}.py", *args, engine=engine)
    if engine in (None, "zero3"):  # eval runs on rank 0 alone: once under DDP, once under ZeRO-3 (its loading)
        launch(
            2,
            "stages/eval.py",
            "--recipe",
            DEMO_RECIPE,
            f"runs_dir={runs}",
            f"sft.model={base_model}",
            "eval.prompts.limit=16",
            "eval.max_new_tokens=8",
            engine=engine,
        )
    evaluation = runs / "demo" / "eval" / "metrics.json"
    return (
        *(json.loads((runs / "demo" / s / "manifest.json").read_text())["metrics"] for s in ("sft", "rm")),
        json.loads(evaluation.read_text()) if evaluation.exists() else None,
    )


@pytest.fixture(scope="module")
def sft_rm_ddp(base_model, tmp_path_factory):
    runs = tmp_path_factory.mktemp("sft_rm_ddp")
    return runs, sft_rm_under(None, runs, base_model)


@pytest.mark.parametrize("engine", ["fsdp2", "zero2", "zero3"])
def test_sft_rm_and_eval_under_each_engine_match_ddp(engine, sft_rm_ddp, base_model, tmp_path):
    """The Trainers shard, evaluate (before training too), save consolidated weights; the RM's
    held-out report and reference statistics read the saved artifact on rank 0; eval runs on rank 0
    (under ZeRO-3).
    Under the sharded engines SFT and RM are stopped at step 4 and resumed from their (sharded)
    checkpoints, and ZeRO-3 loads each model partitioned over the ranks."""
    sharded = engine in ("fsdp2", "zero3")
    ddp_runs, (ddp_sft, ddp_rm, ddp_eval) = sft_rm_ddp
    sft_metrics, rm_metrics, evaluation = sft_rm_under(engine, tmp_path, base_model, stop_after=4 if sharded else None)
    if evaluation is not None:
        assert evaluation["sft"]["sampled"]["rm_score"] == pytest.approx(
            ddp_eval["sft"]["sampled"]["rm_score"], rel=1e-3
        )
    # (the Trainer's train_loss averages the steps its own process ran: a resumed run's covers 5..16)
    for key in ("eval_loss_before", "eval_loss_after", *(() if sharded else ("train_loss",))):
        assert sft_metrics[key] == pytest.approx(ddp_sft[key], rel=1e-3), key
    assert sft_metrics["eval_loss_after"] < sft_metrics["eval_loss_before"]
    assert rm_metrics["heldout"]["accuracy"] == pytest.approx(ddp_rm["heldout"]["accuracy"], abs=1e-6)
    assert rm_metrics["reference"]["mean"] == pytest.approx(ddp_rm["reference"]["mean"], rel=1e-3, abs=1e-4)
    for stage, cls in (("sft", AutoModelForCausalLM), ("rm", AutoModelForSequenceClassification)):
        mine, theirs = (cls.from_pretrained(r / "demo" / stage).state_dict() for r in (tmp_path, ddp_runs))
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=1e-3, atol=1e-4)
    if engine == "zero3":  # the trained model of each stage, on each rank: its shard only
        for rank in (0, 1):
            loads = report(tmp_path, rank, "load")
            assert [(r["cls"], r["partitioned"]) for r in loads] == [
                ("LlamaForCausalLM", True),
                ("LlamaForSequenceClassification", True),
            ], loads


def float32_weights(path) -> dict[str, torch.Tensor]:
    """An artifact's tensors as saved, each checked to be float32 on disk, and its config saying so
    (`from_pretrained` loads in the config's dtype)."""
    from safetensors import safe_open

    assert json.loads((path / "config.json").read_text())["dtype"] == "float32"
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
    assert {str(w.dtype) for w in weights.values()} == {"torch.float32"}
    return weights


def test_artifacts_under_deepspeed_in_bf16_are_the_float32_master_weights(
    ddp, sft_rm_ddp, rm_run, base_model, tmp_path
):
    """DeepSpeed in bf16 holds the module in bf16 and float32 masters in its optimizer: the artifacts
    (PPO under ZeRO-3, SFT through the Trainer under ZeRO-2) are the masters, in float32 with the bits
    bf16 has not, and DDP's float32 weights up to the bf16 arithmetic of the run."""
    out = ppo_under("zero3", rm_run, tmp_path / "ppo", "ppo.dtype=bfloat16")[0]
    launch(
        2, "stages/sft.py", *sft_args(tmp_path / "sft", base_model, *QUICK_SFT, "sft.dtype=bfloat16"), engine="zero2"
    )
    for path, ddp_path in ((out, ddp[0]), (tmp_path / "sft" / "demo" / "sft", sft_rm_ddp[0] / "demo" / "sft")):
        mine, theirs = float32_weights(path), float32_weights(ddp_path)
        assert mine.keys() == theirs.keys()
        assert all((w != w.to(torch.bfloat16).float()).any() for w in mine.values())
        worst = max(((mine[k] - theirs[k]).abs().max() / theirs[k].abs().max()).item() for k in mine)
        print(f"{path.name}: largest difference from DDP's float32 artifact {worst:.2e} of the tensor's scale")
        assert worst < 5e-2  # (bf16 arithmetic samples other rollouts: PPO 2.2e-2 seen)


def test_sft_and_rm_on_two_processes_match_one_with_the_same_global_batch(sft_rm_ddp, base_model, tmp_path):
    """The same learning rate at every step, losses and accuracy within the noise of another sample
    order (each rank sees a different half of every batch); eval ran on 2 processes (rank 0 evaluates,
    the others wait well inside the process-group timeout)."""
    from stages import rm

    two, (two_sft, two_rm, evaluation) = sft_rm_ddp
    sft.main(sft_args(tmp_path, base_model, *QUICK_SFT, "sft.trainer.per_device_train_batch_size=16"))
    rm.main(rm_args(tmp_path, *QUICK_RM, "rm.trainer.per_device_train_batch_size=32"))
    for stage in ("sft", "rm"):
        log1, log2 = (
            [h for h in read_jsonl(r / "demo" / stage / "metrics.jsonl") if "learning_rate" in h]
            for r in (tmp_path, two)
        )
        assert [h["step"] for h in log1] == [h["step"] for h in log2] and len(log1) > 2, stage
        assert [h["learning_rate"] for h in log1] == pytest.approx([h["learning_rate"] for h in log2]), stage
    one_sft, one_rm = (
        json.loads((tmp_path / "demo" / s / "manifest.json").read_text())["metrics"] for s in ("sft", "rm")
    )
    assert one_sft["train_loss"] == pytest.approx(two_sft["train_loss"], rel=0.1)
    assert two_sft["eval_loss_after"] < 0.8 * two_sft["eval_loss_before"]
    assert one_sft["eval_loss_after"] == pytest.approx(two_sft["eval_loss_after"], rel=0.1)
    assert one_rm["train_loss"] == pytest.approx(two_rm["train_loss"], rel=0.1)
    # (that the RM learns is test_rm's: this short run barely moves it, on 1 process as on 2)
    assert abs(one_rm["heldout"]["accuracy"] - two_rm["heldout"]["accuracy"]) < 0.1
    assert set(evaluation) == {"settings", "peak_memory_mb", "base", "sft"}


def test_lora_sft_under_zero3_matches_ddp(base_model, tmp_path):
    lora = (*QUICK_SFT, "sft.finetune=lora", "sft.trainer.learning_rate=3e-3")
    launch(2, "stages/sft.py", *sft_args(tmp_path / "zero3", base_model, *lora), engine="zero3")
    launch(2, "stages/sft.py", *sft_args(tmp_path / "ddp", base_model, *lora))
    (merged, metrics), (ddp_merged, ddp_metrics) = (
        (
            AutoModelForCausalLM.from_pretrained(r / "demo" / "sft").state_dict(),
            json.loads((r / "demo" / "sft" / "manifest.json").read_text())["metrics"],
        )
        for r in (tmp_path / "zero3", tmp_path / "ddp")
    )
    base = AutoModelForCausalLM.from_pretrained(base_model).state_dict()
    assert merged.keys() == base.keys() and any(not torch.equal(merged[k], base[k]) for k in merged)
    for k in merged:  # the same adapter, merged the same way
        torch.testing.assert_close(merged[k], ddp_merged[k], rtol=1e-3, atol=1e-4)
    for key in ("eval_loss_before", "eval_loss_after", "train_loss"):
        assert metrics[key] == pytest.approx(ddp_metrics[key], rel=1e-3), key


def make_on_two_nodes(target: str, overrides: list[str]) -> None:
    """`make <target>` as two nodes of one process each, both on this machine, as a user runs it on two:
    the same command with NODE_RANK 0 and 1 and the shipped multi-node config (gloo on CPUs)."""
    import os
    import socket
    import subprocess

    from tests.conftest import REPO

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    nodes = [
        subprocess.Popen(
            [
                "make",
                "-s",
                target,
                "ACCELERATE_CONFIG=accelerate_configs/multi_node.yaml",
                "NPROC=2",
                "NNODES=2",
                f"NODE_RANK={rank}",
                "MAIN_ADDR=127.0.0.1",
                f"MAIN_PORT={port}",
                f"ARGS={' '.join(overrides)}",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]
        assert "--num_machines 2" in output  # (make prints the launch line)


def test_two_nodes_give_the_two_process_runs_results(ddp, sft_rm_ddp, rm_run, base_model, tmp_path):
    """SFT and PPO through `make` on two nodes (one process each) equal the 2-process DDP runs."""
    from tests.conftest import PPO_RUN, SFT_RUN, base_overrides, sft_overrides

    make_on_two_nodes("sft", [*base_overrides(base_model), *sft_overrides(tmp_path / "sft", base_model, *QUICK_SFT)])
    ddp_runs, (ddp_sft, _, _) = sft_rm_ddp
    metrics = json.loads((tmp_path / "sft" / "demo" / "sft" / "manifest.json").read_text())["metrics"]
    for key in ("eval_loss_before", "eval_loss_after", "train_loss"):
        assert metrics[key] == pytest.approx(ddp_sft[key], rel=1e-3), key

    runs = tmp_path / "ppo"  # the session's SFT and RM, with the overrides that built them: only PPO runs
    for stage in ("sft", "rm"):
        shutil.copytree(rm_run / "demo" / stage, runs / "demo" / stage)
    make_on_two_nodes(
        "ppo", [*base_overrides(base_model), *sft_overrides(runs, base_model, *SFT_RUN), *RM_RUN, *PPO_RUN, *ARGS]
    )
    history = read_jsonl(runs / "demo" / "ppo" / "metrics.jsonl")
    ddp_history = ddp[1]
    assert json.loads((runs / "demo" / "ppo" / "manifest.json").read_text())["metrics"]["processes"] == 2
    for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg"):
        assert [h[key] for h in history] == pytest.approx([h[key] for h in ddp_history], rel=1e-3, abs=1e-5), key


def test_deepspeed_takes_batch_sizes_and_clipping_from_the_recipe():
    """No dataloader passes through `prepare` in PPO, and DeepSpeed clips inside its own step: both
    must be in the DeepSpeed config, and a config that says otherwise is refused."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pipeline import engine

    ds_config = {"gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto"}
    acc = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED,
        gradient_accumulation_steps=2,
        num_processes=4,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=ds_config)),
    )
    engine.configure(acc, micro_batch_size=8, max_grad_norm=0.5)
    assert ds_config == {
        "gradient_clipping": 0.5,
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 64,
    }
    ds_config["gradient_clipping"] = 1.0
    with pytest.raises(ConfigError, match="gradient_clipping=1.0 but the recipe needs 0.5"):
        engine.configure(acc, micro_batch_size=8, max_grad_norm=0.5)


def test_unwrap_reaches_the_module_under_torch_compile():
    """accelerate compiles the prepared model where its config names a dynamo backend; the artifact,
    the reference's adapter switch and generation need the module underneath."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from pipeline import engine

    module = torch.nn.Linear(2, 2)
    assert engine.unwrap(SimpleNamespace(distributed_type=DistributedType.NO), torch.compile(module)) is module
