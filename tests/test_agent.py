"""Agents: tool calls read in the families' formats, multi-turn exchanges run with a scripted policy
(tools that answer, fail, hang or do not exist, malformed calls, the turn limit and the token budget),
the loss mask over the model's own tokens only, GAE across the tools' tokens, the exchange's log-probs
padded and unpadded, and a PPO stage run whose reward function gets messages and environments."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

import stages.eval
import stages.ppo
from pipeline.rl import unpadded
from pipeline.rl.agent import generate_exchanges
from pipeline.rl.algorithms import gae, token_rewards
from pipeline.rl.rollout import response_logprobs, sampling_config
from pipeline.rl.tools import Call, Toolbox, parse_reply, result_ids
from tests import layouts
from tests.conftest import assert_learned, launch, read_jsonl

TOOLS = ["tests.agent_tools:multiply", "tests.agent_tools:broken", "tests.agent_tools:hangs"]


def call_text(layout: str, name: str, arguments: dict) -> str:
    """A call as the family writes it."""
    if layout == "qwen25-instruct":
        return f"<tool_call>\n{json.dumps({'name': name, 'arguments': arguments})}\n</tool_call>"
    return json.dumps({"name": name, "parameters": arguments})


class Scripted(torch.nn.Module):
    """A policy whose replies are fixed: `script(context, turn)` gives the text of the model's turn
    (`turn`: the tool results it has read so far), encoded and ended with the stop token."""

    def __init__(self, tokenizer, script, result_marker: str):
        super().__init__()
        self.tokenizer, self.script, self.marker = tokenizer, script, result_marker
        self.generation_config = GenerationConfig()
        self.replies = []  # the ids of every turn generated, in order

    def generate(self, input_ids, attention_mask, generation_config, **kwargs):
        stop, pad = generation_config.eos_token_id[0], generation_config.pad_token_id
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            context = self.tokenizer.decode(ids[mask.bool()], skip_special_tokens=False)
            reply = self.tokenizer(self.script(context, context.count(self.marker)), add_special_tokens=False)
            rows.append((reply["input_ids"] + [stop])[: generation_config.max_new_tokens])
            self.replies.append(rows[-1])
        width = max(len(r) for r in rows)
        return torch.cat([input_ids, torch.tensor([r + [pad] * (width - len(r)) for r in rows])], 1)


MARKER = {"qwen25-instruct": "<tool_response>", "llama3-instruct": "<|start_header_id|>ipython"}


def exchange(
    layout,
    script,
    prompts=None,
    max_tool_turns=3,
    budget=1000,
    tools=TOOLS,
    timeout_s=0.5,
    environment=None,
    max_new_tokens=200,
):
    tok = layouts.tool_tokenizer(layout)
    tok.pad_token = tok.pad_token or "<|reserved_special_token_0|>"  # (a spare token, as models.load_tokenizer picks)
    policy = Scripted(tok, script, MARKER[layout])
    toolbox = Toolbox(tools, environment, None, timeout_s)
    prompts = prompts or [[{"role": "user", "content": "what is 12 times 7?"}]]
    config = sampling_config(1.0, max_new_tokens, [tok.eos_token_id], tok.pad_token_id)
    rollout = generate_exchanges(
        policy, tok, prompts, [{"prompt": p} for p in prompts], toolbox, config, "cpu", max_tool_turns, budget
    )
    return tok, policy, toolbox, rollout


def test_tool_calls_are_read_in_each_family_format():
    content, calls = parse_reply(
        'let me see\n<tool_call>\n{"name": "multiply", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
        '\n<tool_call>\n{"name": "lookup", "arguments": "{\\"q\\": \\"x\\"}"}\n</tool_call>'
    )
    assert content == "let me see" and [(c.name, c.arguments) for c in calls] == [
        ("multiply", {"a": 2, "b": 3}),
        ("lookup", {"q": "x"}),
    ]
    assert parse_reply('{"name": "multiply", "parameters": {"a": 2, "b": 3}}')[1][0].arguments == {"a": 2, "b": 3}
    assert parse_reply('<|python_tag|>{"name": "f", "parameters": {}}')[1][0].name == "f"
    assert parse_reply("the answer is 6") == ("the answer is 6", [])
    assert parse_reply('{"answer": 6}') == ('{"answer": 6}', [])  # JSON that is no call: an answer
    bad = parse_reply('<tool_call>\n{"name": "multiply", "arguments": {"a": 2,\n</tool_call>')[1][0]
    assert bad.name is None and "not valid JSON" in bad.malformed
    assert "string 'name'" in parse_reply('<tool_call>{"arguments": {}}</tool_call>')[1][0].malformed


@pytest.mark.parametrize("layout", ["qwen25-instruct", "llama3-instruct"])
def test_an_exchange_runs_the_tool_and_the_loss_mask_covers_exactly_the_model_s_tokens(layout):
    """The model calls multiply, reads 84 and answers: the exchange's messages are those, the tokens
    are the prompt, the model's call, the template's result block and the model's answer, and the mask
    is 1 on the model's tokens only (compared token by token), so the whole sequence renders as the
    chat template renders the conversation."""
    script = lambda context, turn: call_text(layout, "multiply", {"a": 12, "b": 7}) if turn == 0 else "84"  # noqa: E731
    tok, policy, toolbox, rollout = exchange(layout, script)
    agent = rollout.agent
    assert agent.exchanges[0] == [
        {"role": "assistant", "content": "", "tool_calls": [Call("multiply", {"a": 12, "b": 7}).message()]},
        {"role": "tool", "name": "multiply", "content": "84"},
        {"role": "assistant", "content": "84"},
    ]
    assert agent.stats[0] == {"turns": 2, "calls": 1, "errors": 0, "cut": None, "per_tool": {"multiply": 1}}
    assert bool(rollout.has_stop[0])
    tokens, model_mask = rollout.responses[0].tolist(), agent.model_mask[0].tolist()
    inserted = result_ids(tok, [agent.exchanges[0][1]], tok.eos_token)
    assert tokens == policy.replies[0] + inserted + policy.replies[1]
    assert model_mask == [1] * len(policy.replies[0]) + [0] * len(inserted) + [1] * len(policy.replies[1])
    assert rollout.response_mask[0].tolist() == [1] * len(tokens)  # the attention reads all of it
    prompt = [{"role": "user", "content": "what is 12 times 7?"}]
    rendered = tok.apply_chat_template(prompt + agent.exchanges[0], tools=toolbox.schemas, tokenize=False)
    whole = tok.decode(rollout.query_responses[0][rollout.attention_mask[0].bool()], skip_special_tokens=False)
    assert whole == rendered.removesuffix("\n")  # (Qwen writes a newline after the last turn's end)


def test_failing_hanging_unknown_and_malformed_calls_become_messages_to_the_model():
    layout = "qwen25-instruct"
    calls = [
        '<tool_call>\n{"name": "broken", "arguments": {"x": 1}}\n</tool_call>',
        '<tool_call>\n{"name": "hangs", "arguments": {"x": 1}}\n</tool_call>',
        '<tool_call>\n{"name": "search", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "multiply", "arguments": {"a": 1}}\n</tool_call>',
        '<tool_call>\n{"name": "multiply", "arguments": {"a": 1,\n</tool_call>',
    ]
    script = lambda context, turn: calls[turn] if turn < len(calls) else "done"  # noqa: E731
    _, _, _, rollout = exchange(layout, script, max_tool_turns=5)
    results = [m["content"] for m in rollout.agent.exchanges[0] if m["role"] == "tool"]
    assert results[0] == "error: ValueError: cannot handle 1"
    assert results[1].startswith("error: tool 'hangs' did not return within timeout_s = 0.5 s")
    assert results[2].startswith("error: there is no tool named 'search' (the tools are: broken, hangs, multiply)")
    assert results[3].startswith("error: ") and "'b'" in results[3]  # a missing argument
    assert results[4].startswith("error: the tool call is not valid JSON")
    stats = rollout.agent.stats[0]
    assert (stats["calls"], stats["errors"], stats["turns"], stats["cut"]) == (5, 5, 6, None)
    assert stats["per_tool"] == {"broken": 1, "hangs": 1, "(unknown)": 2, "multiply": 1}
    assert rollout.agent.exchanges[0][-1] == {"role": "assistant", "content": "done"}


def test_a_turn_s_async_calls_run_together_across_the_batch():
    """Three rollouts each call `meet`, which returns only once all three calls have started: run one
    after another, the first would wait past its deadline."""
    layout = "qwen25-instruct"
    call = '<tool_call>\n{"name": "meet", "arguments": {"group": "batch", "n": 3}}\n</tool_call>'
    script = lambda context, turn: call if turn == 0 else "met"  # noqa: E731
    prompts = [[{"role": "user", "content": f"meet {i}"}] for i in range(3)]
    _, _, _, rollout = exchange(layout, script, prompts=prompts, tools=["tests.agent_tools:meet"], timeout_s=5)
    assert [[m["content"] for m in e if m["role"] == "tool"] for e in rollout.agent.exchanges] == [["3"]] * 3


def test_a_rollout_s_calls_run_in_the_order_the_model_wrote_them():
    """Two async calls in one reply: the second sees what the first did (the first one is the slower)."""
    from tests import agent_tools

    agent_tools.LOG.clear()
    calls = [
        '<tool_call>\n{"name": "note", "arguments": {"entry": "first", "delay": 0.2}}\n</tool_call>',
        '<tool_call>\n{"name": "note", "arguments": {"entry": "second", "delay": 0}}\n</tool_call>',
    ]
    script = lambda context, turn: "\n".join(calls) if turn == 0 else "done"  # noqa: E731
    _, _, _, rollout = exchange("qwen25-instruct", script, tools=["tests.agent_tools:note"], timeout_s=5)
    assert [m["content"] for m in rollout.agent.exchanges[0] if m["role"] == "tool"] == ["first", "first,second"]


def test_the_turn_limit_and_the_budget_end_an_exchange():
    layout = "llama3-instruct"
    always = lambda context, turn: call_text(layout, "multiply", {"a": turn, "b": 2})  # noqa: E731
    _, _, _, rollout = exchange(layout, always, max_tool_turns=2)
    stats, messages = rollout.agent.stats[0], rollout.agent.exchanges[0]
    assert (stats["calls"], stats["turns"], stats["cut"]) == (2, 3, "turns")  # the third call is not run
    assert [m["role"] for m in messages] == ["assistant", "tool", "assistant", "tool", "assistant"]
    assert [m["content"] for m in messages if m["role"] == "tool"] == ["0", "2"]
    assert not bool(rollout.has_stop[0])  # it ends on a call whose result it never read: truncated
    # a budget too small for the first call's result: the exchange ends on the call, its result not shown
    tok, policy, _, cut = exchange(layout, always, max_tool_turns=4, budget=60)
    first = len(policy.replies[0])
    assert cut.agent.stats[0]["cut"] == "budget" and not bool(cut.has_stop[0])
    assert cut.responses.shape[1] == first <= 60 and [m["role"] for m in cut.agent.exchanges[0]] == ["assistant"]
    # one that fits the result and 5 tokens of the second turn: cut there, at the budget exactly
    inserted = len(result_ids(tok, [{"role": "tool", "name": "multiply", "content": "0"}], tok.eos_token))
    _, _, _, cut = exchange(layout, always, max_tool_turns=4, budget=first + inserted + 5)
    assert cut.agent.stats[0]["cut"] == "budget" and not bool(cut.has_stop[0])
    assert int(cut.response_mask[0].sum()) == first + inserted + 5 and int(cut.agent.model_mask[0].sum()) == first + 5
    agent = rollout.agent.metrics()
    assert agent["tools/calls_per_episode"] == 2 and agent["tools/cut_by_turns"] == 1.0
    assert agent["tools/calls/multiply"] == 2 and agent["tools/calls/broken"] == 0


def test_an_environment_per_rollout_is_reset_with_its_row_and_offers_its_methods():
    layout = "qwen25-instruct"
    call = '<tool_call>\n{"name": "increment", "arguments": {"by": 3}}\n</tool_call>'
    script = lambda context, turn: call if turn < 2 else "ok"  # noqa: E731
    prompts = [[{"role": "user", "content": "count"}], [{"role": "user", "content": "count again"}]]
    _, _, toolbox, rollout = exchange(
        layout, script, prompts=prompts, tools=["tests.agent_tools:multiply"], environment="tests.agent_tools:Counter"
    )
    assert toolbox.names == ["multiply", "increment"]
    envs = rollout.agent.environments
    assert envs[0] is not envs[1] and [e.count for e in envs] == [6, 6]  # each rollout its own
    assert rollout.prompts[0][-1]["content"] == "count (start at 0)"  # reset's return appended to the prompt
    assert [m["content"] for m in rollout.agent.exchanges[1] if m["role"] == "tool"] == ["3", "6"]


def test_gae_runs_over_the_model_s_tokens_as_if_the_tools_tokens_were_not_there():
    """Tokens 2-3 and 5 are a tool's: the advantages and returns of tokens 0, 1, 4 are GAE's on those
    three alone (token 1 bootstraps from token 4's value), and the inserted tokens get none."""
    values = torch.tensor([[0.5, 0.2, 9.0, 9.0, -0.3, 9.0]])
    mask = torch.tensor([[1.0, 1, 0, 0, 1, 0]])
    rewards = token_rewards(torch.tensor([2.0]), torch.tensor([[0.1, 0.2, 5.0, 5.0, 0.3, 5.0]]), mask, beta=0.5)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.1, 0.0, 0.0, 2.0 - 0.15, 0.0]]))  # score: last model token
    advantages, returns = gae(values, rewards, mask, gamma=0.9, lam=0.8)
    packed_adv, packed_ret = gae(values[:, [0, 1, 4]], rewards[:, [0, 1, 4]], torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert torch.allclose(advantages[:, [0, 1, 4]], packed_adv) and torch.allclose(returns[:, [0, 1, 4]], packed_ret)
    assert advantages[0, [2, 3, 5]].abs().sum() == 0 and returns[0, [2, 3, 5]].abs().sum() == 0
    # by hand: delta_4 = r_4 - V_4, delta_1 = r_1 + 0.9 V_4 - V_1, A_1 = delta_1 + 0.72 A_4
    a4 = 1.85 + 0.3
    assert advantages[0, 1].item() == pytest.approx(-0.1 + 0.9 * -0.3 - 0.2 + 0.72 * a4)


def test_an_exchange_s_log_probs_are_the_same_padded_and_unpadded(tmp_path):
    layout = "qwen25-instruct"
    path = layouts.save_model(layout, tmp_path / "policy")
    model = AutoModelForCausalLM.from_pretrained(path)
    script = lambda context, turn: call_text(layout, "multiply", {"a": 3, "b": 4}) if turn == 0 else "12"  # noqa: E731
    prompts = [[{"role": "user", "content": "3 times 4?"}], [{"role": "user", "content": "what is three times four?"}]]
    _, _, _, rollout = exchange(layout, script, prompts=prompts)
    padded = response_logprobs(model, rollout, 0.7, batch_size=2)
    assert unpadded.enable(model)
    packed = response_logprobs(model, rollout, 0.7, batch_size=2)
    assert torch.allclose(padded, packed, atol=1e-5) and rollout.agent.model_mask.sum() < rollout.response_mask.sum()


@pytest.mark.e2e
def test_the_rl_stage_runs_an_agent_and_its_reward_function_gets_messages_and_environments(tmp_path, monkeypatch):
    """A tiny model with a tool-calling template, GRPO with QLoRA (4-bit) over exchanges with a tool
    and an environment, its turns scripted (each exchange calls `increment` once, then answers):
    the reward function gets
    each exchange as messages and the rollouts' environments, reset with their rows; tool metrics are
    logged, the samples keep the exchanges, and eval runs the same exchanges."""
    import pipeline.rl.agent

    real_generate = pipeline.rl.agent.generate
    script = lambda context, turn: call_text("qwen25-instruct", "increment", {"by": 2}) if turn == 0 else "done"  # noqa: E731

    def scripted(model, tokenizer, prompts, config, device, ids=None):
        return real_generate(
            Scripted(tokenizer, script, MARKER["qwen25-instruct"]), tokenizer, prompts, config, device, ids
        )

    monkeypatch.setattr(pipeline.rl.agent, "generate", scripted)
    path = layouts.save_model("qwen25-instruct", tmp_path / "policy")
    tok = layouts.tool_tokenizer("qwen25-instruct")
    tok.save_pretrained(path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": [{"role": "user", "content": f"what is {a} times 3?"}], "a": a}) + "\n"
            for a in range(8)
        )
    )
    monkeypatch.setenv("AGENT_RECORD", str(tmp_path / "record.jsonl"))
    overrides = [
        "--recipe",
        "stages/recipes/demo-grpo.yaml",
        f"runs_dir={tmp_path}",
        f"ppo.model={path}",
        f"ppo.prompts={prompts}",
        "ppo.rewards=[{function: 'tests.agent_tools:record'}]",
        "ppo.judges=[]",
        "ppo.tools=[tests.agent_tools:multiply]",
        "ppo.environment=tests.agent_tools:Counter",
        "ppo.max_tool_turns=2",
        "ppo.max_new_tokens=64",
        "ppo.total_episodes=16",
        "ppo.batch_size=8",
        "ppo.mini_batch_size=8",
        "ppo.samples_per_prompt=2",
        "ppo.ppo_epochs=1",
        "ppo.finetune=qlora-4bit",
        "ppo.keep_best=false",
        f"eval.prompts={prompts}",
        "eval.max_new_tokens=64",
        "eval.batch_size=4",
        "judge=null",
    ]
    stages.ppo.main(overrides)
    records = read_jsonl(tmp_path / "record.jsonl")
    assert len(records) == 2 and all(len(r["completions"]) == 8 for r in records)
    assert all([m["role"] for m in c] == ["assistant", "tool", "assistant"] for r in records for c in r["completions"])
    assert records[0]["completions"][0][1] == {"role": "tool", "name": "increment", "content": "2"}
    assert records[0]["environments"] == ["Counter"] * 8 and {row["a"] for row in records[0]["rows"]} <= set(range(8))
    history = read_jsonl(tmp_path / "demo-grpo" / "ppo" / "metrics.jsonl")
    assert len(history) == 2 and history[0]["tools/calls_per_episode"] == history[0]["tools/calls/increment"] == 1.0
    assert history[0]["tools/error_share"] == 0.0 and history[0]["first_minibatch"]["ratio"] == pytest.approx(1.0)
    samples = read_jsonl(tmp_path / "demo-grpo" / "ppo" / "samples.jsonl")
    assert [m["role"] for m in samples[0]["exchange"]] == ["assistant", "tool", "assistant"]

    stages.eval.main(overrides)  # the same exchanges on the eval prompts, tool use next to the scores
    metrics = json.loads((tmp_path / "demo-grpo" / "eval" / "metrics.json").read_text())
    for policy in ("start", "ppo"):
        assert metrics[policy]["sampled"]["tool_use"] == metrics[policy]["sampled"]["tool_calls"] == 1.0
    assert "tool_use" in (tmp_path / "demo-grpo" / "eval" / "report.md").read_text()


