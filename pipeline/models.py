"""Loading models and tokenizers the same way in every stage: precision, quantization, LoRA, merging.

Precision (the recipe's `dtype`, see `pipeline.recipe.TrainStage.dtype`) is mixed, never pure: the
weights a stage trains (a full model, LoRA adapters, a value model or head) are stored in float32 and
run under autocast in the compute dtype, because AdamW steps at the usual RLHF learning rates
(1e-6 .. 2e-5) are far below bf16's resolution (a weight of 0.05 has a bf16 step of ~2e-4) and round
away. Frozen weights (the reward model, the base under LoRA adapters) are stored in the compute
dtype: they only run forwards, and it halves their memory. PPO's frozen reference stores only its
linear layers so, to compute exactly as the float32 policy does under autocast (`load_reference`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline import artifacts
from pipeline.errors import ConfigError
from pipeline.recipe import LoraSettings

if TYPE_CHECKING:
    from peft import LoraConfig

# Tokenizer entries past the embedding rows that are tolerated (see `align_special_tokens`)
TOKENIZER_SLACK = 8


def resolve_dtype(name: str) -> torch.dtype:
    """The compute dtype. `auto`: bfloat16 on a GPU that supports it, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


def mixed_precision(dtype: torch.dtype) -> str:
    """accelerate's `mixed_precision` for a compute dtype: autocast over float32 trained weights."""
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")


def trainer_precision(dtype: torch.dtype) -> dict:
    """TrainingArguments flags for the same (the Trainer builds its Accelerator from them). Without
    a GPU, `use_cpu` too: TrainingArguments refuses bf16 autocast on a CPU unless told it is one."""
    return {"bf16": dtype == torch.bfloat16, "fp16": dtype == torch.float16, "use_cpu": not torch.cuda.is_available()}


def quantization_config(finetune: str, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """QLoRA: NF4 4-bit with double quantization (Dettmers et al.), or LLM.int8 8-bit."""
    if finetune == "qlora-4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
        )
    if finetune == "qlora-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def lora_config(finetune: str, lora: LoraSettings, task_type: str) -> LoraConfig | None:
    if finetune == "full":
        return None
    from peft import LoraConfig  # peft imports bitsandbytes: only runs with adapters pay for them (~2 s, ~55 MB)

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )


def is_peft(model) -> bool:
    """A peft-wrapped model (LoRA), asked without importing peft: a model can only be one once peft is
    imported, which full fine-tuning never does."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def hf_model(model):
    """The transformers model under a peft wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if is_peft(model) else model


