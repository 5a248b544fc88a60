"""Tiny tokenizers and models in the shapes real families have, built offline from configs.

ByteLevel BPE (like GPT-2, Llama 3, Qwen) trained in a second on the demo corpus, with:
- `chatml`: Qwen/SmolLM-style ChatML template (`<|im_start|>role\\n...<|im_end|>\\n`), EOS `<|im_end|>`;
- `bos`: a Llama-style tokenizer whose post-processor prepends BOS and whose template writes it.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

from stages.base import corpus

CORPUS = ["data/demo/sft_train.jsonl"]
CHATML = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
LLAMA = (
    "{{ bos_token }}{%- for m in messages -%}{{ '[' + m['role'] + '] ' + m['content'] + eos_token }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '[assistant] ' }}{%- endif -%}"
)


def byte_level_tokenizer(specials: list[str], vocab_size: int = 400, split: str | None = None) -> Tokenizer:
    """GPT-2's pre-tokenizer, or `split` (a family's own regex, as Qwen's and Llama 3's tokenizer.json
    have it) before a byte-level step; trained on chat-shaped text too, so that under `split` blank
    lines ("\\n\\n") are one token, as in those families."""
    tok = Tokenizer(models.BPE())
    tok.decoder = decoders.ByteLevel()
    texts = list(corpus(CORPUS)) + ["\n[user] [assistant] user\nassistant\n"] * 10
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        texts += ["user\n\nreview the film .\n\nassistant\n\n"] * 100
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    return tok


def chatml_tokenizer(pad: bool = True, reserved: int = 0) -> PreTrainedTokenizerFast:
    """EOS <|im_end|>; pad <|endoftext|> (as Qwen2.5-Instruct) or none; `reserved` unused specials."""
    extra = [f"<|reserved_special_token_{i}|>" for i in range(reserved)]
    tok = byte_level_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>" if pad else None,
        additional_special_tokens=["<|im_start|>", *extra],
        chat_template=CHATML,
        clean_up_tokenization_spaces=False,
    )


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """BOS <s> prepended to plain text by the post-processor (as Llama/Gemma), EOS </s>, pad <pad>."""
    tok = byte_level_tokenizer(["<pad>", "<s>", "</s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        chat_template=LLAMA,
        clean_up_tokenization_spaces=False,
    )


# The demo's files and the recipe keys that read them
DEMO_FILES = {
    "sft.dataset": "sft_train",
    "sft.eval_dataset": "sft_eval",
    "rm.dataset": "preferences_train",
    "rm.eval_dataset": "preferences_test",
    "ppo.prompts": "prompts_train",
    "eval.prompts": "prompts_heldout",
}


def plain_demo_data(folder, limits: dict[str, int]) -> dict[str, str]:
    """The demo's conversational rows re-written as plain strings (prompt-completion text, as GPT-2
    style models without a chat template or trl-lib/tldr have them), for the recipe keys in `limits`
    with that many rows each: {recipe key: path of the written file}. A completion starts with a
    space, so it does not run into the prompt's last word."""
    import json

    text = lambda v: v if isinstance(v, str) else " ".join(m["content"] for m in v)  # noqa: E731
    out = {}
    for key, limit in limits.items():
        rows = [json.loads(line) for line in open(f"data/demo/{DEMO_FILES[key]}.jsonl")][:limit]
        rows = [{k: (" " if k == "completion" else "") + text(v) for k, v in r.items()} for r in rows]
        path = folder / f"{DEMO_FILES[key]}.plain.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        out[key] = str(path)
    return out


def llama_config(tokenizer, **kw) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        **kw,
    )


def save_causal_lm(tokenizer, path, seed: int = 0, **kw):
    import torch

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(tokenizer, **kw))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def reward_model(tokenizer, seed: int = 0) -> LlamaForSequenceClassification:
    import torch

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(llama_config(tokenizer, num_labels=1)).eval()


def encoder_reward_model(kind: str, path, seed: int = 0):
    """A tiny BERT / RoBERTa / DeBERTa-v2 sequence classifier (one output) with its own tokenizer, as
    the hub has them: BERT WordPiece, RoBERTa byte-level BPE (<s>/</s> framing a pair, an EOS), DeBERTa
    Unigram with [CLS]/[SEP] (EOS [SEP]); none has a chat template. 128 positions, like 512 on the hub."""
    import json
    import math
    from collections import Counter

    import torch
    from transformers import (
        AutoModelForSequenceClassification,
        BertConfig,
        BertTokenizer,
        DebertaV2Config,
        DebertaV2Tokenizer,
        RobertaConfig,
        RobertaTokenizer,
    )

    texts = list(corpus(CORPUS))
    size = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, num_labels=1)
    if kind == "bert":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer, tok.pre_tokenizer = normalizers.BertNormalizer(), pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(
            texts,
            trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]),
        )
        tokenizer = BertTokenizer(vocab=tok.get_vocab(), model_max_length=128)
        config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=128, **size)
    elif kind == "roberta":
        model = json.loads(byte_level_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]).to_str())["model"]
        tokenizer = RobertaTokenizer(
            vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], model_max_length=128
        )
        config = RobertaConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=130,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **size,
        )
    else:
        # a SentencePiece-style Unigram vocabulary: every corpus word as "▁word" (log-frequency scores),
        # single characters as the fallback (the Unigram trainer stops at ~140 pieces on this corpus)
        words = Counter(w for t in texts for w in t.split())
        total = sum(words.values())
        chars = sorted({c for w in words for c in w})
        vocab = (
            [(t, 0.0) for t in ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]]
            + [("▁" + w, math.log(n / total)) for w, n in words.most_common()]
            + [(c, -20.0) for c in ["▁", *chars]]
        )
        tokenizer = DebertaV2Tokenizer(vocab=vocab, unk_id=3, model_max_length=128)
        config = DebertaV2Config(
            vocab_size=len(tokenizer),
            max_position_embeddings=128,
            type_vocab_size=0,
            relative_attention=True,
            position_buckets=32,
            pos_att_type=["p2c", "c2p"],
            pooler_hidden_size=64,
            **size,
        )
    config.pad_token_id = tokenizer.pad_token_id
    torch.manual_seed(seed)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
