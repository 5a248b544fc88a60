"""Right on real models: the special-token layouts of hub tokenizers (tests/layouts.py) through the
parts of the pipeline that depend on them: where a response stops, the prompt ids it is generated
from, the pad token, reward models without one, and SFT -> PPO -> eval on a base whose EOS is not
the token that ends a chat turn."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from safetensors import safe_open
from tokenizers import pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2ForSequenceClassification,
)
from trl import SFTConfig, SFTTrainer

from pipeline import models
from pipeline.rl.algorithms import gae, truncate_after_stop
from pipeline.rl.rollout import generate, prompt_ids, sampling_config
from pipeline.scoring import RewardScorer, load_reward_model, reward_input_ids
from stages import eval as evaluate
from stages import ppo, rm, sft
from tests import families, layouts
from tests.conftest import DEMO_RECIPE, read_jsonl

CONVERSATION = {
    "prompt": [{"role": "user", "content": "review the film star quest ."}],
    "completion": [{"role": "assistant", "content": "the music was really wonderful ."}],
}
PLAIN = {"prompt": "review the film star quest .", "completion": " the music was really wonderful ."}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every layout saved as a tiny model, like a hub checkpoint."""
    root = tmp_path_factory.mktemp("layouts")
    return {name: layouts.save_model(name, root / name) for name in layouts.LAYOUTS}


# ---- where a response stops ----


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_the_stop_is_where_the_assistant_turn_ends(layout, saved):
    tokenizer = models.load_tokenizer(str(saved[layout]))
    ids = models.stop_token_ids(tokenizer, models.generation_config(saved[layout]))
    names = tokenizer.convert_ids_to_tokens(ids)
    assert models.turn_end_token(tokenizer) == layouts.TURN_END.get(layout)
    # the template's turn end first, then EOS, then what the generation config lists
    expected = [layouts.TURN_END[layout]] if layout in layouts.TURN_END else []
    expected += [t for t in [tokenizer.eos_token, *layouts.GENERATION_EOS.get(layout, [])] if t not in expected]
    assert names == list(dict.fromkeys(expected))
    # a recipe's ppo.stop_token (one or several) replaces them; an unknown one is refused
    assert models.stop_token_ids(tokenizer, None, tokenizer.eos_token) == [tokenizer.eos_token_id]
    with pytest.raises(models.ConfigError, match="not in the policy's vocabulary"):
        models.stop_token_ids(tokenizer, None, ["<|no_such_token|>"])


@pytest.mark.e2e
@pytest.mark.parametrize("layout", ["qwen25-base", "llama3-base"])
def test_a_base_whose_eos_does_not_end_a_turn_stops_at_the_turn_end_in_ppo_and_eval(layout, tmp_path):
    """Qwen2.5 / Llama 3 base SFT-trained on conversations: the template closes turns with <|im_end|> /
    <|eot_id|>, the tokenizer's EOS is <|endoftext|> / <|end_of_text|>. Old code: PPO and eval stopped
    at EOS only, so every response ran to max_new_tokens (stop share 0)."""
    model = layouts.save_model(layout, tmp_path / layout)
    args = [
        "--recipe",
        DEMO_RECIPE,
        f"runs_dir={tmp_path / 'runs'}",
        f"sft.model={model}",
        "judge=null",
        "sft.dataset.limit=1000",
        "sft.eval_dataset.limit=32",
        "sft.trainer.num_train_epochs=3",
        "sft.trainer.learning_rate=2e-3",
        "sft.trainer.per_device_train_batch_size=16",
        "rm.dataset.limit=256",
        "rm.eval_dataset.limit=32",
        "rm.reference_limit=16",
        "rm.trainer.num_train_epochs=1",
        "ppo.total_episodes=64",
        "ppo.batch_size=32",
        "ppo.mini_batch_size=16",
        "ppo.ppo_epochs=1",
        "ppo.max_new_tokens=48",
        "eval.prompts.limit=32",
        "eval.max_new_tokens=48",
    ]
    for stage in (sft, rm, ppo, evaluate):
        stage.main(args)
    run = tmp_path / "runs" / "demo"
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    for policy in ("sft", "ppo"):
        assert metrics[policy]["sampled"]["stop_token_share"] >= 0.9, (policy, metrics[policy]["sampled"])
    history = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert min(h["val/num_eos_tokens"] for h in history) >= 0.9 * 32
    assert max(h["response_length"] for h in history) < 40
    # the SFT artifact names the turn end as its EOS, first in the generation config's list
    turn_end = layouts.TURN_END[layout]
    saved_tokenizer = AutoTokenizer.from_pretrained(run / "sft")
    assert saved_tokenizer.eos_token == turn_end
    eos_ids = json.loads((run / "sft" / "generation_config.json").read_text())["eos_token_id"]
    assert eos_ids[0] == saved_tokenizer.convert_tokens_to_ids(turn_end)
    # the samples end at the turn: no invented further turns in the text the reward model read
    for row in read_jsonl(run / "ppo" / "samples.jsonl"):
        assert "user" not in row["response"].split()


