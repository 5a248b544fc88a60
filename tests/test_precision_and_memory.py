"""Correct on real settings: mixed precision, plain sampling, memory options, a pad token that costs
nothing. bf16 autocast runs on CPU, so every check here is the one a GPU run depends on."""

import shutil

import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from transformers import AutoModelForCausalLM, GenerationConfig, modeling_utils
from transformers.generation import utils as generation_utils

from pipeline import models
from pipeline.data import load_prompts
from pipeline.recipe_loader import load_recipe
from pipeline.rl.iteration import PolicyAndValue, disable_dropout, reward, score
from pipeline.rl.rewards import Rewards
from pipeline.rl.rollout import generate, sampling_config
from pipeline.rl.run_setup import Start, load_models
from stages import eval as evaluate
from stages import ppo, sft
from tests import families
from tests.conftest import DEMO_RECIPE, ppo_args, read_jsonl, sft_args

# `make test-gpu` runs this file on a CUDA machine: the checks then build their models there
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def weights(path) -> dict:
    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(path).state_dict().items()}


def changed_share(before: dict, after: dict) -> float:
    changed = sum((before[k] != after[k]).sum().item() for k in before if "norm" not in k)
    return changed / sum(before[k].numel() for k in before if "norm" not in k)


# ---- 1. mixed precision, not pure bf16 ----


def test_sft_under_bf16_autocast_keeps_float32_weights_that_move_at_small_learning_rates(
    tmp_path, base_model, linear_output_dtypes
):
    sft.main(
        sft_args(
            tmp_path,
            base_model,
            "sft.dtype=bfloat16",
            "sft.trainer.learning_rate=1e-5",
            "sft.dataset.limit=64",
            "sft.eval_dataset.limit=8",
            "sft.trainer.num_train_epochs=1",
            "sft.trainer.warmup_steps=0",
        )
    )
    assert torch.bfloat16 in linear_output_dtypes  # the Trainer computed under bf16 autocast
    out = tmp_path / "demo" / "sft"
    after = weights(out)
    assert {v.dtype for v in after.values()} == {torch.float32}
    # 8 AdamW steps of ~1e-5: bf16 weights (a step of ~1e-4 at 0.02) would keep almost all of them
    assert changed_share(weights(base_model), after) > 0.9


def test_ppo_under_bf16_trains_float32_weights_and_a_value_head(runs_with_rm, linear_output_dtypes):
    ppo.main(
        ppo_args(
            runs_with_rm,
            "ppo.dtype=bfloat16",
            "ppo.value_model=head",
            "ppo.learning_rate=1e-5",
            "ppo.total_episodes=64",
        )
    )
    # every matmul of the float32 policy ran in bf16 (accelerate hands the logits back in float32)
    assert linear_output_dtypes == {torch.bfloat16}
    out = runs_with_rm / "demo" / "ppo"
    history = read_jsonl(out / "metrics.jsonl")
    assert [h["first_minibatch"]["ratio"] for h in history] == pytest.approx([1.0, 1.0], abs=1e-5)
    after = weights(out)
    assert {v.dtype for v in after.values()} == {torch.float32}
    assert changed_share(weights(runs_with_rm / "demo" / "sft"), after) > 0.9
    assert torch.load(out / "value_head.pt")["weight"].dtype == torch.float32


def ppo_models(runs_dir, *overrides):
    recipe = load_recipe(DEMO_RECIPE, [f"runs_dir={runs_dir}", *overrides])
    run = recipe.run_dir
    tokenizer = models.load_tokenizer(str(run / "sft"), padding_side="left")
    acc = Accelerator(cpu=DEVICE == "cpu")
    model, reference, rewards, _ = load_models(
        recipe.ppo, Start(str(run / "sft"), run, recipe.ppo, acc), lambda m: str(run / "rm"), tokenizer, acc
    )
    # (the trained model is placed by accelerate's prepare in the stage; the frozen ones are placed already)
    return recipe, tokenizer, (model.to(DEVICE), reference, rewards)


