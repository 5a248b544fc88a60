"""Tiny tokenizers with the special-token layouts of real hub models, built offline.

Each layout copies what its hub tokenizer_config.json / generation_config.json say: which special
tokens exist, which is BOS / EOS / PAD / UNK, whether plain text gets a BOS, and a chat template of
the family's shape. The vocabulary is a byte-level BPE trained on the demo corpus (tests/families.py),
so models built on these are tiny, but they break the conventions our demo tokenizer shares with the
tests (EOS closes a chat turn, a spare pad token exists, no BOS on plain text):

| layout           | BOS                 | EOS              | PAD              | turn ends with | hub model            |
| ---------------- | ------------------- | ---------------- | ---------------- | -------------- | -------------------- |
| qwen25-base      | -                   | <|endoftext|>    | <|endoftext|>    | <|im_end|>     | Qwen/Qwen2.5-7B      |
| qwen25-instruct  | -                   | <|im_end|>       | <|endoftext|>    | <|im_end|>     | Qwen2.5-7B-Instruct  |
| llama3-base      | <|begin_of_text|> * | <|end_of_text|>  | -                | <|eot_id|>     | Meta-Llama-3.1-8B    |
| llama3-instruct  | <|begin_of_text|> * | <|eot_id|>       | -                | <|eot_id|>     | Llama-3.1-8B-Instruct|
| mistral-v01      | <s> *               | </s>             | -                | (no template)  | Mistral-7B-v0.1      |
| smollm2          | <|im_start|>        | <|im_end|>       | <|im_end|>       | <|im_end|>     | SmolLM2-135M-Instruct|
| gemma            | <bos> *             | <eos>            | <pad>            | <end_of_turn>  | google/gemma-2b(-it) |
| gpt2             | <|endoftext|>       | <|endoftext|>    | -                | (no template)  | gpt2                 |

(* prepended to plain text by the tokenizer's post-processor.)
"""

from __future__ import annotations

from tokenizers import processors
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from tests.families import byte_level_tokenizer

CHATML = (
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
LLAMA3 = (
    "{{ bos_token }}{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
GEMMA = (
    "{{ bos_token }}{%- for m in messages -%}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else m['role']) + '\\n' + m['content'] "
    "+ '<end_of_turn>\\n' }}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}"
    "{%- endif -%}"
)

# The same families' templates with tools, calls and their results, as the hub instruct models render
# them (shortened system texts): Qwen2.5 lists the tools in a system turn, writes a call as
# <tool_call>{json}</tool_call> and the results as <tool_response> blocks in a user turn; Llama 3.1
# writes a call as a bare JSON object and a result as an `ipython` turn
QWEN_TOOLS = (
    "{%- if tools -%}{{ '<|im_start|>system\\n# Tools\\n\\n<tools>' }}{%- for t in tools -%}{{ '\\n' + (t | tojson) }}"
    '{%- endfor -%}{{ \'\\n</tools>\\n\\nFor each call, return <tool_call>\\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' -%}{{ '<|im_start|>assistant\\n' + (m['content'] or '') }}"
    "{%- for c in m.get('tool_calls') or [] -%}{%- if m['content'] or not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{{ '<tool_call>\\n{\"name\": \"' + c['function']['name'] + '\", \"arguments\": ' "
    "+ (c['function']['arguments'] | tojson)"
    " + '}\\n</tool_call>' }}{%- endfor -%}{{ '<|im_end|>\\n' }}"
    "{%- elif m['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}"
    "{{ '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}{{ '<|im_end|>\\n' }}{%- endif -%}"
    "{%- else -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
LLAMA3_TOOLS = (
    "{{ bos_token }}{%- if tools -%}{{ '<|start_header_id|>system<|end_header_id|>\\n\\nEnvironment: ipython\\n"
    'Respond with a JSON function call {"name": function name, "parameters": its arguments}.\\n\\n\' }}'
    "{%- for t in tools -%}{{ (t | tojson) + '\\n\\n' }}{%- endfor -%}{{ '<|eot_id|>' }}{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'assistant' and m.get('tool_calls') -%}"
    "{%- for c in m['tool_calls'] -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + "
    "c['function']['name'] + '\", \"parameters\": ' + (c['function']['arguments'] | tojson) + '}<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- elif m['role'] == 'tool' -%}"
    "{{ '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + (m['content'] | tojson) + '<|eot_id|>' }}"
    "{%- else -%}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)
TOOL_TEMPLATES = {"qwen25-instruct": QWEN_TOOLS, "llama3-instruct": LLAMA3_TOOLS}

# the pre-tokenizers' split patterns in the hub tokenizer.json files: whitespace runs that end in a
# newline are one piece, so a reply that begins with "\n" joins the generation prompt's "\n"
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
LLAMA3_SPLIT = QWEN_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|")

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|vision_pad|>",
    "<|fim_pad|>",
    "<|repo_name|>",
]
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_2|>",
    "<|eot_id|>",
]
SMOLLM2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]