# ---- the prompt a policy is generated from ----


@pytest.mark.parametrize(
    "layout, row",
    [
        (layout, row)
        for layout in layouts.LAYOUTS
        for row in (PLAIN, CONVERSATION)
        if row is PLAIN or layout in layouts.TURN_END
    ],
)
def test_generation_starts_from_the_prefix_sft_trained_on(layout, row, saved, tmp_path):
    """The ids PPO and eval generate from are the start of SFT's training ids for the same example
    (trl's SFTTrainer tokenization), for every layout and data format. Old code: plain-text prompts
    lost the BOS Llama 3, Mistral and Gemma tokenizers prepend."""
    tokenizer = models.load_tokenizer(str(saved[layout]))
    model = AutoModelForCausalLM.from_pretrained(saved[layout])
    trainer = SFTTrainer(
        model=model,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list([row]),
        args=SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True),
    )
    example = trainer.train_dataset[0]
    prompt_len = next(i for i, label in enumerate(example["labels"]) if label != -100)  # the completion's start
    trained_prefix = example["input_ids"][:prompt_len]

    tokenizer.padding_side = "left"
    config = sampling_config(1.0, 2, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    other = [{"role": "user", "content": "a"}] if isinstance(row["prompt"], list) else "a"
    rollout = generate(model, tokenizer, [row["prompt"], other], config, "cpu")
    context = rollout.query_responses.shape[1] - rollout.responses.shape[1]
    real = rollout.attention_mask[0, :context].bool()
    assert rollout.query_responses[0, :context][real].tolist() == trained_prefix
    if tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id:  # BOS-prepending tokenizers, plain text too
        assert trained_prefix[0] == tokenizer.bos_token_id


# ---- the pad token ----

PAD = {
    "qwen25-base": "<|endoftext|>",
    "qwen25-instruct": "<|endoftext|>",
    "llama3-base": "<|reserved_special_token_0|>",
    "llama3-instruct": "<|reserved_special_token_0|>",
    "mistral-v01": "<unk>",
    "smollm2": "<|im_end|>",
    "gemma": "<pad>",
    "gpt2": "<|endoftext|>",
}


def test_each_prompt_is_rendered_and_tokenized_once_per_run(monkeypatch):
    """PPO draws a prompt once per epoch (a group estimator k times in a row): its ids are computed the
    first time and kept, equal to `prompt_ids`."""
    import pipeline.rl.rollout as rollout

    tok = layouts.tokenizer("llama3-instruct")
    prompts = [CONVERSATION["prompt"], [{"role": "user", "content": "review last train ."}], PLAIN["prompt"]]
    calls = []
    monkeypatch.setattr(rollout, "prompt_ids", lambda t, p: calls.append(p) or prompt_ids(t, p))
    cache = rollout.PromptIds(tok, prompts)
    for indices in ([0, 0, 2, 2], [1, 2, 0], [2, 1, 1]):
        assert cache(indices) == [prompt_ids(tok, prompts[i]) for i in indices]
    assert len(calls) == 3


@pytest.mark.parametrize("layout", layouts.LAYOUTS)
def test_no_layout_gets_a_new_token(layout, saved):
    tokenizer = models.load_tokenizer(str(saved[layout]))
    assert len(tokenizer) == len(layouts.tokenizer(layout))
    assert tokenizer.pad_token == PAD[layout]


def test_pad_equal_to_the_stop_token_changes_no_rollout_score_or_advantage(saved):
    """SmolLM2: pad == EOS == <|im_end|>. The same model generating with that tokenizer and with one
    whose pad is a spare token gives the same responses, masks, stop flags, scores and GAE: a response
    that ends with the stop token keeps it, and the padding after it is masked."""
    path = saved["smollm2"]
    same = models.load_tokenizer(str(path), padding_side="left")
    spare = models.load_tokenizer(str(path), padding_side="left")
    spare.pad_token = "<file_sep>"
    assert same.pad_token_id == same.eos_token_id != spare.pad_token_id
    model = AutoModelForCausalLM.from_pretrained(path)
    prompts = [[{"role": "user", "content": p}] for p in ("review star quest .", "how was the plot ?")] * 8
    rollouts = []
    for tokenizer in (same, spare):
        stop = models.stop_token_ids(tokenizer, models.generation_config(path))
        torch.manual_seed(0)
        rollouts.append(
            generate(model, tokenizer, prompts, sampling_config(1.0, 40, stop, tokenizer.pad_token_id), "cpu")
        )
    a, b = rollouts
    assert a.has_stop.any() and not a.has_stop.all()  # both kinds of response occur
    assert torch.equal(a.response_mask, b.response_mask) and torch.equal(a.has_stop, b.has_stop)
    mask = a.response_mask.bool()
    assert torch.equal(a.responses[mask], b.responses[mask]) and a.texts == b.texts
    last = a.response_mask.sum(1) - 1
    ended = a.responses[torch.arange(len(a)), last]
    assert (ended[a.has_stop] == same.eos_token_id).all()  # the stop token is kept, inside the mask
    # the same left-padded prompts under both pad ids, by mask
    assert torch.equal(a.attention_mask, b.attention_mask)
    # the reward model reads the same texts (ChatML's turn ends in "\n", so pooling sees no pad either way)
    classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1).eval()
    scores = []
    for tokenizer in (same, spare):
        classifier.config.pad_token_id = tokenizer.pad_token_id
        scores.append(RewardScorer(classifier, tokenizer, batch_size=8)(prompts, a.texts))
    assert torch.allclose(scores[0], scores[1], atol=1e-6)
    torch.manual_seed(1)
    values, rewards = torch.randn(a.responses.shape), torch.randn(a.responses.shape)
    for x, y in zip(
        gae(values, rewards, a.response_mask.float(), 1.0, 0.95),
        gae(values, rewards, b.response_mask.float(), 1.0, 0.95),
    ):
        assert torch.equal(x, y)


