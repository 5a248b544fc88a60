"""End-to-end SFT on the demo data with a tiny model: full, LoRA and 4-bit / 8-bit QLoRA."""

import json
import subprocess

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.artifacts import read_manifest, require
from pipeline.errors import ConfigError, DataError, MissingArtifact
from stages import sft
from tests.conftest import REPO, quantized_layers, read_jsonl, sft_args

pytestmark = pytest.mark.e2e  # whole stages, several processes


@torch.no_grad()
def token_logprobs(model, enc) -> torch.Tensor:
    logits = model(**enc).logits[:, :-1].float()
    targets = enc["input_ids"][:, 1:]
    return logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0] * enc["attention_mask"][:, 1:]


def generate(path, text="how was the music of star quest ?"):
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
    )
    enc = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    return out[0, enc["input_ids"].shape[1] :], tokenizer


@pytest.mark.parametrize("finetune, lr", [("full", 3e-3), ("lora", 1e-2), ("qlora-4bit", 1e-2), ("qlora-8bit", 1e-2)])
def test_sft_trains_and_the_artifact_loads_and_generates(tmp_path, base_model, finetune, lr, loaded_models):
    sft.main(
        sft_args(tmp_path, base_model, f"sft.finetune={finetune}", f"sft.trainer.learning_rate={lr}", "sft.lora.r=8")
    )
    trained = loaded_models[0]  # what the Trainer trained: quantized layers under QLoRA, a small trained share
    bits = {"qlora-4bit": "4bit", "qlora-8bit": "8bit"}.get(finetune)
    assert quantized_layers(trained) == {"4bit": 14 if bits == "4bit" else 0, "8bit": 14 if bits == "8bit" else 0}
    share = sum(p.numel() for p in trained.parameters() if p.requires_grad) / sum(
        p.numel() for p in trained.parameters()
    )
    assert (share == 1.0) if finetune == "full" else share < 0.3  # (4-bit weights count packed, two per byte)
    out = tmp_path / "demo" / "sft"
    manifest = require(out, "sft")
    metrics = manifest["metrics"]
    # Full fine-tuning learns the demo language quickly; adapters on a random (not pretrained) base
    # with frozen embeddings learn slower, but their loss must still fall clearly.
    fall = 0.2 * metrics["eval_loss_before"] if finetune == "full" else 0.3
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - fall
    logged = [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]
    assert logged[-1] < logged[0]
    assert manifest["inputs"]["model"] == str(base_model) and manifest["config"]["sft"]["finetune"] == finetune

    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft, no quantization
    assert not any("lora" in name for name in model.state_dict())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert (out / "adapter" / "adapter_config.json").is_file() == (finetune != "full")
    tokens, tokenizer = generate(out)
    assert len(tokens) > 0 and tokenizer.pad_token_id != tokenizer.eos_token_id
    # the artifact is the policy that was trained: under QLoRA the adapter is merged into the dequantized
    # base it trained against (merged into the original weights, it differs by the quantization error)
    ids = tokenizer(
        ["how was the music of star quest ? it was loud and long .", "tell me about the city ."],
        return_tensors="pt",
        padding=True,
    )
    gap = (token_logprobs(model, ids) - token_logprobs(trained.eval(), ids)).abs().max().item()
    print(f"{finetune}: artifact vs trained policy, max |log-prob difference| {gap:.2e}")
    # (LLM.int8 picks outlier columns per batch, so the 8-bit policy itself depends on the batch it is in;
    # 4-bit is the discriminating case: 2e-3 when merged into the original weights)
    assert gap < {"qlora-8bit": 1e-2}.get(finetune, 1e-4)


def test_sft_teaches_the_model_to_stop(tmp_path, base_model):
    sft.main(sft_args(tmp_path, base_model, "sft.trainer.num_train_epochs=4"))
    tokens, tokenizer = generate(tmp_path / "demo" / "sft")
    assert tokenizer.eos_token_id in tokens.tolist()


def test_rerun_is_skipped_unless_something_changed(tmp_path, base_model, capsys):
    args = sft_args(tmp_path, base_model, "sft.trainer.num_train_epochs=1")
    sft.main(args)
    out = tmp_path / "demo" / "sft"
    first = read_manifest(out)
    sft.main(args)
    assert "is up to date" in capsys.readouterr().out and read_manifest(out) == first
    sft.main(args + ["--force"])
    assert read_manifest(out)["finished"] >= first["finished"] and read_manifest(out) != first
    sft.main(args + ["sft.trainer.learning_rate=1e-3"])  # a changed recipe re-runs
    assert read_manifest(out)["fingerprint"] != first["fingerprint"]


def test_failed_rerun_keeps_the_previous_artifact(tmp_path, base_model):
    args = sft_args(tmp_path, base_model, "sft.trainer.num_train_epochs=1")
    sft.main(args)
    out = tmp_path / "demo" / "sft"
    before = read_manifest(out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"bad.jsonl, line 2"):
        sft.main(args + [f"sft.dataset={bad}"])
    assert read_manifest(out) == before
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_missing_inputs_are_clear_errors(tmp_path, base_model):
    with pytest.raises(ConfigError, match="sft.dataset is not set"):
        sft.main(["--recipe", str(REPO / "stages/recipes/demo.yaml"), f"runs_dir={tmp_path}", "sft.dataset=null"])
    with pytest.raises(DataError, match="not found"):
        sft.main(sft_args(tmp_path, base_model, f"sft.dataset={tmp_path}/none.jsonl"))
    with pytest.raises(ConfigError, match="unknown key 'sft.trainr'"):
        sft.main(sft_args(tmp_path, base_model, "sft.trainr.x=1"))
    with pytest.raises(MissingArtifact):
        require(tmp_path / "demo" / "sft", "sft")  # nothing above left a complete-looking artifact


def test_make_sft_with_two_processes(tmp_path):
    """The Makefile target, through accelerate launch with 2 gloo processes, then a no-op re-run."""
    overrides = f"runs_dir={tmp_path} sft.dataset.limit=256 sft.eval_dataset.limit=64 sft.trainer.num_train_epochs=1"
    run = subprocess.run(
        ["make", "-s", "sft", "NPROC=2", f"ARGS={overrides}"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    manifest = require(tmp_path / "demo" / "sft", "sft")
    # 256 rows hold out nothing (eval file given), 2 processes x 32 per device -> 4 steps per epoch
    steps = [r["step"] for r in read_jsonl(tmp_path / "demo" / "sft" / "metrics.jsonl")]
    assert max(steps) == 4 and manifest["metrics"]["train_rows"] == 256
    again = subprocess.run(["make", "-s", "sft", f"ARGS={overrides}"], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0 and "is up to date" in again.stdout