LAYOUTS = [
    "qwen25-base",
    "qwen25-instruct",
    "llama3-base",
    "llama3-instruct",
    "mistral-v01",
    "smollm2",
    "gemma",
    "gpt2",
]
# what each hub generation_config.json lists as eos_token_id (names; None: the tokenizer's EOS only)
GENERATION_EOS = {
    "qwen25-instruct": ["<|im_end|>", "<|endoftext|>"],
    "llama3-instruct": ["<|end_of_text|>", "<|eot_id|>"],
}
TURN_END = {
    "qwen25-base": "<|im_end|>",
    "qwen25-instruct": "<|im_end|>",
    "llama3-base": "<|eot_id|>",
    "llama3-instruct": "<|eot_id|>",
    "smollm2": "<|im_end|>",
    "gemma": "<end_of_turn>",
}


def _prepend_bos(tok, bos: str) -> None:
    bos_id = tok.token_to_id(bos)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
    )


def tokenizer(layout: str) -> PreTrainedTokenizerFast:
    """The layout's tokenizer (see the module's table)."""
    common = dict(clean_up_tokenization_spaces=False)
    if layout.startswith("qwen25"):
        tok = byte_level_tokenizer(QWEN_SPECIALS, split=QWEN_SPLIT)
        eos = "<|endoftext|>" if layout == "qwen25-base" else "<|im_end|>"
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            eos_token=eos,
            pad_token="<|endoftext|>",
            additional_special_tokens=QWEN_SPECIALS[1:],
            chat_template=CHATML,
            **common,
        )
    if layout.startswith("llama3"):
        tok = byte_level_tokenizer(LLAMA3_SPECIALS, split=LLAMA3_SPLIT)
        _prepend_bos(tok, "<|begin_of_text|>")
        eos = "<|end_of_text|>" if layout == "llama3-base" else "<|eot_id|>"
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|begin_of_text|>",
            eos_token=eos,
            additional_special_tokens=LLAMA3_SPECIALS[2:],
            chat_template=LLAMA3,
            **common,
        )
    if layout == "mistral-v01":
        tok = byte_level_tokenizer(["<unk>", "<s>", "</s>"])
        _prepend_bos(tok, "<s>")
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", **common
        )
    if layout == "smollm2":
        tok = byte_level_tokenizer(SMOLLM2_SPECIALS)
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            unk_token="<|endoftext|>",
            pad_token="<|im_end|>",
            additional_special_tokens=SMOLLM2_SPECIALS,
            chat_template=CHATML,
            **common,
        )
    if layout == "gemma":
        tok = byte_level_tokenizer(GEMMA_SPECIALS)
        _prepend_bos(tok, "<bos>")
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<bos>",
            eos_token="<eos>",
            pad_token="<pad>",
            unk_token="<unk>",
            additional_special_tokens=GEMMA_SPECIALS[4:],
            chat_template=GEMMA,
            **common,
        )
    if layout == "gpt2":
        tok = byte_level_tokenizer(["<|endoftext|>"])
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            **common,
        )
    raise ValueError(layout)


def tool_tokenizer(layout: str) -> PreTrainedTokenizerFast:
    """The layout's tokenizer with its family's tool-calling template (`TOOL_TEMPLATES`)."""
    tok = tokenizer(layout)
    tok.chat_template = TOOL_TEMPLATES[layout]
    return tok


def save_model(layout: str, path, seed: int = 0, **config):
    """A tiny Llama-architecture causal LM on the layout's tokenizer, with the hub's generation config
    (several EOS ids where the hub lists several), saved like a hub checkpoint."""
    import torch

    tok = tokenizer(layout)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            bos_token_id=tok.bos_token_id,
            **config,
        )
    )
    eos = [tok.convert_tokens_to_ids(t) for t in GENERATION_EOS.get(layout, [tok.eos_token])]
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, eos_token_id=eos if len(eos) > 1 else eos[0]
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