def test_tools_need_a_template_that_renders_them(tmp_path):
    path = layouts.save_model("qwen25-instruct", tmp_path / "policy")  # the plain ChatML template
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(Exception, match="chat template does not render tools"):
        stages.ppo.main(
            [
                "--recipe",
                "stages/recipes/demo-grpo.yaml",
                f"runs_dir={tmp_path}",
                f"ppo.model={path}",
                f"ppo.prompts={prompts}",
                "ppo.rewards=[{function: 'tests.agent_tools:record'}]",
                "ppo.judges=[]",
                "ppo.tools=[tests.agent_tools:multiply]",
            ]
        )


AGENT_RECIPE = ["--recipe", "stages/recipes/demo-agent.yaml"]


@pytest.fixture(scope="module")
def agent_sft(tmp_path_factory):
    """The agent demo's base and SFT policy (stages/recipes/demo-agent.yaml): `runs/demo-agent/sft` under
    the returned directory, and the overrides that find the base."""
    from stages import base, sft

    root = tmp_path_factory.mktemp("agent")
    common = [f"base.output={root / 'base'}", f"sft.model={root / 'base'}"]
    base.main([*AGENT_RECIPE, *common])
    sft.main([*AGENT_RECIPE, *common, f"runs_dir={root / 'runs'}"])
    return root / "runs" / "demo-agent" / "sft", common


