"""SFT, the reward model and eval on 2 processes against 1 process with the same global batch: the same
learning rate at every step, and losses / accuracy that agree within the noise of another sample
order (each rank sees a different half of every batch). PPO's counterpart is in test_ppo.py."""

from __future__ import annotations

import json

import pytest

from stages import rm, sft
from tests.conftest import DEMO_RECIPE, launch, read_jsonl, rm_args, sft_args

QUICK_SFT = ["sft.dataset.limit=512", "sft.eval_dataset.limit=64", "sft.trainer.num_train_epochs=2",
             "sft.trainer.logging_steps=2"]
QUICK_RM = ["rm.dataset.limit=1024", "rm.eval_dataset.limit=128", "rm.trainer.num_train_epochs=1",
            "rm.reference_limit=32", "rm.trainer.logging_steps=2"]


def trained(runs, stage: str) -> tuple[list[dict], dict]:
    out = runs / "demo" / stage
    log = [h for h in read_jsonl(out / "metrics.jsonl") if "learning_rate" in h]
    return log, json.loads((out / "manifest.json").read_text())["metrics"]


def test_sft_and_rm_on_two_processes_match_one(tmp_path, base_model):
    one, two = tmp_path / "one", tmp_path / "two"
    sft.main(sft_args(one, base_model, *QUICK_SFT, "sft.trainer.per_device_train_batch_size=16"))
    rm.main(rm_args(one, *QUICK_RM, "rm.trainer.per_device_train_batch_size=32"))
    launch(2, "stages/sft.py", *sft_args(two, base_model, *QUICK_SFT, "sft.trainer.per_device_train_batch_size=8"))
    launch(2, "stages/rm.py", *rm_args(two, *QUICK_RM, "rm.trainer.per_device_train_batch_size=16"))

    for stage in ("sft", "rm"):
        (log1, m1), (log2, m2) = trained(one, stage), trained(two, stage)
        assert [h["step"] for h in log1] == [h["step"] for h in log2], stage  # same number of optimiser steps
        assert [h["learning_rate"] for h in log1] == pytest.approx([h["learning_rate"] for h in log2]), stage
        assert m1["train_loss"] == pytest.approx(m2["train_loss"], rel=0.1), stage
    (_, s1), (_, s2) = trained(one, "sft"), trained(two, "sft")
    assert s2["eval_loss_after"] < 0.8 * s2["eval_loss_before"]
    assert s1["eval_loss_after"] == pytest.approx(s2["eval_loss_after"], rel=0.1)
    (_, r1), (_, r2) = trained(one, "rm"), trained(two, "rm")
    assert r2["heldout"]["accuracy"] > 0.6 and abs(r1["heldout"]["accuracy"] - r2["heldout"]["accuracy"]) < 0.1
    # eval on 2 processes too (rank 0 evaluates; the others wait well inside the process-group timeout)
    launch(2, "stages/eval.py", "--recipe", DEMO_RECIPE, f"runs_dir={two}", f"sft.model={base_model}",
           "eval.prompts.limit=16", "eval.max_new_tokens=8")
    assert set(json.loads((two / "demo" / "eval" / "metrics.json").read_text())) == {"settings", "peak_memory_mb", "base",
                                                                                       "sft"}
    print({"sft_eval_loss": (s1["eval_loss_after"], s2["eval_loss_after"]),
           "rm_accuracy": (r1["heldout"]["accuracy"], r2["heldout"]["accuracy"])})
