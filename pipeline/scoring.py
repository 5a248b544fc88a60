"""Turning (prompt, response) pairs into model inputs and reward-model scores.

There is one reward scorer, `RewardScorer`, and every stage reads the reward model through it: the RM
stage's held-out report and reference statistics, PPO and eval. It renders a prompt and response into
exactly the tokens trl's RewardTrainer trained on (`reward_input_ids`), so the score PPO optimises,
the statistics it normalises with and the score eval reports are one quantity. (Reading the score
anywhere else, e.g. at the policy's stop token, differs for ChatML templates, whose training text
ends in a newline after `<|im_end|>`, and for tokenizers that prepend BOS.)
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch

from pipeline.data import is_conversational


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def load_callable(spec: str) -> Callable:
    """'package.module:function' -> the function (the recipe names judges this way)."""
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"'{spec}' must be of the form module:function")
    return getattr(importlib.import_module(module), name)


def reward_input_ids(tokenizer, prompt, response) -> list[int]:
    """Token ids of prompt + response exactly as trl's RewardTrainer tokenizes a preference side.

    Conversational: the whole conversation through the chat template (`apply_chat_template(...,
    tokenize=True)`, whose template writes any BOS itself). Plain text: prompt + response + EOS (added
    unless present), tokenized with the tokenizer's special tokens (its BOS, if it adds one). `prompt`
    may be None (implicit prompt: the response is the whole conversation).
    """
    if is_conversational(response) or is_conversational(prompt):
        if not is_conversational(response):
            response = [{"role": "assistant", "content": response}]
        messages = (prompt if is_conversational(prompt) else
                    [{"role": "user", "content": prompt}] if prompt else []) + response
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    if not response.endswith(tokenizer.eos_token):
        response = response + tokenizer.eos_token
    return tokenizer((prompt or "") + response)["input_ids"]


class RewardScorer:
    """A frozen reward model and its tokenizer, scoring (prompt, response) pairs as it was trained."""

    def __init__(self, model, tokenizer, device: torch.device | None = None, batch_size: int = 64):
        model.eval()  # not `model = model.eval()`: a DeepSpeed engine's eval() returns None
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = device if device is not None else next(model.parameters()).device

    @torch.no_grad()  # not inference_mode: ZeRO-3 / FSDP2 gather parameters here that backward uses later
    def __call__(self, prompts: list, responses: list) -> torch.Tensor:
        """Scalar reward of each pair, as a float32 tensor on the scorer's device."""
        ids = [reward_input_ids(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        scores = []
        for i in range(0, len(ids), self.batch_size):
            # Left padding: the last position is a real token whatever the model's pooling does.
            enc = self.tokenizer.pad({"input_ids": ids[i:i + self.batch_size]}, padding_side="left",
                                     return_tensors="pt").to(self.device)
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                position_ids=position_ids(enc["attention_mask"]), use_cache=False).logits
            scores.append(logits[:, 0].float())
        return torch.cat(scores)
