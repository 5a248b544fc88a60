"""Turning (prompt, response) pairs into model inputs and reward-model scores.

There is one reward scorer, `RewardScorer`, and every stage reads the reward model through it: the RM
stage's held-out report and reference statistics, PPO and eval. It renders a prompt and response into
exactly the tokens trl's RewardTrainer trained on (`reward_input_ids`), so the score PPO optimises,
the statistics it normalises with and the score eval reports are one quantity. (Reading the score
anywhere else, e.g. at the policy's stop token, differs for ChatML templates, whose training text
ends in a newline after `<|im_end|>`, and for tokenizers that prepend BOS.)

Encoder reward models (BERT / RoBERTa / DeBERTa classifiers, `models.is_encoder`) have no chat
template and no EOS: they read `[CLS] prompt [SEP] response [SEP]`, the text pair they were
pre-trained on, and pool the first token. The RM stage trains them on the ids `reward_input_ids`
gives (`encoder_pairs`), so training and scoring are again one rendering.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import contextmanager

import torch
from transformers import AutoModelForSequenceClassification

from pipeline.data import is_conversational
from pipeline.errors import ConfigError
from pipeline.models import align_special_tokens, bound_encoder_length, is_encoder, load_tokenizer


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on the first real token, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def load_callable(spec: str) -> Callable:
    """'package.module:function' -> the function (the recipe names judges this way)."""
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"'{spec}' must be of the form module:function")
    return getattr(importlib.import_module(module), name)


def plain_text(x) -> str:
    """A conversation as an encoder reads it: one turn is its text; several are "role: text" paragraphs."""
    if x is None or isinstance(x, str):
        return x or ""
    if len(x) == 1:
        return x[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in x)


@contextmanager
def truncating_left(tokenizer):
    """Tokenizers take the truncation side from an attribute only: set for one call, then restored."""
    side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        yield
    finally:
        tokenizer.truncation_side = side


def encoder_input_ids(tokenizer, prompt, response) -> list[int]:
    """`[CLS] prompt [SEP] response [SEP]` (or the tokenizer's own pair form), cut to its maximum
    length by dropping the start of the prompt, so the response being judged stays whole (only a
    response that alone overflows the window loses its start too). An implicit conversational prompt
    is split off the last turn; plain text with no prompt is one sequence. Segment ids are not used:
    trl's preference collator carries input ids only, so scoring omits them too (DeBERTa-v3 and
    RoBERTa have none anyway)."""
    if prompt is None and is_conversational(response) and len(response) > 1:
        prompt, response = response[:-1], response[-1:]
    prompt, response = plain_text(prompt), plain_text(response)
    # an empty response still makes a pair (tokenizers read "" as no second text; " " is one)
    texts = [prompt, response or " "] if prompt else [response]
    ids = tokenizer(*texts)["input_ids"]
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return ids
    overflow = len(ids) - limit
    prompt_fits = len(texts) == 2 and len(tokenizer(texts[0], add_special_tokens=False)["input_ids"]) > overflow
    with truncating_left(tokenizer):
        return tokenizer(*texts, truncation="only_first" if prompt_fits else "longest_first", max_length=limit)[
            "input_ids"
        ]


def reward_input_ids(tokenizer, prompt, response) -> list[int]:
    """Token ids of prompt + response exactly as trl's RewardTrainer tokenizes a preference side
    (for an encoder, as the RM stage trains it: `encoder_input_ids`).

    Conversational: the whole conversation through the chat template (`apply_chat_template(...,
    tokenize=True)`, whose template writes any BOS itself). Plain text: prompt + response + EOS (added
    unless present), tokenized with the tokenizer's special tokens (its BOS, if it adds one). `prompt`
    may be None (implicit prompt: the response is the whole conversation).
    """
    if is_encoder(tokenizer):
        return encoder_input_ids(tokenizer, prompt, response)
    if is_conversational(response) or is_conversational(prompt):
        if tokenizer.chat_template is None:
            raise ConfigError(
                f"the reward model's tokenizer ({tokenizer.name_or_path}) has no chat template, so it "
                f"cannot read conversations: use plain-text prompts, or a reward model with a template"
            )
        if not is_conversational(response):
            response = [{"role": "assistant", "content": response}]
        messages = (
            prompt if is_conversational(prompt) else [{"role": "user", "content": prompt}] if prompt else []
        ) + response
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    if not response.endswith(tokenizer.eos_token):
        response = response + tokenizer.eos_token
    return tokenizer((prompt or "") + response)["input_ids"]


def turn_closing(tokenizer) -> list[int] | None:
    """What the chat template writes after an assistant turn's content (ChatML: `<|im_end|>` and a
    newline), if it renders a conversation with a last assistant turn as exactly: the generation
    prompt's ids (what the policy was conditioned on), the content's own ids, then this closing. A
    reward model with the policy's tokenizer then reads a rollout's ids with the closing appended:
    `reward_input_ids` of its decoded text, for each response whose text tokenizes to its own ids in
    that place (`ModelReward` checks each), without rendering it again. Checked
    on two probe turns, one that begins and ends in whitespace; None (render from text) for a template
    that changes the content (Llama-3's trims it), closes differently by content, or cannot render; a
    multi-turn prompt with a system turn is probed too, where the template takes one."""
    user = [{"role": "user", "content": "Name a colour."}]
    history = [
        {"role": "system", "content": "Be brief."},
        *user,
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "Another?"},
    ]
    closings = []
    for prompt, content, optional in (
        (user, "Blue.", False),
        (user, " Deep  blue,\nlike the sea. ", False),
        (history, "Green.", True),
    ):
        try:
            prefix = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
            full = tokenizer.apply_chat_template(
                prompt + [{"role": "assistant", "content": content}], tokenize=True, return_dict=True
            )["input_ids"]
        except Exception:  # no template, or one that refuses the probe (Gemma's: no system turn)
            if optional:
                continue
            return None
        body = list(prefix) + tokenizer.encode(content, add_special_tokens=False)
        if list(full[: len(body)]) != body:
            return None
        closings.append(list(full[len(body) :]))
    return closings[0] if all(c == closings[0] for c in closings) else None


def encoder_pairs(dataset, tokenizer):
    """A preference dataset as `chosen_ids` / `rejected_ids` for an encoder, which RewardTrainer then
    takes as they are (it would otherwise append an EOS or apply a chat template)."""

    def render(row):
        prompt = row.get("prompt")
        return {
            "chosen_ids": encoder_input_ids(tokenizer, prompt, row["chosen"]),
            "rejected_ids": encoder_input_ids(tokenizer, prompt, row["rejected"]),
        }

    keep = {"margin"} & set(dataset.column_names)
    return dataset.map(render, remove_columns=[c for c in dataset.column_names if c not in keep])


def load_reward_model(path, dtype: torch.dtype):
    """A frozen reward model and its tokenizer, from this run's RM stage or from anywhere (a hub id,
    a directory of any sequence classifier with one output). Many classifiers have no pad token
    (GPT-2 and Llama-based ones) or `pad_token_id: null` in their config: they get one as a policy
    does (`load_tokenizer`: an existing token, never a new one, so the model is never resized)."""
    model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
    if model.config.num_labels != 1:
        raise ConfigError(
            f"the reward model '{path}' has {model.config.num_labels} outputs; a reward model "
            f"gives one score (num_labels=1)"
        )
    tokenizer = load_tokenizer(str(path), reward=True)
    if model.config.pad_token_id is not None:
        # a trained classifier pools at the last token that is not its config's pad token: scoring
        # must pad with that one, whatever the tokenizer says, or the score moves to another token
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(model.config.pad_token_id)
    else:
        align_special_tokens(model, tokenizer)
    return model.requires_grad_(False).eval(), tokenizer


class RewardScorer:
    """A frozen reward model and its tokenizer, scoring (prompt, response) pairs as it was trained."""

    def __init__(
        self, model, tokenizer, device: torch.device | None = None, batch_size: int = 64, max_length: int | None = None
    ):
        """`max_length`: a decoder reads at most the last this many tokens of a rendered pair (the end
        of the response and the template's closing, where it reads the score; an encoder's pairs are
        cut to its positions when rendered, `encoder_input_ids`)."""
        model.eval()  # not `model = model.eval()`: a DeepSpeed engine's eval() returns None
        self.model, self.tokenizer, self.batch_size, self.max_length = model, tokenizer, batch_size, max_length
        self.encoder = is_encoder(tokenizer)
        if self.encoder:  # (a DeepSpeed engine keeps the config on its module)
            bound_encoder_length(tokenizer, getattr(model, "config", None) or model.module.config)
        self.device = device if device is not None else next(model.parameters()).device

    def __call__(self, prompts: list, responses: list) -> torch.Tensor:
        """Scalar reward of each pair, as a float32 tensor on the scorer's device."""
        return self.score_ids([reward_input_ids(self.tokenizer, p, r) for p, r in zip(prompts, responses)])

    @torch.no_grad()  # not inference_mode: ZeRO-3 / FSDP2 gather parameters here that backward uses later
    def score_ids(self, ids: list[list[int]]) -> torch.Tensor:
        """Scalar reward of each rendered input (`reward_input_ids`), float32 on the scorer's device."""
        if self.max_length is not None and not self.encoder:
            ids = [x[-self.max_length :] if len(x) > self.max_length else x for x in ids]
        scores = []
        for i in range(0, len(ids), self.batch_size):
            # Decoders: left padding. transformers' classifiers pool at the last token that is not the
            # pad token: the sequence's own last token, unless that is the pad token itself (a pad equal
            # to EOS: the RM stage pads with a spare token for this, see models.load_tokenizer).
            # Encoders pool the first token and number positions themselves (RoBERTa's start after
            # the padding index): right padding, no position ids, as RewardTrainer trained them.
            enc = self.tokenizer.pad(
                {"input_ids": ids[i : i + self.batch_size]},
                return_tensors="pt",
                padding_side="right" if self.encoder else "left",
            ).to(self.device)
            extra = {} if self.encoder else {"position_ids": position_ids(enc["attention_mask"]), "use_cache": False}
            logits = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **extra).logits
            scores.append(logits[:, 0].float())
        return torch.cat(scores)