def load_kwargs(finetune: str, dtype_name: str) -> dict:
    """`from_pretrained` arguments for a model that will be trained with `finetune`.

    Full fine-tuning: float32 weights (autocast supplies the compute dtype). LoRA: the frozen base in
    the compute dtype (peft keeps the adapters in float32). QLoRA: the base quantized, computing in
    the compute dtype.
    """
    dtype = resolve_dtype(dtype_name)
    if finetune == "full":
        return {"dtype": torch.float32}
    kwargs = {"dtype": dtype}
    quant = quantization_config(finetune, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if not torch.cuda.is_available():
            kwargs["device_map"] = {"": "cpu"}
    return kwargs


def load_trained(model_cls, path, finetune: str, dtype_name: str, **kwargs) -> PreTrainedModel:
    """`from_pretrained` of a model a stage will train with `finetune` (load_kwargs)."""
    model = model_cls.from_pretrained(path, **load_kwargs(finetune, dtype_name), **kwargs)
    if finetune == "qlora-4bit" and not torch.cuda.is_available():
        # bitsandbytes on a CPU with AVX512-BF16 repacks a 4-bit layer at its first eval-mode forward, in
        # place and for good, for a bf16 kernel that rounds the scales to bf16 and has no backward (torch
        # warns "an autograd kernel was not registered"): after PPO's first rollout or the Trainer's
        # first evaluation, training would backprop through it wrongly. Kept on the exact path instead.
        import bitsandbytes as bnb

        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                module.support_avx512bf16_for_cpu = False
    return model


def numel(p: torch.Tensor) -> int:
    """A parameter's full size, also when ZeRO-3 leaves an empty local shard."""
    return getattr(p, "ds_numel", p.numel())


def disk_need(checkpoint: int, artifact: int) -> int:
    """Peak bytes a training stage writes, for the free-space check before training: two checkpoints
    while a new one is written before the old one is removed, or the last checkpoint and the artifact
    at the end (the checkpoint goes only once the artifact is complete)."""
    return checkpoint + max(checkpoint, artifact)


def trainer_disk_need(model: torch.nn.Module) -> int:
    """SFT / RM: a Trainer checkpoint holds the trained weights in float32 and AdamW's two moments (12
    bytes a trained parameter: the whole model, or the adapters); the artifact every weight in float32
    (adapters merged). Quantized weights count at their packed size: a small underestimate."""
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return disk_need(12 * trainable, 4 * sum(numel(p) for p in model.parameters()))


def upcast_trainable(model: torch.nn.Module) -> None:
    """Trained weights in float32: peft upcasts LoRA weights itself, but not the full copies it
    trains with them (`modules_to_save`, e.g. a reward/value model's score head over a bf16 base)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()


def _pad_candidates(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Special tokens the tokenizer already has that a model never emits, best first: one named as
    padding, then reserved or unused ones, then an end-of-text token distinct from EOS (Qwen's
    `<|endoftext|>` next to `<|im_end|>`). Tokens the chat template writes (turn markers) are emitted
    by the model, so they never qualify; neither do EOS, BOS and UNK."""
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
    taken = {tokenizer.eos_token, tokenizer.bos_token, tokenizer.unk_token}
    specials = [
        t.content
        for _, t in sorted(tokenizer.added_tokens_decoder.items())
        if t.special and t.content not in taken and t.content not in template
    ]
    ranked = []
    for words in (("pad",), ("reserved", "unused"), ("endoftext", "end_of_text")):
        ranked += [t for t in specials if any(w in t.lower() for w in words) and t not in ranked]
    return ranked


SENTINEL = "\u2063sentinel\u2063"  # a reply no template rewrites, to find what follows a reply


def turn_end_token(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The special token the chat template writes right after an assistant's reply (ChatML's
    `<|im_end|>`, Llama 3's `<|eot_id|>`, Gemma's `<end_of_turn>`): what SFT on conversations teaches
    the model to emit when its turn is over. trl's SFTTrainer appends EOS only to plain text, so a
    base whose EOS is another token (Qwen2.5 base: `<|endoftext|>`) learns to stop with this one.
    None without a template, or if the template writes no special token after the reply."""
    if tokenizer.chat_template is None:  # (a dict of named templates is applied by its default)
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": SENTINEL}], tokenize=False
        )
    except Exception:  # a template with rules of its own (system turns, roles): no answer from it
        return None
    if SENTINEL not in text:
        return None
    after = tokenizer(text.split(SENTINEL, 1)[1], add_special_tokens=False)["input_ids"]
    special = special_ids(tokenizer)
    return next((tokenizer.convert_ids_to_tokens(i) for i in after if i in special), None)


def special_ids(tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Every special token's id: the named ones and any added token marked special (the ones
    `decode(..., skip_special_tokens=True)` drops)."""
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def stop_token_ids(
    tokenizer: PreTrainedTokenizerBase, generation_config=None, stop_token: str | list[str] | None = None
) -> list[int]:
    """The tokens that end a response, the same in PPO's rollouts, eval and the stop-token metrics.

    `stop_token` (the recipe's `ppo.stop_token`, one token or a list) if given; else every token that
    ends a turn as the model was trained: the chat template's turn end (`turn_end_token`), the
    tokenizer's EOS (plain-text SFT appends it), and the EOS ids the generation config lists (Llama 3
    and Qwen2.5 Instruct list several)."""
    if stop_token:
        names = [stop_token] if isinstance(stop_token, str) else list(stop_token)
        vocab = tokenizer.get_vocab()
        unknown = [t for t in names if t not in vocab]
        if unknown:
            raise ConfigError(
                f"ppo.stop_token {unknown} is not in the policy's vocabulary: name a token it has "
                f"(e.g. {tokenizer.eos_token!r})"
            )
        return [vocab[t] for t in names]
    ids = [tokenizer.convert_tokens_to_ids(t) for t in (turn_end_token(tokenizer), tokenizer.eos_token) if t]
    return list(dict.fromkeys(ids + id_list(getattr(generation_config, "eos_token_id", None))))


def id_list(ids) -> list[int]:
    """A config's token id field (one id, a list of them, or None) as a list."""
    return ids if isinstance(ids, list) else [] if ids is None else [ids]


def policy_tokenizer(path, stop_token: str | list[str] | None = None):
    """A policy's tokenizer, padding on the left (prompts end where generation starts), and the ids
    that end its responses (`stop_token_ids`), for PPO's rollouts and eval alike. The pad token may be
    one of them: padding is marked by masks, never by id. A PEFT adapter directory without tokenizer
    files, or without a generation config, has its base's."""
    tokenizer = load_tokenizer(own_or_base(path, "tokenizer_config.json"), padding_side="left")
    generation = generation_config(own_or_base(path, "generation_config.json"))
    return tokenizer, stop_token_ids(tokenizer, generation, stop_token)


def own_or_base(path, name: str) -> str:
    """Where `path`'s file `name` is read from: `path`, or its base where `path` is a PEFT adapter
    directory without that file."""
    base = artifacts.adapter_base(path)
    return str(path) if base is None or (Path(str(path)) / name).is_file() else base


def is_encoder(tokenizer: PreTrainedTokenizerBase) -> bool:
    """A BERT / RoBERTa / DeBERTa-style tokenizer: no chat template, a classification token and a
    separator that frame a text pair (`[CLS] prompt [SEP] response [SEP]`). Its model pools the first
    token and reads the pair as it was pre-trained to, so it needs no EOS and no chat template
    (pipeline/scoring.py renders for it). Decoder families have no CLS/SEP tokens."""
    return tokenizer.chat_template is None and tokenizer.cls_token is not None and tokenizer.sep_token is not None


# Encoders whose position ids start after the padding index (RoBERTa's create_position_ids_from_input_ids)
OFFSET_POSITIONS = {
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "roberta-prelayernorm",
    "data2vec-text",
    "longformer",
    "mpnet",
}


def bound_encoder_length(tokenizer: PreTrainedTokenizerBase, config) -> None:
    """An encoder reads at most its position table: the tokenizer's `model_max_length` (unset, i.e.
    1e30, in many saved tokenizers) is capped to it, so that scoring cuts over-long pairs to fit
    (pipeline/scoring.py) instead of indexing past the position embeddings."""
    positions = getattr(config, "max_position_embeddings", None)
    if not is_encoder(tokenizer) or positions is None:
        return
    if config.model_type in OFFSET_POSITIONS:
        positions -= (config.pad_token_id if config.pad_token_id is not None else 1) + 1
    tokenizer.model_max_length = min(tokenizer.model_max_length, positions)


def load_tokenizer(path: str, reward: bool = False, **kwargs) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token, never a new one.

    Padding is marked by attention masks everywhere in this pipeline (and in trl's collators, which pad
    labels with -100), never by comparing ids with the pad id, so any token may pad, EOS included. A
    tokenizer with a pad token keeps it (SmolLM2's pad is its EOS); one without reuses a special token
    it has and never emits (`_pad_candidates`), else UNK, else EOS (Mistral v0.1: `<unk>`; GPT-2:
    `<|endoftext|>`). Adding a token instead would grow the embeddings, and every LoRA adapter would
    then carry full copies of the embeddings and LM head (236 MB for SmolLM2-135M's 1.6 MB of LoRA
    weights) and no longer load onto the original hub model. `reward`: the tokenizer of a reward
    model, which may be an encoder's (no EOS needed, see `is_encoder`).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # not on the hub / offline / no tokenizer files in the directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"no tokenizer could be loaded from '{path}' ({first})") from e
    if is_encoder(tokenizer) and not reward:
        raise ConfigError(
            f"'{path}' has an encoder's tokenizer (BERT-style [CLS]/[SEP], no chat template): a policy "
            f"must be a causal language model (an encoder can be `rm.model` or `ppo.reward_model`)"
        )
    if tokenizer.eos_token is None and not is_encoder(tokenizer):
        raise ConfigError(f"the tokenizer of '{path}' has no EOS token: set `eos_token` in its tokenizer_config.json")
    # A reward model to be trained pools its score at the last token that is not the pad token
    # (transformers' sequence classifiers), so there a pad equal to EOS would hide the EOS that
    # plain-text pairs end with: a spare token pads instead, where the tokenizer has one.
    if tokenizer.pad_token is None or (reward and tokenizer.pad_token_id == tokenizer.eos_token_id):
        spare = _pad_candidates(tokenizer)
        tokenizer.pad_token = spare[0] if spare else tokenizer.pad_token or tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def generation_config(path) -> GenerationConfig | None:
    """A model's saved generation config (its EOS list), or None if it has none."""
    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:
        return None


def align_special_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """The model's config and generation config take the tokenizer's pad and EOS ids (a sequence
    classifier finds its last token through `config.pad_token_id`; `pad_token_id: null` fails on any
    batch of two). The generation config keeps every EOS it lists, the tokenizer's first. A
    tokenizer with more tokens than the model has embedding rows is not this model's."""
    weight = model.get_input_embeddings().weight
    rows = getattr(weight, "ds_shape", weight.shape)[0]  # (ZeRO-3 leaves an empty local shard)
    used = [i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) if i is not None]
    # a few entries past the embeddings occur on the hub (Gemma 3: an image token the text model never
    # sees); many, or a special token the pipeline uses among them, mean another model's tokenizer
    if len(tokenizer) > rows + TOKENIZER_SLACK or any(i >= rows for i in used):
        raise ConfigError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings have {rows} rows: "
            f"the tokenizer does not belong to this model (use the model's own tokenizer)"
        )
    model.config.pad_token_id = tokenizer.pad_token_id
    text_config = model.config.get_text_config()
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in id_list(text_config.eos_token_id):
        text_config.eos_token_id = tokenizer.eos_token_id  # as trl's `eos_token` does for the model it trains
    generation = getattr(model, "generation_config", None)
    if generation is not None and tokenizer.eos_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
        eos = list(dict.fromkeys([tokenizer.eos_token_id, *id_list(generation.eos_token_id)]))
        generation.eos_token_id = eos if len(eos) > 1 else eos[0]