TRIMMING_LLAMA3 = layouts.LLAMA3.replace("m['content']", "(m['content'] | trim)")  # the hub template trims
TEXT_CLOSING = layouts.CHATML.replace("'<|im_end|>'", "'\\n<|im_end|>'")  # a turn closed by text, then a token


class CapturingScorer(RewardScorer):
    """A reward scorer that records the ids it is given instead of running a model."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, []

    def score_ids(self, ids):
        self.seen += ids
        return torch.zeros(len(ids))


@pytest.mark.parametrize("layout", [*layouts.TURN_END, "llama3-hub-template", "qwen25-text-closing"])
def test_a_reward_model_with_the_policys_tokenizer_reads_the_rollouts_ids_as_rendered(layout, monkeypatch):
    """The reward input is built from the rollout's ids (prompt ids, the response up to its stop, the
    template's closing) and is the rendering of its decoded text, token for token: for responses that
    stop, that run out of tokens, that have whitespace at the ends, that are empty or only whitespace,
    after a system turn, and under a template that trims the content (rendered from text); a response
    with a special token inside (decoding drops it), whose text tokenizes otherwise (sampled in pieces)
    or whose leading newlines join the generation prompt's (Qwen's pre-tokenizer) is rendered."""
    import pipeline.rl.rewards as rewards_module
    import pipeline.scoring as scoring_module

    base = {"llama3-hub-template": "llama3-instruct", "qwen25-text-closing": "qwen25-instruct"}.get(layout, layout)
    tok = layouts.tokenizer(base)
    tok.chat_template = {"llama3-hub-template": TRIMMING_LLAMA3, "qwen25-text-closing": TEXT_CLOSING}.get(
        layout, tok.chat_template
    )
    stop = tok.convert_tokens_to_ids(layouts.TURN_END[base])
    inner = tok.all_special_ids[-1] if tok.all_special_ids[-1] != stop else tok.all_special_ids[0]
    prompts = [
        [{"role": "user", "content": "review the film star quest ."}],
        [{"role": "system", "content": "be brief ."}, {"role": "user", "content": "how was the music ?"}],
        [{"role": "user", "content": "review last train ."}],
        [{"role": "user", "content": "review iron garden ."}],
        [{"role": "user", "content": "how was the music ?"}],
    ] * 2
    bodies = [
        tok.encode(t, add_special_tokens=False)
        for t in (
            "the music was really wonderful .",
            " short,\n and sweet \n",
            "it ran out of",
            "a twist",
            "\n\nthe end .",
            "\n",
        )
    ]
    in_pieces = tok.convert_tokens_to_ids(list("wonderful"))  # a word sampled a byte at a time
    assert in_pieces != tok.encode("wonderful", add_special_tokens=False)
    rows = [
        bodies[0] + [stop],
        bodies[1] + [stop],
        bodies[2],
        bodies[3] + [inner] + bodies[3] + [stop],
        in_pieces + [stop],
        bodies[4] + [stop],
        bodies[5] + [stop],
        [stop],
        bodies[0] + [stop],
        bodies[2],
    ]
    width, pad = max(map(len, rows)), tok.pad_token_id if tok.pad_token_id is not None else stop
    responses = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    texts = tok.batch_decode(responses, skip_special_tokens=True)
    rendered = [reward_input_ids(tok, p, t) for p, t in zip(prompts, texts)]

    calls = []
    for module in (rewards_module, scoring_module):  # rendered from text: by the reward model, or by its scorer
        monkeypatch.setattr(module, "reward_input_ids", lambda *a: calls.append(a) or reward_input_ids(*a))
    reward = rewards_module.ModelReward(CapturingScorer(tok), "rm")
    reward.reads_policy_ids()
    reward(prompts, texts, None, {}, ([prompt_ids(tok, p) for p in prompts], responses, mask))
    assert reward.scorer.seen == rendered
    # else only the row with a special token inside, the one sampled in pieces and the empty one are
    # rendered from text; under Qwen's pre-tokenizer also the two whose newlines join the generation
    # prompt's "\n", and with a closing that begins with "\n" the one that ends in a newline
    expected = {"llama3-hub-template": len(rows), "qwen25-base": 5, "qwen25-instruct": 5, "qwen25-text-closing": 6}
    assert len(calls) == expected.get(layout, 3)


def test_a_reward_model_reads_the_policys_ids_only_where_it_renders_as_the_policy():
    """Same vocabulary and template are not enough: a template that writes the EOS renders another
    EOS, and another pre-tokenizer splits the same text otherwise. A different pad token changes no
    rendering."""
    from pipeline.rl.run_setup import same_tokenizer

    assert same_tokenizer(families.bos_tokenizer(), families.bos_tokenizer())
    other_eos = families.bos_tokenizer()  # its template ends each turn with eos_token
    other_eos.eos_token = "<pad>"
    assert not same_tokenizer(families.bos_tokenizer(), other_eos)
    qwen, spare_pad = layouts.tokenizer("qwen25-base"), layouts.tokenizer("qwen25-base")
    spare_pad.pad_token = "<|fim_pad|>"
    assert same_tokenizer(qwen, spare_pad)
    gpt2_split = layouts.tokenizer("qwen25-base")
    gpt2_split.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert gpt2_split.get_vocab() == qwen.get_vocab() and gpt2_split.chat_template == qwen.chat_template
    assert not same_tokenizer(qwen, gpt2_split)


def test_a_reward_model_reads_the_eos_its_texts_end_with(saved, tmp_path):
    """transformers' classifiers pool at the last token that is not the pad token. A reward model to
    be trained on a pad == EOS layout (Qwen2.5 base) pads with a spare token, so the EOS that plain
    pairs end with is read; a trained classifier keeps the pad its config names (where it learned to
    pool), whatever its tokenizer says."""
    tokenizer = models.load_tokenizer(str(saved["qwen25-base"]), reward=True)
    assert tokenizer.pad_token != tokenizer.eos_token and len(tokenizer) == len(layouts.tokenizer("qwen25-base"))
    classifier = AutoModelForSequenceClassification.from_pretrained(saved["qwen25-base"], num_labels=1).eval()
    models.align_special_tokens(classifier, tokenizer)
    prompt, response = "review star quest .", " it was good ."
    ids = reward_input_ids(tokenizer, prompt, response)
    assert ids[-1] == tokenizer.eos_token_id
    with torch.no_grad():
        hidden = classifier.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        at_eos, before = classifier.score(hidden[-1]).item(), classifier.score(hidden[-2]).item()
        score = RewardScorer(classifier, tokenizer)([prompt, "a"], [response, " b"])[0].item()
    assert score == pytest.approx(at_eos, abs=1e-5) and score != pytest.approx(before, abs=1e-5)
    classifier.config.pad_token_id = tokenizer.convert_tokens_to_ids("<|fim_pad|>")  # not the first spare
    classifier.save_pretrained(tmp_path / "rm")
    layouts.tokenizer("qwen25-base").save_pretrained(tmp_path / "rm")  # its tokenizer pads with EOS
    _, loaded = load_reward_model(tmp_path / "rm", torch.float32)
    assert loaded.pad_token == "<|fim_pad|>"


def test_the_tokenizer_may_have_a_few_entries_past_the_embeddings(saved):
    """Gemma 3 lists one token more than its embedding rows; another model's tokenizer is refused."""
    tokenizer = models.load_tokenizer(str(saved["gemma"]))
    small = AutoModelForCausalLM.from_config(
        layouts.LlamaConfig(
            vocab_size=len(tokenizer) - 1,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    models.align_special_tokens(small, tokenizer)
    tiny = AutoModelForCausalLM.from_config(
        layouts.LlamaConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(models.ConfigError, match="does not belong to this model"):
        models.align_special_tokens(tiny, tokenizer)


def test_a_tokenizer_that_appends_eos_still_generates_from_the_prompt_alone(tmp_path):
    """Tokenizers set to append EOS (`add_eos_token`) end plain text with it; the prompt must not."""
    from tokenizers import processors

    tok = layouts.tokenizer("mistral-v01")
    backend = tok.backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", tok.bos_token_id), ("</s>", tok.eos_token_id)]
    )
    assert tok("review")["input_ids"][-1] == tok.eos_token_id
    ids = prompt_ids(tok, "review star quest .")
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id


def test_truncation_when_the_pad_is_a_stop_token():
    stop, pad = [7, 9], 7
    responses = torch.tensor([[3, 4, 7, 7, 7], [3, 9, 5, 7, 2], [3, 4, 5, 6, 2]])
    out, mask, has_stop = truncate_after_stop(responses, stop, pad)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert has_stop.tolist() == [True, True, False]
    assert out.tolist() == [[3, 4, 7, 7, 7], [3, 9, 7, 7, 7], [3, 4, 5, 6, 2]]


@pytest.mark.parametrize("layout", ["smollm2", "mistral-v01"])
def test_lora_adapters_hold_lora_weights_only_and_load_onto_the_hub_model(layout, saved, tmp_path):
    """SmolLM2 (pad == EOS) and Mistral v0.1 (<unk> <s> </s> only; plain prompt-completion text):
    no token is added, so the SFT and PPO adapters carry no embedding or LM-head copy and load onto
    the original model with plain peft. Old code: both got <|pad|> and adapters with the embeddings."""
    data = {}
    if layout == "mistral-v01":  # a base model without a chat template: plain text, as trl-lib/tldr
        data = families.plain_demo_data(
            tmp_path,
            {"sft.dataset": 256, "sft.eval_dataset": 32, "rm.dataset": 256, "rm.eval_dataset": 32, "ppo.prompts": 64},
        )
    args = [
        "--recipe",
        DEMO_RECIPE,
        f"runs_dir={tmp_path / 'runs'}",
        f"sft.model={saved[layout]}",
        "judge=null",
        *[f"{k}={v}" for k, v in data.items()],
        "sft.finetune=lora",
        "ppo.finetune=lora",
        "sft.dataset.limit=256",
        "sft.eval_dataset.limit=32",
        "rm.dataset.limit=256",
        "rm.eval_dataset.limit=32",
        "rm.reference_limit=16",
        "sft.trainer.num_train_epochs=1",
        "rm.trainer.num_train_epochs=1",
        "sft.trainer.learning_rate=3e-3",
        "ppo.total_episodes=64",
        "ppo.batch_size=32",
        "ppo.mini_batch_size=16",
        "ppo.ppo_epochs=1",
        "ppo.max_new_tokens=16",
        "ppo.learning_rate=1e-3",
    ]
    for stage in (sft, rm, ppo):
        stage.main(args)
    run = tmp_path / "runs" / "demo"
    for adapter, base in ((run / "sft" / "adapter", saved[layout]), (run / "ppo" / "adapter", run / "sft")):
        keys = list(safe_open(adapter / "adapter_model.safetensors", "pt").keys())
        assert keys and all("lora_" in k for k in keys), [k for k in keys if "lora_" not in k]
        assert len(AutoTokenizer.from_pretrained(run / "sft")) == len(layouts.tokenizer(layout))
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)  # plain peft
    history = read_jsonl(run / "ppo" / "metrics.jsonl")
    assert history[0]["first_minibatch"]["ratio"] == pytest.approx(1.0, abs=1e-5)
    with safe_open(run / "ppo" / "adapter" / "adapter_model.safetensors", "pt") as f:  # PPO trained the adapter
        assert any(f.get_tensor(k).abs().sum() > 0 for k in f.keys() if "lora_B" in k)


# ---- reward models without a pad token ----


def gpt2_reward_model(path, layout: str = "gpt2"):
    """A GPT-2 sequence classifier as the hub has them: no pad token, `pad_token_id: null`."""
    tokenizer = layouts.tokenizer(layout)
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256, num_labels=1)
    )
    assert model.config.pad_token_id is None and tokenizer.pad_token is None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_reward_model_without_a_pad_token_scores_batches(tmp_path):
    """Old code: `tokenizer.pad` raised for want of a pad token, and pooling with `pad_token_id: null`
    fails on any batch of two ("Cannot handle batch sizes > 1")."""
    path = gpt2_reward_model(tmp_path / "rm")
    model, tokenizer = load_reward_model(path, torch.float32)
    scorer = RewardScorer(model, tokenizer, batch_size=4)
    prompts, responses = (
        ["review star quest .", "how was it ?", "a"],
        [" it was good .", " bad", " the music was fine ."],
    )
    together = scorer(prompts, responses)
    alone = torch.cat([scorer([p], [r]) for p, r in zip(prompts, responses)])
    assert torch.allclose(together, alone, atol=1e-5)  # padding changes no score
    assert len(tokenizer) == len(layouts.tokenizer("gpt2"))  # never resized


