"""Sampling responses exactly as the log-probs assume, shared by PPO's rollouts and by eval.

A rollout's log-probs are those of softmax(logits / T). Every other logits processor (top-k, top-p,
repetition penalty, a minimum length, banned n-grams or words) draws the tokens from a different
distribution, which biases the PPO ratio and makes the KL estimate wrong (even negative). So
generation runs with a config built from scratch (`sampling_config`) and, for its duration, with that
config as the model's own (`plain_sampling`).
"""

from __future__ import annotations

from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import GenerationConfig

from pipeline import data, engine
from pipeline.models import hf_model
from pipeline.rl import unpadded
from pipeline.rl.algorithms import chunked_logprobs, logprobs_of, truncate_after_stop
from pipeline.rl.unpadded import Layout
from pipeline.scoring import position_ids

if TYPE_CHECKING:
    from pipeline.rl.agent import Agent


@dataclass
class Rollout:
    """A batch of prompts and the responses sampled for them."""

    prompts: list
    """The prompts as given (strings or message lists)."""
    prompt_ids: list[list[int]]
    """Each prompt's ids, as the policy read them (`prompt_ids`), unpadded."""
    query_responses: torch.Tensor
    """(B, P + R) left-padded prompt tokens, then the response tokens (pad after the stop token)."""
    attention_mask: torch.Tensor
    """(B, P + R) 1 on real tokens."""
    responses: torch.Tensor
    """(B, R) response tokens."""
    response_mask: torch.Tensor
    """(B, R) 1 up to and including the stop token."""
    has_stop: torch.Tensor
    """(B,) whether the response ended with the stop token."""
    texts: list[str]
    """Decoded responses, special tokens skipped."""
    agent: Agent | None = None
    """Multi-turn rollouts with tools (pipeline/rl/agent.py): the model's own tokens among the response's,
    each exchange's messages, environments and tool use."""

    @classmethod
    def joined(cls, prompts: list, prompt_ids, enc, responses, mask, has_stop, texts: list[str], agent=None) -> Rollout:
        """Left-padded prompts (`enc`, the tokenizer's padding) followed by right-padded responses."""
        return cls(
            prompts=list(prompts),
            prompt_ids=prompt_ids,
            query_responses=torch.cat([enc["input_ids"], responses], 1),
            attention_mask=torch.cat([enc["attention_mask"], mask], 1),
            responses=responses,
            response_mask=mask,
            has_stop=has_stop,
            texts=texts,
            agent=agent,
        )

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def loss_mask(self) -> torch.Tensor:
        """(B, R) the tokens the model chose, which the loss, the KL and the advantages are over: the
        response's (`response_mask`), less those a tool's result and the template inserted."""
        return self.response_mask if self.agent is None else self.agent.model_mask

    def take(self, rows: list[int]) -> Rollout:
        """These rows, in this order."""
        index = torch.tensor(rows, dtype=torch.long, device=self.responses.device)
        return Rollout(
            prompts=[self.prompts[i] for i in rows],
            prompt_ids=[self.prompt_ids[i] for i in rows],
            query_responses=self.query_responses[index],
            attention_mask=self.attention_mask[index],
            responses=self.responses[index],
            response_mask=self.response_mask[index],
            has_stop=self.has_stop[index],
            texts=[self.texts[i] for i in rows],
            agent=self.agent.take(rows) if self.agent is not None else None,
        )

    @staticmethod
    def cat(rollouts: list[Rollout], pad_id: int) -> Rollout:
        """Rollouts of several generations as one batch: prompts padded on the left to the longest,
        responses on the right, masks 0 on the padding."""
        P = max(r.query_responses.shape[1] - r.responses.shape[1] for r in rollouts)
        R = max(r.responses.shape[1] for r in rollouts)

        def pad(x: torch.Tensor, left: int, right: int, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(x, (left, right), value=value)

        parts = {"query_responses": [], "attention_mask": [], "responses": [], "response_mask": []}
        for r in rollouts:
            p, n = r.query_responses.shape[1] - r.responses.shape[1], r.responses.shape[1]
            parts["query_responses"].append(
                torch.cat([pad(r.query_responses[:, :p], P - p, 0, pad_id), pad(r.responses, 0, R - n, pad_id)], 1)
            )
            parts["attention_mask"].append(
                torch.cat([pad(r.attention_mask[:, :p], P - p, 0, 0), pad(r.response_mask, 0, R - n, 0)], 1)
            )
            parts["responses"].append(pad(r.responses, 0, R - n, pad_id))
            parts["response_mask"].append(pad(r.response_mask, 0, R - n, 0))
        agent = None
        if rollouts[0].agent is not None:
            from pipeline.rl.agent import Agent

            agent = Agent.cat([r.agent for r in rollouts], R)
        return Rollout(
            prompts=[x for r in rollouts for x in r.prompts],
            prompt_ids=[x for r in rollouts for x in r.prompt_ids],
            has_stop=torch.cat([r.has_stop for r in rollouts]),
            texts=[x for r in rollouts for x in r.texts],
            agent=agent,
            **{k: torch.cat(v) for k, v in parts.items()},
        )


def sampling_config(temperature: float, max_new_tokens: int, stop_ids: list[int], pad_id: int) -> GenerationConfig:
    """Temperature sampling and nothing else (temperature 0: greedy). Each processor transformers
    would add from a model's defaults is set to its neutral value explicitly (`min_new_tokens` stays
    None: 0 would still install a min-length processor; `plain_sampling` keeps the model's out)."""
    sampling = (
        dict(
            do_sample=True,
            temperature=temperature,
            top_k=0,
            top_p=1.0,
            min_p=None,
            typical_p=1.0,
            epsilon_cutoff=0.0,
            eta_cutoff=0.0,
        )
        if temperature > 0
        else dict(do_sample=False)
    )
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_length=0,
        min_new_tokens=None,
        bad_words_ids=None,
        suppress_tokens=None,
        begin_suppress_tokens=None,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        sequence_bias=None,
        num_beams=1,
        **sampling,
    )


