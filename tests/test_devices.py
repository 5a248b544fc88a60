"""Every model and every input of each stage on the accelerator's device (tests/shadow_device.py).

On a CPU machine a forgotten `.to(device)` is invisible; here the process's device is the shadow
accelerator `cpu:0` and any op that mixes it with host tensors fails the test, naming the op and
the line, as CUDA would ("Expected all tensors to be on the same device")."""

from __future__ import annotations

import pytest

from stages import eval as evaluate
from stages import ppo, rm, sft
from tests.conftest import DEMO_RECIPE, ppo_args, rm_args, sft_args
from tests.shadow_device import ACCELERATOR, ShadowAccelerator

pytestmark = pytest.mark.e2e  # whole stages, several processes


@pytest.fixture
def shadow(monkeypatch):
    """The process's device is the shadow accelerator for accelerate and for the Trainer."""
    from accelerate.state import AcceleratorState, PartialState
    from transformers import TrainingArguments

    for cls in (PartialState, AcceleratorState):
        monkeypatch.setattr(cls, "device", property(lambda self: ACCELERATOR, lambda self, value: None), raising=False)
    real = TrainingArguments.device
    monkeypatch.setattr(TrainingArguments, "device", property(lambda self: real.fget(self) and ACCELERATOR))
    with ShadowAccelerator() as mode:
        yield mode


def test_the_shadow_device_catches_a_model_left_on_the_host(shadow):
    import torch

    model = torch.nn.Linear(4, 2)
    model(torch.ones(3, 4).to(ACCELERATOR))  # the model was never moved
    assert shadow.mixed["linear"] == 1
    model.to(ACCELERATOR)(torch.ones(3, 4, device=ACCELERATOR)).sum().backward()
    assert shadow.mixed["linear"] == 1 and model.weight.grad.device == ACCELERATOR
    torch.nn.Linear(4, 2)(torch.ones(3, 4))  # a model and its input left on the host
    assert shadow.on_host["linear"] == 1


def test_every_stage_keeps_models_and_inputs_on_the_accelerator(tmp_path, base_model, shadow):
    """LoRA SFT and RM (adapter merge, held-out report and reference statistics), full PPO (a
    separate reference model, value model from the reward model), then eval of all three policies."""
    sft.main(
        sft_args(tmp_path, base_model, "sft.finetune=lora", "sft.dataset.limit=64", "sft.trainer.num_train_epochs=1")
    )
    rm.main(
        rm_args(
            tmp_path,
            "rm.finetune=lora",
            "rm.dataset.limit=64",
            "rm.eval_dataset.limit=16",
            "rm.trainer.num_train_epochs=1",
            "rm.reference_limit=16",
        )
    )
    ppo.main(ppo_args(tmp_path, "ppo.total_episodes=64"))
    evaluate.main(
        [
            "--recipe",
            DEMO_RECIPE,
            f"runs_dir={tmp_path}",
            f"sft.model={base_model}",
            "eval.prompts.limit=8",
            "eval.max_new_tokens=8",
            "eval.batch_size=4",
        ]
    )
    assert (tmp_path / "demo" / "eval" / "manifest.json").is_file()
    assert not shadow.mixed and not shadow.on_host, shadow.report()


def test_lora_ppo_keeps_models_and_inputs_on_the_accelerator(runs_with_rm, shadow):
    """LoRA PPO: the reference is the policy with its adapter disabled; the value model has its own."""
    ppo.main(ppo_args(runs_with_rm, "ppo.total_episodes=64", "ppo.finetune=lora"))
    assert not shadow.mixed and not shadow.on_host, shadow.report()