@pytest.mark.e2e
def test_a_padless_reward_model_as_ppo_reward_model_and_as_rm_model(base_model, tmp_path):
    """A GPT-2 classifier (no pad token, no chat template) on plain-text data, as the RL stage's
    `ppo.reward_model` and as the RM stage's `rm.model`. Old code: PPO crashed in `tokenizer.pad`."""
    external = gpt2_reward_model(tmp_path / "gpt2-rm")
    data = families.plain_demo_data(
        tmp_path,
        {
            "sft.dataset": 256,
            "sft.eval_dataset": 32,
            "rm.dataset": 600,
            "rm.eval_dataset": 100,
            "ppo.prompts": 64,
            "eval.prompts": 16,
        },
    )
    common = [
        "--recipe",
        DEMO_RECIPE,
        f"runs_dir={tmp_path / 'runs'}",
        f"sft.model={base_model}",
        "judge=null",
        *[f"{k}={v}" for k, v in data.items()],
        "sft.trainer.num_train_epochs=1",
        "ppo.total_episodes=64",
        "ppo.batch_size=32",
        "ppo.mini_batch_size=16",
        "ppo.max_new_tokens=12",
        "ppo.value_model=sft",
        "eval.max_new_tokens=8",
    ]
    sft.main(common)
    # as ppo.reward_model: PPO optimises it, eval scores with it
    ppo.main([*common, f"ppo.reward_model={external}"])
    evaluate.main([*common, f"ppo.reward_model={external}"])
    run = tmp_path / "runs" / "demo"
    assert "rm_score" in json.loads((run / "eval" / "metrics.json").read_text())["ppo"]["sampled"]
    # as rm.model: the RM stage trains it and it learns
    rm.main(
        [
            *common,
            f"rm.model={external}",
            f"rm.reference_dataset={data['rm.eval_dataset']}",
            "rm.trainer.num_train_epochs=3",
            "rm.trainer.learning_rate=1e-3",
            "rm.reference_limit=16",
        ]
    )
    assert AutoTokenizer.from_pretrained(run / "rm").pad_token == "<|endoftext|>"
    assert json.loads((run / "rm" / "config.json").read_text())["pad_token_id"] is not None
    assert json.loads((run / "rm" / "manifest.json").read_text())["metrics"]["heldout"]["accuracy"] > 0.55


def test_a_reward_model_without_a_chat_template_refuses_conversations(tmp_path):
    model, tokenizer = load_reward_model(gpt2_reward_model(tmp_path / "rm"), torch.float32)
    with pytest.raises(models.ConfigError, match="has no chat template, so it cannot read conversations"):
        RewardScorer(model, tokenizer)([[{"role": "user", "content": "hi"}]], ["hello"])
