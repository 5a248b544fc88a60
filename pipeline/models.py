"""Loading models and tokenizers the same way in every stage: precision, quantization, LoRA, merging.

Precision (the recipe's `dtype`, see `pipeline.config.TrainStage.dtype`) is mixed, never pure: the
weights a stage trains (a full model, LoRA adapters, a value model or head) are stored in float32 and
run under autocast in the compute dtype, because AdamW steps at the usual RLHF learning rates
(1e-6 .. 2e-5) are far below bf16's resolution (a weight of 0.05 has a bf16 step of ~2e-4) and round
away. Frozen weights (PPO's reference and reward models, the base under LoRA adapters) are stored in
the compute dtype: they only run forwards, and it halves their memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from transformers import AutoTokenizer, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import ConfigError, LoraSettings

PAD_TOKEN = "<|pad|>"
# Embedding rows are rounded up to a multiple of this when a token must be added: matrix shapes that
# are multiples of 64 keep the lm_head on the fast GPU kernels.
EMBEDDING_MULTIPLE = 64


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
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    if finetune == "qlora-8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def lora_config(finetune: str, lora: LoraSettings, task_type: str) -> LoraConfig | None:
    if finetune == "full":
        return None
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                      target_modules=lora.target_modules, task_type=task_type)


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
    specials = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items())
                if t.special and t.content not in taken and t.content not in template]
    ranked = []
    for words in (("pad",), ("reserved", "unused"), ("endoftext", "end_of_text")):
        ranked += [t for t in specials if any(w in t.lower() for w in words) and t not in ranked]
    return ranked


def is_encoder(tokenizer: PreTrainedTokenizerBase) -> bool:
    """A BERT / RoBERTa / DeBERTa-style tokenizer: no chat template, a classification token and a
    separator that frame a text pair (`[CLS] prompt [SEP] response [SEP]`). Its model pools the first
    token and reads the pair as it was pre-trained to, so it needs no EOS and no chat template
    (pipeline/scoring.py renders for it). Decoder families have no CLS/SEP tokens."""
    return tokenizer.chat_template is None and tokenizer.cls_token is not None and tokenizer.sep_token is not None


# Encoders whose position ids start after the padding index (RoBERTa's create_position_ids_from_input_ids)
OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "roberta-prelayernorm", "data2vec-text",
                    "longformer", "mpnet"}


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
    """The model's tokenizer, with a pad token distinct from EOS that costs nothing if possible.

    If pad == EOS, masking the padding also masks every real EOS, and the model never learns to
    stop. A tokenizer without its own pad token reuses a special token it has and never emits
    (`_pad_candidates`); only if there is none is a new one added, and `fit_embeddings` then grows the
    embeddings to a multiple of 64 rows. Reusing keeps the vocabulary, so LoRA adapters need no copy
    of the embeddings and load onto the original base model. `reward`: the tokenizer of a reward model,
    which may be an encoder's (no EOS needed, see `is_encoder`).
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:  # not on the hub / offline / no tokenizer files in the directory
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"no tokenizer could be loaded from '{path}' ({first})") from e
    if is_encoder(tokenizer) and not reward:
        raise ConfigError(f"'{path}' has an encoder's tokenizer (BERT-style [CLS]/[SEP], no chat template): a policy "
                          f"must be a causal language model (an encoder can be `rm.model` or `ppo.reward_model`)")
    if tokenizer.eos_token is None and not is_encoder(tokenizer):
        raise ConfigError(f"the tokenizer of '{path}' has no EOS token: set `eos_token` in its tokenizer_config.json")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        candidates = _pad_candidates(tokenizer)
        if candidates:
            tokenizer.pad_token = candidates[0]
        else:
            tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings if the tokenizer gained tokens (rounded up to a multiple of 64 rows), and
    record the special ids for generate. A tokenizer far larger than the model's vocabulary is not
    this model's (only the pad token `load_tokenizer` may add is grown into the embeddings)."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows + 1:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's embeddings have {rows} rows: "
                          f"the tokenizer does not belong to this model (use the model's own tokenizer)")
    if rows < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_MULTIPLE)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def merge_adapter(model_cls, base: str, adapter_dir: Path, tokenizer, **kwargs) -> PreTrainedModel:
    """Base weights + trained adapter, merged into a plain float32 model.

    Merged into an unquantized float32 copy of the base: QLoRA artifacts then load with a plain
    `from_pretrained` and lose nothing to re-quantization, and the small LoRA deltas do not round
    away as they would if added to bf16 weights. Runs on the main process alone, on the host, also
    under ZeRO-3 (see engine.single_process_loading).
    """
    from pipeline.engine import single_process_loading
    with single_process_loading():
        model = model_cls.from_pretrained(base, dtype=torch.float32, **kwargs)
        fit_embeddings(model, tokenizer)
        return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
