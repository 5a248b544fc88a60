"""Turning (prompt, response) pairs into model inputs and reward-model scores."""

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


def conversation_text(tokenizer, prompt, response) -> str:
    """The full text a reward model scores, chat-templated with *its* tokenizer where conversational.

    `prompt` may be None (preference data with an implicit prompt: the response is the whole
    conversation). Plain-text pairs get an EOS, as trl's RewardTrainer adds during training.
    """
    if is_conversational(response) or is_conversational(prompt):
        if not is_conversational(response):
            response = [{"role": "assistant", "content": response}]
        messages = (prompt if is_conversational(prompt) else
                    [{"role": "user", "content": prompt}] if prompt else []) + response
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return (prompt or "") + response + tokenizer.eos_token


@torch.inference_mode()
def reward_scores(model, tokenizer, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Scalar reward of each text, read at its last real token, as a float32 CPU tensor."""
    device = next(model.parameters()).device
    scores = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(device)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       position_ids=position_ids(enc["attention_mask"])).logits
        scores.append(logits[:, 0].float().cpu())
    return torch.cat(scores)
