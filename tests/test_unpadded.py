"""Forwards without padding (pipeline/rl/unpadded.py): the layout by hand, and for each family the
unpadded forward and backward equal the padded ones while the model reads only the real tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    GemmaConfig,
    GPT2Config,
    Lfm2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
)

from pipeline.rl import unpadded
from pipeline.rl.iteration import PolicyAndValue, disable_dropout, response_values
from pipeline.rl.rollout import response_logits
from pipeline.rl.unpadded import Layout

SMALL = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
)
CONFIGS = {
    "llama": lambda: LlamaConfig(**{**SMALL, "num_key_value_heads": 4}),
    "qwen2": lambda: Qwen2Config(head_dim=16, **SMALL),  # grouped-query attention
    "qwen3": lambda: Qwen3Config(head_dim=16, **SMALL),
    "mistral": lambda: MistralConfig(head_dim=16, sliding_window=3, **SMALL),  # a window shorter than the rows
    "gemma": lambda: GemmaConfig(head_dim=16, **SMALL),
    "gpt2": lambda: GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64, pad_token_id=0),
}


def value_model(family: str, attn_implementation: str = "sdpa"):
    config = CONFIGS[family]()
    config.num_labels = 1
    return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation)


def test_the_layout_places_each_real_token_by_hand():
    # prompts left-padded, then R = 3 response columns right-padded (row 0's response is 1 token)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]])
    ids = torch.arange(6).repeat(3, 1) + 10 * torch.arange(3).unsqueeze(1)
    layout = Layout(ids, mask, response_len=3)
    assert layout.input_ids.tolist() == [[1, 2, 3, 10, 11, 12, 13, 14, 15, 22, 23, 24]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2]]
    assert (layout.rows, layout.width) == (3, 6)
    assert layout.slots.tolist() == [0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    # columns 2, 3, 4 predict the response columns 3, 4, 5; padding reads the row's last real token
    assert layout.predictors.tolist() == [[1, 2, 2], [5, 6, 7], [9, 10, 11]]


def batch(seed: int = 0):
    """Left-padded prompts of 2-5 tokens, responses of 1-4 of R = 4 columns, right-padded."""
    g = torch.Generator().manual_seed(seed)
    prompts, responses, R = [2, 5, 3, 4], [4, 1, 3, 2], 4
    P = max(prompts)
    mask = torch.zeros(len(prompts), P + R, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        mask[i, P - p : P + r] = 1
    ids = torch.randint(1, 97, mask.shape, generator=g) * mask
    return ids, mask, mask[:, P:].bool(), R


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "gradient-checkpointing"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_unpadded_forward_and_backward_equal_the_padded_ones_on_the_real_tokens_alone(family, checkpointing):
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(CONFIGS[family](), attn_implementation="sdpa")
    value = value_model(family)
    ids, mask, response_mask, R = batch()
    results = {}
    for remove_padding in (False, True):
        model = PolicyAndValue(policy, value)
        disable_dropout(model)  # as the stage does (GPT-2's configs have dropout)
        assert unpadded.enable(policy, value) if remove_padding else not unpadded.enabled(policy)
        if checkpointing:
            model.enable_gradient_checkpointing()
        model.train()
        tokens_read = []
        hook = policy.get_input_embeddings().register_forward_hook(
            lambda m, args, out: tokens_read.append(args[0].numel())
        )
        logits, values = model(ids, mask, R)
        hook.remove()
        # the loss the update takes: every real response token's log-softmax and value
        loss = logits.log_softmax(-1).amax(-1)[response_mask].sum() + values[response_mask].pow(2).sum()
        loss.backward()
        results[remove_padding] = logits[response_mask], values[response_mask], grads(model), tokens_read
        for m in (policy, value):  # back to the padded forward for the other half
            m.set_attn_implementation("sdpa")
            m.gradient_checkpointing_disable()
    (padded_logits, padded_values, padded_grads, padded_read), (logits, values, grad, read) = (
        results[False],
        results[True],
    )
    assert padded_read == [mask.numel()] and read == [int(mask.sum())]  # the policy's embedding saw only real tokens
    torch.testing.assert_close(logits, padded_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values, padded_values, atol=1e-5, rtol=1e-5)
    assert grad.keys() == padded_grads.keys()
    for name in grad:
        torch.testing.assert_close(grad[name], padded_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_a_generation_after_unpadded_forwards_is_the_padded_models():
    """The implementation stays switched for the whole run: generation (KV cache, padded prompts)
    through it samples exactly what SDPA samples."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS["qwen2"](), attn_implementation="sdpa")
    ids, mask, _, _ = batch()
    prompt, prompt_mask = ids[:, :5], mask[:, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    padded = model.generate(input_ids=prompt, attention_mask=prompt_mask, **kwargs)
    assert unpadded.enable(model)
    assert torch.equal(model.generate(input_ids=prompt, attention_mask=prompt_mask, **kwargs), padded)


def test_models_that_cannot_run_unpadded_run_padded():
    decoder = AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="sdpa")
    assert unpadded.supports(decoder)
    assert not unpadded.supports(AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="eager"))
    encoder = BertModel(
        BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        add_pooling_layer=False,
    )
    assert not unpadded.supports(encoder)  # bidirectional: its attention is not causal
    # LFM2: convolution layers between the attention layers would mix the sequences of the one row
    hybrid = Lfm2Config(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv", "full_attention"],
    )
    assert not unpadded.supports(AutoModelForCausalLM.from_config(hybrid, attn_implementation="sdpa"))
    # Qwen2-MoE keeps its sliding window in the mask functions: its attention would never see it
    windowed = Qwen2MoeConfig(
        **{**SMALL, "num_experts": 2, "num_experts_per_tok": 1, "moe_intermediate_size": 32},
        use_sliding_window=True,
        sliding_window=3,
    )
    assert not unpadded.supports(AutoModelForCausalLM.from_config(windowed, attn_implementation="sdpa"))
    assert unpadded.supports(AutoModelForCausalLM.from_config(CONFIGS["mistral"](), attn_implementation="sdpa"))
    # a value model that cannot makes the policy run padded too (one layout per forward)
    assert not unpadded.enable(decoder, value_model("llama", attn_implementation="eager"))
    assert not unpadded.enabled(decoder)


def test_a_model_whose_attention_never_saw_the_layout_is_an_error_not_a_wrong_result():
    model = AutoModelForCausalLM.from_config(CONFIGS["llama"](), attn_implementation="sdpa")  # not enabled
    ids, mask, _, R = batch()
    with pytest.raises(
        RuntimeError,
        match="0 of its 2 layers attended unpadded, so it cannot run unpadded: set ppo.remove_padding=false",
    ):
        response_logits(model, ids, mask, R, Layout(ids, mask, R))
    # one layout for the policy and the value model: each model's own layers must have used it
    layout = Layout(ids, mask, R)
    assert unpadded.enable(model)
    response_logits(model, ids, mask, R, layout)
    with pytest.raises(RuntimeError, match="cannot run unpadded"):
        response_values(value_model("llama"), ids, mask, R, layout)