def test_frozen_models_in_the_compute_dtype_trained_ones_in_float32(rm_run):
    _, _, (model, reference, rewards) = ppo_models(rm_run, "ppo.dtype=bfloat16")
    scorer = rewards.models()[0].scorer
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    # the reference: matmul weights in bf16 (what autocast computes with), the rest float32 like the policy's
    linear = {
        m.weight.dtype
        for m in reference.modules()
        if isinstance(m, torch.nn.Linear) and m.weight is not reference.get_input_embeddings().weight
    }
    assert linear == {torch.bfloat16} and reference.get_input_embeddings().weight.dtype == torch.float32
    assert {p.dtype for p in scorer.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("family", ["llama-tied", "llama-untied", "gpt2"])
def test_the_reference_computes_exactly_as_the_policy_under_bf16(family, tmp_path):
    """Old code loaded the reference in bf16: its residual stream and embeddings are bf16 while the
    float32 policy's are float32 under autocast, so log-probs differed before any update."""
    from transformers import GPT2Config

    tokenizer = families.chatml_tokenizer()
    torch.manual_seed(0)
    config = (
        GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4)
        if family == "gpt2"
        else families.llama_config(tokenizer, tie_word_embeddings=family == "llama-tied")
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    policy = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).to(DEVICE)
    reference = models.load_reference(tmp_path, torch.bfloat16).to(DEVICE)
    pure_bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).to(DEVICE)
    ids = torch.randint(0, len(tokenizer), (4, 24), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        logits = [m(input_ids=ids).logits.float() for m in (policy, reference, pure_bf16)]
    assert torch.equal(logits[0], logits[1])
    assert not torch.equal(logits[0], logits[2])  # what the old reference computed
    bytes_of = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert bytes_of(reference) < 0.75 * bytes_of(policy)


@pytest.mark.parametrize(
    "variant", ["ppo.value_model=reward", "ppo.value_model=sft", "ppo.value_model=head", "ppo.finetune=lora"]
)
def test_kl_before_the_first_update_is_zero_under_bf16(variant, runs_with_rm):
    """The rollouts of iteration 1 come from the SFT policy itself: KL(policy || reference) is 0 up to
    float rounding, under bf16 autocast too (old code: -3e-3 on the demo, from the bf16 reference)."""
    ppo.main(ppo_args(runs_with_rm, "ppo.dtype=bfloat16", variant, "ppo.total_episodes=32", "ppo.save_every=100"))
    first = read_jsonl(runs_with_rm / "demo" / "ppo" / "metrics.jsonl")[0]
    assert abs(first["objective/kl"]) < 1e-6, first["objective/kl"]


def test_a_lora_policy_trains_a_small_fraction_and_no_full_value_model(rm_run):
    _, _, (model, reference, _) = ppo_models(rm_run, "ppo.finetune=lora", "ppo.lora.r=2", "ppo.dtype=bfloat16")
    assert reference is None  # the policy with its adapter disabled
    assert isinstance(model.value_model, PeftModel)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {p.dtype for p in trainable} == {torch.float32}  # adapters float32 over a bf16 base
    assert sum(p.numel() for p in trainable) < 0.1 * sum(p.numel() for p in model.parameters())


# ---- 3. sampling exactly as the log-probs assume ----


@pytest.fixture
def recorded_processors(monkeypatch):
    seen = []
    real = generation_utils.GenerationMixin._get_logits_processor

    def spy(self, *args, **kwargs):
        processors = real(self, *args, **kwargs)
        seen.append(sorted(type(p).__name__ for p in processors))
        return processors

    monkeypatch.setattr(generation_utils.GenerationMixin, "_get_logits_processor", spy)
    return seen


def test_rollouts_and_eval_sample_with_temperature_alone(runs_with_rm, base_model, recorded_processors):
    sft_dir = runs_with_rm / "demo" / "sft"
    shipped = GenerationConfig.from_pretrained(sft_dir)  # what a hub Instruct model ships
    shipped.update(
        do_sample=True,
        repetition_penalty=1.3,
        top_k=5,
        top_p=0.5,
        min_new_tokens=3,
        no_repeat_ngram_size=2,
        temperature=0.2,
    )
    shipped.save_pretrained(sft_dir)
    ppo.main(ppo_args(runs_with_rm, "ppo.total_episodes=32", "ppo.save_every=100"))
    assert recorded_processors == [["TemperatureLogitsWarper"]]
    recorded_processors.clear()
    evaluate.main(
        [
            "--recipe",
            DEMO_RECIPE,
            f"runs_dir={runs_with_rm}",
            f"sft.model={base_model}",
            "eval.prompts.limit=6",
            "eval.batch_size=4",
            "eval.max_new_tokens=8",
        ]
    )
    # base, sft, ppo, best (the policy the gold judge scored best) x (sampled, greedy) x 2 batches:
    # temperature alone, or nothing at all (greedy)
    assert len(recorded_processors) == 16
    assert {tuple(p) for p in recorded_processors} == {("TemperatureLogitsWarper",), ()}
    # the artifact keeps what the model ships for its users
    assert GenerationConfig.from_pretrained(runs_with_rm / "demo" / "ppo").repetition_penalty == 1.3


# ---- 5. memory ----


def test_scoring_in_micro_batches_gives_the_same_experience(rm_run):
    # float32 (on a GPU too): bf16 GEMMs of other batch shapes round differently, and this is about slicing
    recipe, tokenizer, (model, reference, rewards) = ppo_models(rm_run, "ppo.dtype=float32")
    cfg = recipe.ppo
    config = sampling_config(cfg.temperature, 12, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    torch.manual_seed(0)
    rollout = generate(model.policy, tokenizer, load_prompts(cfg.prompts)[0][:12], config, DEVICE)
    rewarded = reward(rollout, {}, rewards, Rewards({}, DEVICE), cfg, (0.0, 1.0))
    whole = score(rollout, rewarded, model, reference, cfg, forward_batch_size=12)
    parts = score(rollout, rewarded, model, reference, cfg, forward_batch_size=5)
    for name in ("old_logp", "ref_logp", "old_values", "entropy", "scores"):
        assert torch.allclose(getattr(whole, name), getattr(parts, name), atol=1e-5), name


def test_gradient_checkpointing_recomputes_with_dropout_off(runs_with_rm, tmp_path, monkeypatch):
    """An SFT model with attention dropout (as many hub configs ship): PPO switches it off, so the
    first minibatch's ratio is 1 and gradient checkpointing (which recomputes the forward in
    backward) changes no metric."""
    import json

    config = runs_with_rm / "demo" / "sft" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "attention_dropout": 0.3}))
    shutil.copytree(runs_with_rm / "demo", tmp_path / "plain" / "demo")
    calls = []
    real = modeling_utils.checkpoint
    monkeypatch.setattr(modeling_utils, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = ["ppo.total_episodes=64", "ppo.forward_batch_size=4", "ppo.learning_rate=1e-3"]
    ppo.main(ppo_args(runs_with_rm, "ppo.gradient_checkpointing=true", *common))
    assert calls  # only in train mode: with the models in eval mode it would silently do nothing
    ppo.main(ppo_args(tmp_path / "plain", *common))
    checkpointed, plain = (read_jsonl(r / "demo" / "ppo" / "metrics.jsonl") for r in (runs_with_rm, tmp_path / "plain"))
    for a, b in zip(checkpointed, plain):
        assert a["first_minibatch"]["ratio"] == pytest.approx(1.0, abs=1e-5)
        for key in ("objective/scores", "objective/kl", "loss/policy_avg", "loss/value_avg"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key


def test_dropout_is_off_in_train_mode():
    tokenizer = families.chatml_tokenizer()
    model = PolicyAndValue(
        AutoModelForCausalLM.from_config(families.llama_config(tokenizer, attention_dropout=0.5)), None, value_head=True
    )
    disable_dropout(model)
    model.train()
    ids = torch.randint(0, len(tokenizer), (2, 10))
    mask = torch.ones_like(ids)
    a, b = model(ids, mask, 4), model(ids, mask, 4)
    assert torch.equal(a[0], b[0])


# ---- 6. a pad token that costs nothing ----


def test_pad_token_reuses_an_unused_special_token_first():
    tokenizer = families.chatml_tokenizer(pad=False, reserved=2)
    n = len(tokenizer)
    assert models._pad_candidates(tokenizer)[0] == "<|reserved_special_token_0|>"
    # <|endoftext|> next to an <|im_end|> EOS qualifies when nothing better exists; turn markers never do
    assert models._pad_candidates(families.chatml_tokenizer(pad=False)) == ["<|endoftext|>"]
    assert len(tokenizer) == n


def test_a_tokenizer_without_a_spare_token_pads_with_unk_or_eos_and_keeps_its_size(tmp_path):
    tokenizer = families.bos_tokenizer()
    tokenizer.pad_token = None  # <s> and </s> are BOS and EOS; <pad> is left unused
    tokenizer.save_pretrained(tmp_path)
    loaded = models.load_tokenizer(str(tmp_path))
    assert loaded.pad_token == "<pad>"  # named as padding: reused
    gpt2_like = families.byte_level_tokenizer(["<|endoftext|>"])
    from transformers import PreTrainedTokenizerFast

    gpt2 = PreTrainedTokenizerFast(tokenizer_object=gpt2_like, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    gpt2.save_pretrained(tmp_path / "gpt2")
    loaded = models.load_tokenizer(str(tmp_path / "gpt2"))
    assert loaded.pad_token == "<|endoftext|>" and len(loaded) == len(gpt2)  # EOS pads: masks mark padding
    model = AutoModelForCausalLM.from_config(families.llama_config(gpt2))
    rows = model.get_input_embeddings().weight.shape[0]
    models.align_special_tokens(model, loaded)
    assert model.get_input_embeddings().weight.shape[0] == rows and model.config.pad_token_id == loaded.eos_token_id


def test_lora_adapter_of_a_padless_tokenizer_holds_no_embeddings_and_loads_on_the_base(tmp_path):
    base = families.save_causal_lm(families.chatml_tokenizer(pad=False, reserved=256), tmp_path / "padless")
    sft.main(
        sft_args(
            tmp_path,
            base,
            "sft.finetune=lora",
            "sft.lora.r=4",
            "sft.dataset.limit=64",
            "sft.eval_dataset.limit=8",
            "sft.trainer.num_train_epochs=1",
            "sft.trainer.max_length=128",
        )
    )
    out = tmp_path / "demo" / "sft"
    tokenizer = models.load_tokenizer(str(out))
    assert tokenizer.pad_token == "<|reserved_special_token_0|>" and len(tokenizer) == len(
        families.chatml_tokenizer(pad=False, reserved=256)
    )
    adapter = (out / "adapter" / "adapter_model.safetensors").stat().st_size  # the weights (+ tokenizer files)
    model = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    assert adapter < 0.1 * model
    # plain peft onto the original base
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out / "adapter")
