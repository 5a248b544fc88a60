"""Checks that need a real GPU: `make test-gpu` on a CUDA machine (not part of `make test`).

The CPU suite covers the same behaviours with bf16 autocast on the CPU and a shadow accelerator
(tests/test_devices.py); this file runs the whole chain on CUDA with the recipe's `dtype: auto`
(bf16 where the GPU supports it) and asserts, for every module forward, that its parameters and
its tensor inputs are on the GPU. The figures it prints go into the closing notes of GPU work.
"""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.artifacts import read_manifest
from stages import eval as evaluate
from stages import ppo, rm, sft
from tests.conftest import DEMO_RECIPE, ppo_args, rm_args, sft_args

AUTO = ["sft.dtype=auto", "rm.dtype=auto", "ppo.dtype=auto"]


@pytest.fixture(autouse=True, scope="module")
def cuda():
    assert torch.cuda.is_available(), "make test-gpu needs a CUDA GPU"


@pytest.fixture
def forwards_on_gpu():
    """Every module forward: parameters and tensor inputs on CUDA. Collects offenders by class."""
    offenders = set()

    def check(module, args, kwargs):
        tensors = [*module.parameters(recurse=False),
                   *(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))]
        if any(t.device.type != "cuda" for t in tensors):
            offenders.add(type(module).__name__)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(check, with_kwargs=True)
    yield offenders
    handle.remove()


def test_the_chain_on_gpu_in_the_compute_dtype(tmp_path, base_model, forwards_on_gpu):
    sft.main(sft_args(tmp_path, base_model, *AUTO))
    rm.main(rm_args(tmp_path, *AUTO))
    ppo.main(ppo_args(tmp_path, *AUTO, "ppo.total_episodes=320"))
    evaluate.main(["--recipe", DEMO_RECIPE, f"runs_dir={tmp_path}", f"sft.model={base_model}", *AUTO,
                   "eval.prompts.limit=64"])
    assert not forwards_on_gpu, f"forwards with a tensor off the GPU: {sorted(forwards_on_gpu)}"
    ppo_metrics = read_manifest(tmp_path / "demo" / "ppo")["metrics"]
    # the reference computes as the policy does under bf16 autocast on CUDA: no KL before the first update
    first = json.loads((tmp_path / "demo" / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["objective/kl"]) < 1e-5, first["objective/kl"]
    assert ppo_metrics["objective/scores"] > ppo_metrics["score_first"]
    evaluation = json.loads((tmp_path / "demo" / "eval" / "metrics.json").read_text())
    print(json.dumps({"ppo": ppo_metrics, "eval_ppo": evaluation["ppo"]["sampled"],
                      "eval_peak_memory_mb": evaluation["peak_memory_mb"]}, indent=1))