def test_the_agent_demo_learns_to_call_the_tool_and_answers_better(agent_sft, tmp_path):
    """stages/recipes/demo-agent.yaml from its own base: GRPO raises the share of exchanges that call the
    tool, and the share answered right, over an lr = 1e-12 control from the same SFT policy."""
    sft_dir, common = agent_sft
    histories = []
    for runs, extra in (("runs", []), ("control", ["ppo.learning_rate=1e-12"])):
        shutil.copytree(sft_dir, tmp_path / runs / "demo-agent" / "sft")
        stages.ppo.main([*AGENT_RECIPE, *common, f"runs_dir={tmp_path / runs}", "ppo.total_episodes=512", *extra])
        histories.append(read_jsonl(tmp_path / runs / "demo-agent" / "ppo" / "metrics.jsonl"))
    assert_learned(*histories, margin=0.3, key="tools/used_share", last=3)
    assert_learned(*histories, margin=0.2, key="rewards/correct", last=3)


@pytest.mark.e2e
@pytest.mark.parametrize("engine, finetune, lr", [("zero3", "lora", "1e-2"), ("fsdp2", "full", "1e-3")])
def test_an_agent_runs_on_two_sharded_processes_and_resumes_mid_run(
    engine, finetune, lr, agent_sft, tmp_path, monkeypatch
):
    """The agent demo's policy under a sharding engine on 2 gloo processes (ZeRO-3 with a LoRA adapter,
    FSDP2 with every weight trained), stopped after iteration 1 (as by Ctrl-C) and resumed. Each rank
    runs its own exchanges, their turns differing (the weights are whole while generating: no collective
    waits on another rank's turn); the tool fails for half the films, and the logged error share is that
    of both processes' calls together. The artifact (an adapter's merged) loads and differs from SFT."""
    sft_dir, common = agent_sft
    shutil.copytree(sft_dir, tmp_path / "demo-agent" / "sft")
    monkeypatch.setenv("AGENT_RECORD", str(tmp_path / "record.jsonl"))
    args = [
        *AGENT_RECIPE,
        *common,
        f"runs_dir={tmp_path}",
        f"ppo.finetune={finetune}",
        f"ppo.learning_rate={lr}",
        "ppo.total_episodes=64",
        "ppo.batch_size=16",
        "ppo.mini_batch_size=8",
        "ppo.max_exchange_tokens=200",
        "ppo.tools=[tests.agent_tools:stars]",
        "ppo.rewards=[{function: 'tests.agent_tools:record'}]",
    ]
    launch(2, "stages/ppo.py", *args, engine=engine, expect=130, probe=("--stop-after", "1"))
    resumed = launch(2, "stages/ppo.py", *args, engine=engine)
    assert "resuming from the checkpoint at iteration 1/2" in resumed.stdout
    out = tmp_path / "demo-agent" / "ppo"
    history = read_jsonl(out / "metrics.jsonl")
    assert [h["iteration"] for h in history] == [1, 2]
    records = read_jsonl(tmp_path / "record.jsonl")  # each rank's reward calls in order: iteration 1, then 2
    by_rank = [[r["completions"] for r in records if r["rank"] == rank] for rank in (0, 1)]
    assert [len(b) for b in by_rank] == [2, 2] and all(len(c) == 16 for b in by_rank for c in b)
    for iteration, logged in enumerate(history):
        results = [m["content"] for rank in (0, 1) for c in by_rank[rank][iteration] for m in c if m["role"] == "tool"]
        errors = sum(r.startswith("error:") for r in results)
        assert 0 < errors < len(results) and logged["tools/cut_by_budget"] == 0
        assert logged["tools/calls_per_episode"] == pytest.approx(len(results) / 32)
        assert logged["tools/error_share"] == pytest.approx(errors / len(results))
    assert any(m["role"] == "tool" for s in read_jsonl(out / "samples.jsonl") for m in s["exchange"])
    trained, start = (AutoModelForCausalLM.from_pretrained(d).state_dict() for d in (out, sft_dir))
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in trained)


def test_tools_take_reward_functions_and_a_bad_environment_is_one_line():
    from pipeline.errors import RewardError
    from pipeline.recipe_loader import load_recipe

    with pytest.raises(Exception, match="with tools, rewards and judges must be reward functions"):
        load_recipe("stages/recipes/demo.yaml", ["ppo.tools=[tests.agent_tools:multiply]"])  # (its reward model)
    toolbox = Toolbox([], "tests.agent_tools:NoRow", None, 1.0)
    with pytest.raises(RewardError, match=r"environment 'NoRow': creating it or reset\(\*\*row\) raised TypeError"):
        toolbox.start({"prompt": "p"})
