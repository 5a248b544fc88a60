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
from tests.conftest import (
    DEMO_RECIPE,
    assert_learned,
    control_run,
    ppo_args,
    quantized_layers,
    read_jsonl,
    rm_args,
    sft_args,
)

AUTO = ["sft.dtype=auto", "rm.dtype=auto", "ppo.dtype=auto"]


@pytest.fixture(autouse=True, scope="module")
def cuda():
    assert torch.cuda.is_available(), "make test-gpu needs a CUDA GPU"


@pytest.fixture
def forwards_on_gpu():
    """Every module forward: parameters and tensor inputs on CUDA. Collects offenders by class."""
    offenders = set()

    def check(module, args, kwargs, output):
        tensors = [
            *module.parameters(recurse=False),
            *(a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)),
        ]
        if any(t.device.type != "cuda" for t in tensors):
            offenders.add(type(module).__name__)

    # (torch's global pre-hook takes no keyword arguments; the forward hook sees the same inputs)
    handle = torch.nn.modules.module.register_module_forward_hook(check, with_kwargs=True)
    yield offenders
    handle.remove()


def test_the_chain_on_gpu_in_the_compute_dtype(tmp_path, base_model, forwards_on_gpu, linear_output_dtypes):
    sft.main(sft_args(tmp_path, base_model, *AUTO))
    rm.main(rm_args(tmp_path, *AUTO))
    ppo.main(ppo_args(tmp_path, *AUTO, "ppo.total_episodes=320"))
    evaluate.main(
        ["--recipe", DEMO_RECIPE, f"runs_dir={tmp_path}", f"sft.model={base_model}", *AUTO, "eval.prompts.limit=64"]
    )
    assert not forwards_on_gpu, f"forwards with a tensor off the GPU: {sorted(forwards_on_gpu)}"
    assert torch.bfloat16 in linear_output_dtypes, "dtype auto did not compute in bf16 on this GPU"
    ppo_metrics = read_manifest(tmp_path / "demo" / "ppo")["metrics"]
    # the reference computes as the policy does under bf16 autocast on CUDA: no KL before the first update
    first = json.loads((tmp_path / "demo" / "ppo" / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["objective/kl"]) < 1e-5, first["objective/kl"]
    history = read_jsonl(tmp_path / "demo" / "ppo" / "metrics.jsonl")
    assert_learned(history, control_run(tmp_path, tmp_path / "control", *AUTO, "ppo.total_episodes=320"), margin=0.4)
    evaluation = json.loads((tmp_path / "demo" / "eval" / "metrics.json").read_text())
    print(
        json.dumps(
            {
                "ppo": ppo_metrics,
                "eval_ppo": evaluation["ppo"]["sampled"],
                "eval_peak_memory_mb": evaluation["peak_memory_mb"],
            },
            indent=1,
        )
    )


@pytest.mark.parametrize(
    "variant",
    [
        ["ppo.finetune=lora"],
        ["ppo.finetune=qlora-4bit"],
        ["ppo.finetune=qlora-8bit"],
        ["ppo.gradient_checkpointing=true", "ppo.value_model=head"],
    ],
)
def test_ppo_variants_on_gpu(variant, rm_run, tmp_path, forwards_on_gpu, linear_output_dtypes, loaded_models):
    """LoRA, QLoRA (bitsandbytes' CUDA kernels: the main GPU-only risk), gradient checkpointing and the
    value head, each a short PPO run on the GPU in bf16."""
    import shutil

    for stage in ("sft", "rm"):
        shutil.copytree(rm_run / "demo" / stage, tmp_path / "demo" / stage)
    ppo.main(ppo_args(tmp_path, *AUTO, *variant, "ppo.total_episodes=64", "ppo.learning_rate=1e-3"))
    assert not forwards_on_gpu, f"forwards with a tensor off the GPU: {sorted(forwards_on_gpu)}"
    assert torch.bfloat16 in linear_output_dtypes
    history = read_jsonl(tmp_path / "demo" / "ppo" / "metrics.jsonl")
    tolerance = 1e-2 if "qlora-8bit" in variant[0] else 1e-4  # LLM.int8 depends on the batch (see test_ppo)
    assert all(abs(h["first_minibatch"]["ratio"] - 1) < tolerance for h in history), history
    bits = quantized_layers(loaded_models[0])
    assert bits == {"4bit": 14 if "4bit" in variant[0] else 0, "8bit": 14 if "8bit" in variant[0] else 0}
    print(
        variant, {k: history[-1][k] for k in ("objective/scores", "objective/kl", "episodes_per_s", "peak_memory_mb")}
    )
    if "ppo.finetune=qlora-4bit" in variant:
        new, old = qlora_artifact_gaps(loaded_models[0], tmp_path / "demo")
        print(
            f"qlora-4bit artifact vs the trained policy, mean |log-prob difference|: merged into the dequantized "
            f"base {new:.2e}, into the original weights {old:.2e}"
        )
        assert new < old


def qlora_artifact_gaps(trained, run) -> tuple[float, float]:
    """How far the QLoRA artifact's log-probs are from the policy PPO trained (its NF4 base on the GPU
    with the adapter), both under bf16 autocast: the artifact as saved (merged into the dequantized
    base) and the adapter merged into the original float32 weights instead."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run / "ppo")
    enc = tokenizer(
        ["how was the music of star quest ? it was loud and long .", "tell me about the city ."],
        return_tensors="pt",
        padding=True,
    ).to("cuda")

    @torch.no_grad()
    def logprobs(model):
        with torch.autocast("cuda", torch.bfloat16):
            logits = model(**enc).logits[:, :-1].float()
        return logits.log_softmax(-1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0][
            enc["attention_mask"][:, 1:] > 0
        ]

    reference = logprobs(trained.eval())
    artifact = AutoModelForCausalLM.from_pretrained(run / "ppo").cuda()
    original = (
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(run / "sft", dtype=torch.float32), run / "ppo" / "adapter"
        )
        .merge_and_unload()
        .cuda()
    )
    return tuple((logprobs(m) - reference).abs().mean().item() for m in (artifact, original))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_log_probs_and_entropy_go_through_trls_fused_kernel_on_the_gpu(dtype):
    """On a GPU the rollout's and the update's log-probs (and the rollout's entropy) come from trl's
    Triton kernel, imported from trl.kernels (not through trl.trainer.utils, which imports peft): it
    reads bf16 logits as they are and computes in float32, and its gradient is the log-softmax's."""
    from pipeline.rl import algorithms

    torch.manual_seed(0)
    logits = (torch.randn(6, 9, 300, device="cuda") * 4).to(dtype)[:, 1:]  # sliced, as response logits are
    tokens = torch.randint(0, 300, (6, 8), device="cuda")
    assert algorithms._fused(logits)
    exact = (logits.double() / 0.7).log_softmax(-1)
    logp, entropy = algorithms.logprobs_and_entropy(logits, tokens, 0.7)
    assert logp.dtype == entropy.dtype == torch.float32
    torch.testing.assert_close(logp.double(), exact.gather(-1, tokens[..., None])[..., 0], rtol=0, atol=1e-4)
    torch.testing.assert_close(entropy.double(), -(exact.exp() * exact).sum(-1), rtol=0, atol=1e-4)
    leaf = logits.detach().float().requires_grad_()
    (grad,) = torch.autograd.grad(algorithms.logprobs_of(leaf, tokens, 0.7).sum(), leaf)
    exact_leaf = logits.detach().double().requires_grad_()
    (exact_grad,) = torch.autograd.grad(
        (exact_leaf / 0.7).log_softmax(-1).gather(-1, tokens[..., None]).sum(), exact_leaf
    )
    torch.testing.assert_close(grad.double(), exact_grad, rtol=0, atol=1e-4)