@contextmanager
def plain_sampling(model, config: GenerationConfig):
    """Make `config` the model's generation config while generating.

    transformers 5 fills every field a passed config leaves unset from the model's
    generation_config.json (Qwen Instruct ships repetition_penalty, top_k, top_p). trl's
    `unwrap_model_for_generation(generation_kwargs=...)` swaps the config only on transformers < 5,
    so the swap is done here; the model's own config is restored after, and saved artifacts keep it.
    """
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = inner.generation_config
    inner.generation_config = config
    try:
        yield
    finally:
        inner.generation_config = original


def prompt_ids(tokenizer, prompt) -> list[int]:
    """The ids a policy is conditioned on, exactly the prefix SFT trained before the completion
    (trl's SFTTrainer): a conversation through the chat template with a generation prompt (the
    template writes any BOS itself), plain text through the tokenizer with its special tokens (the
    BOS Llama, Mistral and Gemma tokenizers prepend)."""
    if data.is_conversational(prompt):
        return list(
            tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
    ids = tokenizer(prompt)["input_ids"]
    # a tokenizer set to append EOS (`add_eos_token`) would end the context where SFT's continues
    if ids and ids[-1] == tokenizer.eos_token_id and not prompt.endswith(tokenizer.eos_token):
        ids = ids[:-1]
    return ids


class PromptIds:
    """`prompt_ids` of a prompt set, each rendered and tokenized the first time the prompt is drawn and
    kept for the run (a run draws each prompt once per epoch, a group estimator k times in a row), in
    4 bytes a token (a list of Python ints would take ~36: 700 MB for 100k prompts of 200 tokens)."""

    def __init__(self, tokenizer, prompts):
        """`prompts`: `data.load_prompts`' column (or a list)."""
        self.tokenizer, self.prompts, self.ids = tokenizer, prompts, {}

    def __call__(self, indices: list[int]) -> list[list[int]]:
        new = [i for i in dict.fromkeys(indices) if i not in self.ids]
        for i, prompt in zip(new, data.take(self.prompts, new)):
            self.ids[i] = array("i", prompt_ids(self.tokenizer, prompt))
        return [self.ids[i].tolist() for i in indices]


def response_hidden(model, input_ids, attention_mask, response_len: int, layout: Layout | None = None) -> torch.Tensor:
    """The backbone's last hidden states at the positions that predict the response tokens, the
    input of a causal LM's head and of a classifier's score head: (B, R, H)."""
    model = hf_model(model)
    backbone = getattr(model, model.base_model_prefix)
    if layout is not None:
        return layout.forward(backbone, use_cache=False).last_hidden_state[0, layout.predictors]
    return backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False
    ).last_hidden_state[:, -response_len - 1 : -1]


# Model types whose logits are their LM head's output as is: no soft-capping, scale or multiplier after
# the head (Gemma 2/3 cap them, Cohere scales them, Granite divides them, Falcon-H1 multiplies them).
PLAIN_HEADS = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "phi3",
        "gemma",
        "olmo",
        "olmo2",
        "smollm3",
        "gpt2",
        "gpt_neox",
        "starcoder2",
    }
)
# Vocabularies from which the LM head runs in chunks: real models' (32k-256k), where a micro-batch's
# float32 logits take hundreds of MB; a toy vocabulary's cost nothing.
CHUNKED_FROM_VOCAB = 16384


