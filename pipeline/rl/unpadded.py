"""Forwards without padding: the policy, value and reference models read only a batch's real tokens.

A rollout batch is padded twice: prompts on the left to the longest prompt, responses on the right
to the longest response. On the demo a quarter of the token slots are padding; on real runs, with
responses of 50 to 1000 tokens, often half. A transformer's linear layers, norms and activations
treat each token alone, so they run on the real tokens only, concatenated into one row (1, N) with
each sequence's own position ids; only attention needs the sequences apart, and it gets them, each
in a row of its own, right-padded (causal attention over a right-padded row needs no mask: no real
token attends to a later slot). The outputs equal the padded forward's to float rounding; the
padding's share of the matrix products is saved, in forward and backward (verl's remove-padding and
OpenRLHF's packed samples do this with flash-attn's varlen kernel, which CPUs lack and which is not
among our requirements).

How: the models' attention implementation becomes `rlhf_sdpa` (`enable`), transformers' own SDPA
attention plus the unpadded case: a forward given `unpadded=Layout` (transformers passes extra
keyword arguments on to the attention function, the route its packed-sequence training takes)
scatters the real tokens' queries, keys and values into rows, attends, and gathers the outputs
back. Every other call (generation with its KV cache, the padded forwards) is SDPA as before. The
implementation stays set, so gradient checkpointing's recomputation in backward, which calls the
layers again with the same arguments, is unpadded too.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "rlhf_sdpa"


class Layout:
    """Where a padded batch's real tokens go. `attention_mask` (B, L) is 1 on real tokens (left-padded
    prompts, right-padded responses, any pattern); `response_len` R: the last R columns hold the
    responses.

    input_ids, position_ids (1, N): the real tokens in row order, with each sequence's positions;
    slots (N,): each real token's place in the (B, width) right-padded rows attention works on;
    predictors (B, R): the index in N of the token whose output predicts each response token (padding
    past a response's end reads its last real token: masked out downstream, like the padded logits
    there)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int):
        real = attention_mask.bool()
        lengths = real.sum(1)
        # the sizes take one host sync (flash-attn's unpadding, which verl and OpenRLHF use, takes two;
        # transformers' check for packed position ids in each forward one more); the indices follow
        # without one
        self.width, count = torch.stack([lengths.max(), lengths.sum()]).tolist()
        self.rows = real.shape[0]
        at = torch.nonzero_static(real.flatten(), size=count).squeeze(1)  # row by row, left to right
        position = real.long().cumsum(1) - 1  # within its sequence, on real tokens
        self.input_ids = input_ids.flatten()[at].unsqueeze(0)
        self.position_ids = position.flatten()[at].unsqueeze(0)
        self.slots = at // real.shape[1] * self.width + self.position_ids[0]
        starts = lengths.cumsum(0) - lengths
        index = (starts.unsqueeze(1) + position).clamp(min=0)  # right padding: the last real token's
        self.predictors = index[:, -response_len - 1 : -1]
        self.attention_calls = 0  # by `attention`, during `forward`

    def forward(self, model, **kwargs):
        """`model`'s forward on the real tokens (no attention mask: `unpadded` says where each sequence
        is), checked: every layer must have attended with the layout. A layer that did not (a forward
        that does not pass its keyword arguments on) would have attended across sequences."""
        self.attention_calls = 0
        out = model(
            input_ids=self.input_ids, position_ids=self.position_ids, attention_mask=None, unpadded=self, **kwargs
        )
        config = getattr(model, "module", model).config  # (through a frozen model's DeepSpeed engine)
        layers = config.get_text_config().num_hidden_layers
        if self.attention_calls != layers:
            raise RuntimeError(
                f"{type(model).__name__}: {self.attention_calls} of its {layers} layers attended "
                f"unpadded, so it cannot run unpadded: set ppo.remove_padding=false"
            )
        return out

    def rows_of(self, x: torch.Tensor) -> torch.Tensor:
        """(1, H, N, D) per-token heads -> (B, H, width, D) one right-padded row per sequence."""
        heads, _, dim = x.shape[1:]
        flat = x[0].transpose(0, 1)  # (N, H, D)
        # in place: `index_copy` would first copy the zeros into another buffer of the rows' size
        rows = flat.new_zeros(self.rows * self.width, heads, dim).index_copy_(0, self.slots, flat)
        return rows.view(self.rows, self.width, heads, dim).transpose(1, 2)

    def tokens_of(self, out: torch.Tensor) -> torch.Tensor:
        """(B, width, H, D) attention output -> (1, N, H, D) for the real tokens."""
        return out.reshape(self.rows * self.width, *out.shape[2:]).index_select(0, self.slots).unsqueeze(0)


