"""Build the demo's tiny base model offline: `make base`.

    python stages/base.py                      # the demo recipe's settings
    python stages/base.py base.hidden_size=96  # a wider model

A word-level tokenizer is trained on the demo corpus (with a chat template and distinct pad and
EOS tokens), and a small Llama-style decoder is initialised from a transformers config. Both are
saved with `save_pretrained`, so every later stage loads them exactly like a hub model.
"""

from __future__ import annotations

import json
import time

from pipeline import cli, process

if __name__ == "__main__":  # this stage's own process: before the libraries load
    process.before_libraries()

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline import plans

EOS, PAD, UNK = "<|end|>", "<|pad|>", "<|unk|>"
ROLES = ["<|system|>", "<|user|>", "<|assistant|>"]
TOOL_ROLE = "<|tool|>"  # a special token only where the corpus has tool messages (the agent demo)
# Every turn ends with EOS, so SFT on this template teaches the model to stop after its answer. An
# assistant turn's tool calls follow its text as pipeline.demo_agent.call_text writes them (JSON with
# spaces between its tokens, for the word-level tokenizer); a tool's result is a turn of role `tool`.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message.get('tool_calls') -%}"
    "{{ '<|assistant|> ' + (message['content'] + ' ' if message['content'] else '') }}"
    "{%- for call in message['tool_calls'] -%}"
    "{{ '<tool_call> { \"name\" : \"' + call['function']['name'] + '\" , \"arguments\" : { ' }}"
    "{%- for key, value in call['function']['arguments'].items() -%}"
    "{{ '\"' + key + '\" : \" ' + (value | string | trim) + ' \"' + (' , ' if not loop.last else '') }}"
    "{%- endfor -%}{{ ' } } </tool_call> ' }}{%- endfor -%}{{ '<|end|> ' }}"
    "{%- else -%}{{ '<|' + message['role'] + '|> ' + message['content'] + ' <|end|> ' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|> ' }}{%- endif -%}"
)


def _messages(paths: list[str]):
    """Every message in the demo files; a plain string as {"content": ...}."""
    for path in paths:
        for line in open(path):
            for value in json.loads(line).values():
                yield from value if isinstance(value, list) else [{"content": value}]


def corpus(paths: list[str]):
    """Every piece of text in the demo files: message contents and plain strings, and tool calls as the
    template writes them."""
    from pipeline.demo_agent import call_text

    for message in _messages(paths):
        yield message["content"]
        for call in message.get("tool_calls") or []:
            yield call_text(call["function"]["name"], call["function"]["arguments"])


def train_tokenizer(paths: list[str]) -> PreTrainedTokenizerFast:
    roles = ROLES + [TOOL_ROLE] * any(m.get("role") == "tool" for m in _messages(paths))
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(corpus(paths), trainers.WordLevelTrainer(special_tokens=[PAD, EOS, UNK, *roles]))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=roles,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def main(argv=None):
    recipe, args = cli.parse(__doc__.splitlines()[0], argv)
    settings = recipe.base
    plan = plans.base(recipe)
    if plan is None:
        print(plans.NO_BASE.format(recipe.sft.model))
        return
    stage, fp = plan.stage, plan.fingerprint
    if stage.is_current(fp) and not args.force:
        print(f"base: {stage.final} is up to date (FORCE=1 to re-run)")
        return
    started = time.time()
    out = stage.begin(fp)

    tokenizer = train_tokenizer(settings.corpus)
    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=settings.hidden_size,
            intermediate_size=4 * settings.hidden_size,
            num_hidden_layers=settings.num_layers,
            num_attention_heads=settings.num_heads,
            max_position_embeddings=settings.max_positions,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=None,
        )
    )
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)

    n_params = sum(p.numel() for p in model.parameters())
    stage.commit(fp, plan.config, plan.inputs, {"parameters": n_params, "vocab_size": len(tokenizer)}, started)
    print(f"base: {n_params:,} parameters, vocabulary {len(tokenizer)} -> {stage.final}")


if __name__ == "__main__":
    process.run_and_exit(main)