def chunks_head(model) -> bool:
    """Whether log-probs under `model` are taken with its LM head in chunks (`chunked_logprobs`), never
    holding a micro-batch's (B, R, V) logits: a vocabulary of `CHUNKED_FROM_VOCAB` or more, a model type
    whose logits are the head's output as is (`PLAIN_HEADS`; any other keeps the whole-logits path, which
    is right for all), and parameters not sharded over processes (the head runs on its own, outside
    the model's forward, which is where ZeRO-3 and FSDP2 gather them)."""
    model = engine.bare(model)
    if engine.sharded_parameters(model):
        return False
    model = hf_model(model)
    config = model.config.get_text_config()
    return (
        config.model_type in PLAIN_HEADS
        and model.get_output_embeddings() is not None
        and not getattr(config, "final_logit_softcapping", None)
        and config.vocab_size >= CHUNKED_FROM_VOCAB
    )


def chunked_response_logprobs(
    model,
    input_ids,
    attention_mask,
    tokens: torch.Tensor,
    temperature: float,
    layout: Layout | None = None,
    entropy: bool = False,
):
    """`((log-probs, entropy or None), hidden states)` of the response `tokens` (B, R) under `model`, its LM
    head run in chunks on the backbone's hidden states (`chunked_logprobs`); differentiable where grad is on."""
    hidden = response_hidden(model, input_ids, attention_mask, tokens.shape[1], layout)
    head = hf_model(model).get_output_embeddings()
    return chunked_logprobs(hidden, head, tokens, temperature, with_entropy=entropy), hidden


@torch.no_grad()  # not inference_mode: ZeRO-3 / FSDP2 gather parameters here that backward uses later
def generate(
    model, tokenizer, prompts: list, config: GenerationConfig, device, ids: list[list[int]] | None = None
) -> Rollout:
    """One batched generation with KV cache; everything after the first stop token becomes padding.
    Prompts are padded on the left (they end where generation starts). `ids`: the prompts' ids, if
    already known (`PromptIds`)."""
    ids = ids if ids is not None else [prompt_ids(tokenizer, p) for p in prompts]
    enc = tokenizer.pad({"input_ids": ids}, padding_side="left", return_tensors="pt").to(device)
    with plain_sampling(model, config):
        # synced_gpus=False: transformers turns synced decoding on by itself under ZeRO-3 / FSDP2 (every
        # rank stepping until the slowest is done, an all-reduce per token); the weights are whole here
        # (engine.for_generation) and eval generates on one rank alone, so no collective runs inside
        sequences = model.generate(**enc, generation_config=config, synced_gpus=False)
    context = enc["input_ids"].shape[1]
    responses, mask, has_stop = truncate_after_stop(sequences[:, context:], config.eos_token_id, config.pad_token_id)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return Rollout.joined(prompts, ids, enc, responses, mask, has_stop, texts)


def response_logits(model, input_ids, attention_mask, response_len: int, layout: Layout | None = None) -> torch.Tensor:
    """Logits that predict the response tokens (B, R, V): position t predicts token t + 1, and
    `logits_to_keep` skips the lm_head over the prompt. With `layout`, the forward reads the real
    tokens only (pipeline/rl/unpadded.py; the model's attention must be `unpadded.enable`d)."""
    if layout is not None:
        out = layout.forward(model, use_cache=False, logits_to_keep=layout.predictors.flatten())
        return out.logits.view(*layout.predictors.shape, -1)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids(attention_mask),
        use_cache=False,
        logits_to_keep=response_len + 1,
    )
    return out.logits[:, :-1]


@torch.no_grad()  # not inference_mode: ZeRO-3 / FSDP2 gather parameters here that backward uses later
def response_logprobs(model, rollout: Rollout, temperature: float, batch_size: int) -> torch.Tensor:
    """log p(response token) under `model` at temperature T, in forward micro-batches: (B, R), 0 where
    the model did not choose the token (padding; an agent's inserted tokens);
    unpadded where the model's attention allows it (`unpadded.enabled`), the LM head in chunks where
    `chunks_head` says so."""
    R, out, chunked = rollout.responses.shape[1], [], chunks_head(model)
    for i in range(0, len(rollout), batch_size):
        s = slice(i, i + batch_size)
        ids, mask, tokens = rollout.query_responses[s], rollout.attention_mask[s], rollout.responses[s]
        layout = Layout(ids, mask, R) if unpadded.enabled(model) else None
        if chunked:  # (the head runs on its own: outside a frozen model's engine wrapper, its weights whole)
            out.append(chunked_response_logprobs(engine.bare(model), ids, mask, tokens, temperature, layout)[0][0])
        else:
            out.append(logprobs_of(response_logits(model, ids, mask, R, layout), tokens, temperature))
    return torch.cat(out) * rollout.loss_mask  # (an agent's: its own tokens only)