def load_reference(path, dtype: torch.dtype) -> PreTrainedModel:
    """The frozen reference of a fully fine-tuned policy, computing exactly as the policy does.

    The policy is float32 weights under autocast: matmuls (nn.Linear) run on weights cast to the
    compute dtype, everything else (embeddings, norms, the residual stream) in float32. A reference
    loaded in bf16 differs before any update (its residual stream is bf16: 3.8e-3 nats per token on
    two layers, growing with depth), and the KL penalty would charge that artefact. Here only the
    Linear layers are stored in the compute dtype, which is what autocast computes with anyway, and
    the rest stays float32: identical log-probs at 2 bytes per linear-layer weight. A tied LM head
    stays float32, as the embedding it shares; so do weights outside linear layers (the fused expert
    tensors of some mixture-of-experts models): correct, at float32's memory."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if dtype != torch.float32:
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers (addmm: autocast casts it too)

        tied = model.get_input_embeddings().weight
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module.weight is not tied:
                module.to(dtype)
    return model


def dequantized(model: PreTrainedModel) -> PreTrainedModel:
    """A bitsandbytes-quantized model as the plain float32 model it computes with, returned on the host.

    Each 4-bit / 8-bit linear layer becomes an `nn.Linear` holding its dequantized weight (the NF4 codes
    times their scales, LLM.int8's rows times theirs), moved to the host one layer at a time, so no
    float32 copy of the model is ever on the GPU (the quantized one is, where bitsandbytes loads it);
    the layers that were never quantized keep their loaded values. transformers' `model.dequantize()`
    does the same, but builds every float32 layer on the GPU."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight

    for name, module in list(model.named_modules()):
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            weight = dequantize_bnb_weight(module.weight, getattr(module, "state", None))
            linear = torch.nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device="cpu", dtype=torch.float32
            )
            with torch.no_grad():
                linear.weight.copy_(weight)
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            model.set_submodule(name, linear)
    model.hf_quantizer.remove_quantization_config(model)  # the artifact is a plain model
    return model.to("cpu", torch.float32)


def merge_adapter(
    model_cls, base: str, adapter_dir: Path, tokenizer, finetune: str, dtype_name: str, **kwargs
) -> PreTrainedModel:
    """Base weights + trained adapter, merged into a plain float32 model on the host.

    LoRA: merged into a float32 copy of the base, so the small LoRA deltas do not round away as they
    would if added to bf16 weights. QLoRA: the adapter was trained against the quantized base, so it
    is merged into that base dequantized (`dequantized`), not into the original weights: the artifact
    then computes what the trained policy computed (the quantization error is part of what the adapter
    learned around), and loads with a plain `from_pretrained`. Runs on the main process alone, also
    under ZeRO-3 (see engine.single_process_loading).
    """
    from pipeline.engine import single_process_loading

    with single_process_loading():
        if finetune.startswith("qlora"):  # quantized exactly as in training (the same call, deterministic)
            model = dequantized(load_trained(model_cls, base, finetune, dtype_name, **kwargs))
        else:
            model = model_cls.from_pretrained(base, dtype=torch.float32, **kwargs)
        align_special_tokens(model, tokenizer)
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