def attention(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    unpadded: Layout | None = None,
    **kwargs,
):
    """transformers' SDPA attention; with `unpadded`, over each sequence's row (see the module's doc)."""
    if unpadded is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    unpadded.attention_calls += 1
    window, mask = kwargs.pop("sliding_window", None), None
    if window is not None and unpadded.width > window:  # a token sees itself and the window - 1 before it
        mask = torch.ones(unpadded.width, unpadded.width, dtype=torch.bool, device=query.device)
        mask = mask.tril().triu(1 - window)
    out, _ = sdpa_attention_forward(
        module,
        unpadded.rows_of(query),
        unpadded.rows_of(key),
        unpadded.rows_of(value),
        mask,
        dropout=dropout,
        scaling=scaling,
        is_causal=mask is None,
        **kwargs,
    )
    return unpadded.tokens_of(out), None


def mask(*args, attention_mask=None, **kwargs):
    """SDPA's mask, and none for an unpadded forward (no 2D mask: `attention` places the sequences),
    where transformers would otherwise build an (N, N) mask from the position ids. (So an enabled
    model called without a 2D mask and without `unpadded` attends causally over its whole input: the
    stage's padded calls, generation included, always pass one.)"""
    return None if attention_mask is None else sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


AttentionInterface.register(ATTENTION, attention)
AttentionMaskInterface.register(ATTENTION, mask)


# Families whose attention layers are given their sliding window (`attention` applies it); in others a
# window lives in the mask functions alone, which an unpadded forward does not use
WINDOW_PASSED = {"mistral", "qwen2", "qwen3"}


def supports(model) -> bool:
    """Whether `model` (a transformers model) can run unpadded: its attention goes through transformers'
    attention interface and is SDPA (eager, flash and flex implementations a user chose are kept), every
    attention layer is causal (an encoder's is not), every layer is attention (a convolution or state
    layer, as in LFM2 or Mamba hybrids, would run across the sequences of the one row), and a sliding
    window or attention chunk, if any, reaches the attention function."""
    config = model.config.get_text_config()
    causal = all(getattr(m, "is_causal", True) for m in model.modules())
    attention_only = set(getattr(config, "layer_types", None) or ()) <= {"full_attention", "sliding_attention"}
    window = getattr(config, "sliding_window", None) is not None or getattr(config, "attention_chunk_size", None)
    return (
        bool(getattr(model, "_supports_attention_backend", False))
        and config._attn_implementation in ("sdpa", ATTENTION)
        and not getattr(config, "is_encoder_decoder", False)
        and causal
        and attention_only
        and (not window or config.model_type in WINDOW_PASSED)
    )


def enable(*models) -> bool:
    """Switch every one of `models` (transformers models) to `rlhf_sdpa` if every one `supports` it
    (the policy and value model share each forward's layout); whether they were."""
    if not all(supports(m) for m in models):
        return False
    for m in models:
        m.set_attn_implementation(ATTENTION)
    return True


def enabled(model) -> bool:
    """Whether `model` (peft's or a frozen model's DeepSpeed engine around it, or none) runs unpadded."""
    return getattr(model, "module", model).config.get_text_config()._attn_implementation == ATTENTION
