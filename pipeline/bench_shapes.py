"""Real models' shapes for the benchmark, built offline: `python -m pipeline.bench_shapes SHAPE OUT`.

The demo's model has a few hundred words of vocabulary, where the LM head and the logits cost
nothing; real models have 49k-152k tokens, and there the logits (batch x length x vocabulary floats),
the LM head's backward and generation decide time and memory. A shape here is a transformers config
copied from a hub model's config.json (the layer count may be cut for CPU time; vocabulary, hidden
and MLP sizes, heads and tied embeddings are kept), with random weights, and a word-level tokenizer
of exactly that vocabulary with a ChatML template, saved with `save_pretrained` like a hub model.
`prompts` writes a prompt-only dataset of random words of RLVR lengths, with a `solution` column.

A random model never chooses its stop token on purpose (its probability is about 1 / vocabulary),
so every response runs to max_new_tokens: the work per iteration is fixed, as a benchmark wants.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SHAPES = {
    # HuggingFaceTB/SmolLM2-135M(-Instruct): config.json
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rope_theta": 100000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    },
    # Qwen/Qwen2.5-0.5B(-Instruct): config.json
    "qwen2.5-0.5b": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
}
SPECIAL = ["<|pad|>", "<|im_end|>", "<|unk|>", "<|im_start|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|> ' + message['role'] + ' ' + message['content'] + ' <|im_end|> ' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|> assistant ' }}{%- endif -%}"
)


def tokenizer_of_size(vocab_size: int):
    """A word-level tokenizer of exactly `vocab_size` tokens: the special ones, the template's role
    words, then w0, w1, ... (one token per whitespace-separated word)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + ["system", "user", "assistant"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def build(shape: str, out: Path, layers: int | None = None, seed: int = 0, reward_model: bool = False) -> Path:
    """The shape's model (random weights, `layers` decoder layers if given) and tokenizer, in `out`:
    a causal LM, or with `reward_model` a sequence classifier with one output (a reward model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GenerationConfig

    if shape not in SHAPES:
        raise SystemExit(f"bench: unknown shape '{shape}': choose one of {sorted(SHAPES)}")
    tokenizer = tokenizer_of_size(SHAPES[shape]["vocab_size"])
    settings = {k: v for k, v in SHAPES[shape].items() if k != "model_type"}
    if layers:
        settings["num_hidden_layers"] = layers
    config = AutoConfig.for_model(
        SHAPES[shape]["model_type"],
        **settings,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **({"num_labels": 1} if reward_model else {}),
    )
    assert len(tokenizer) == config.vocab_size
    torch.manual_seed(seed)
    if reward_model:
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
        model.generation_config = GenerationConfig(
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def prompts(path: Path, n: int, vocab_size: int, lengths: tuple[int, int] = (100, 200), seed: int = 0) -> Path:
    """`n` conversational prompts of random words, each `lengths` tokens long (uniform, the template's
    few tokens aside), and a `solution` word per prompt (for `solution_reward`)."""
    rng = random.Random(seed)
    words = vocab_size - len(SPECIAL) - 3
    with open(path, "w") as f:
        for _ in range(n):
            text = " ".join(f"w{rng.randrange(words)}" for _ in range(rng.randint(*lengths)))
            f.write(
                json.dumps({"prompt": [{"role": "user", "content": text}], "solution": f"w{rng.randrange(1000)}"})
                + "\n"
            )
    return path


def solution_reward(completions, solution, **kwargs) -> list[float]:
    """A verifiable reward of the RLVR shape (trl's contract): the share of the answer's words below
    w1000, plus 1 if it contains the solution's word. On a random model the k answers to a prompt
    differ, so every group carries signal."""
    scores = []
    for completion, answer in zip(completions, solution):
        words = completion[-1]["content"].split()
        low = sum(w.startswith("w") and w[1:].isdigit() and int(w[1:]) < 1000 for w in words)
        scores.append(low / max(len(words), 1) + float(answer in words))
    return scores


if __name__ == "__main__":
    build(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else None)
