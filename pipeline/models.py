"""Loading models and tokenizers the same way in every stage: dtype, quantization, LoRA, merging."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from transformers import AutoTokenizer, BitsAndBytesConfig, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import LoraSettings, TrainStage

PAD_TOKEN = "<|pad|>"


def resolve_dtype(name: str) -> torch.dtype:
    """`auto`: bfloat16 on a GPU that supports it, float32 elsewhere (CPU bf16 is slow and lossy)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, name)


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


def load_kwargs(stage: TrainStage) -> dict:
    """Keyword arguments for `from_pretrained` that put the stage's dtype and quantization in force."""
    dtype = resolve_dtype(stage.dtype)
    kwargs = {"dtype": dtype}
    quant = quantization_config(stage.finetune, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
        if not torch.cuda.is_available():
            kwargs["device_map"] = {"": "cpu"}
    return kwargs


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token distinct from EOS.

    If pad == EOS, masking the padding also masks every real EOS, and the model never learns to
    stop; so a tokenizer without its own pad token gets one (the embeddings are resized to match
    by `fit_embeddings`).
    """
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer of '{path}' has no EOS token: set `eos_token` in its tokenizer_config.json")
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def fit_embeddings(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Grow the embeddings if the tokenizer gained tokens, and record the special ids for generate."""
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def merge_adapter(model_cls, base: str, adapter_dir: Path, tokenizer, dtype: torch.dtype, **kwargs) -> PreTrainedModel:
    """Base weights (full precision, not quantized) + trained adapter, merged into a plain model.

    The adapter is merged into an unquantized copy of the base so that QLoRA artifacts load with a
    plain `from_pretrained` and lose nothing to re-quantization.
    """
    model = model_cls.from_pretrained(base, dtype=dtype, **kwargs)
    fit_embeddings(model, tokenizer)
    return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
