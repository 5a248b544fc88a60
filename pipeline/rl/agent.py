"""Multi-turn rollouts: the policy answers, calls tools, reads their results and goes on, until it
answers without a call, after `max_tool_turns` turns of calls, or when the exchange's token budget is
spent. An exchange that ends on a call whose result it never read (the turn limit, the budget) counts
as truncated (`has_stop` False), as one cut by the length limit does.

    exchange = prompt (rendered with the tools' schemas)
             + model turn (its own tokens, up to and including its stop token)
             + tool results (the template's tokens for the tool messages and the next assistant header)
             + model turn + ... + the final model turn

The exchange after the prompt is the rollout's response: the attention reads all of it, while the loss,
the KL and the advantages are over the model's own tokens only (`Agent.model_mask`). The model's tokens
are kept as sampled and the inserted ones appended as token ids, so the log-probs of the update are
those of the sequence the model saw. Rollouts are batched: each turn generates for the rollouts still
going, together, then runs their calls (each rollout's in order, the turns of async tools concurrently:
pipeline/rl/tools.py); those that are done wait.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from pipeline import data
from pipeline.errors import ConfigError
from pipeline.recipe import PPOStage
from pipeline.rl.rollout import Rollout, generate
from pipeline.rl.tools import Toolbox, check_template, parse_reply, result_ids
from pipeline.user_code import one_line


@dataclass
class Agent:
    """What a multi-turn rollout adds to a `Rollout`, row by row."""

    model_mask: torch.Tensor
    """(B, R) 1 on the model's own tokens (the loss's), 0 on inserted ones and on padding."""
    exchanges: list[list[dict]]
    """Each rollout's messages after the prompt: assistant turns (with `tool_calls`), tool results."""
    environments: list
    """Each rollout's environment instance (None without `ppo.environment`)."""
    stats: list[dict]
    """Per rollout: turns, calls, errors, calls per tool, and why it ended unfinished (`cut`: 'budget',
    'turns', 'length' (a turn reached max_new_tokens), 'template' (its results could not be rendered); None:
    it answered)."""
    tools: list[str]
    """The tools' names (the same on every process: the metrics' keys)."""

    def take(self, rows: list[int]) -> Agent:
        index = torch.tensor(rows, dtype=torch.long, device=self.model_mask.device)
        return Agent(
            self.model_mask[index],
            *([x[i] for i in rows] for x in (self.exchanges, self.environments, self.stats)),
            self.tools,
        )

    @staticmethod
    def cat(parts: list[Agent], width: int | None = None) -> Agent:
        """Several batches' as one, masks padded on the right to `width` response tokens (default: the widest)."""
        width = width or max(a.model_mask.shape[1] for a in parts)
        mask = torch.cat([torch.nn.functional.pad(a.model_mask, (0, width - a.model_mask.shape[1])) for a in parts])
        return Agent(
            mask,
            *([x for a in parts for x in getattr(a, key)] for key in ("exchanges", "environments", "stats")),
            parts[0].tools,
        )

    def error_counts(self) -> tuple[int, int]:
        """(failed calls, calls) over the batch."""
        return sum(s["errors"] for s in self.stats), sum(s["calls"] for s in self.stats)

    def metrics(self) -> dict[str, float]:
        """Tool use over the batch: calls per episode (and per tool), the share of calls that failed, the
        share of episodes that called one, the model's turns per episode, and the shares of exchanges cut
        by the token budget or the turn limit."""
        n, (errors, calls) = len(self.stats), self.error_counts()
        out = {
            "tools/calls_per_episode": calls / n,
            "tools/error_share": errors / max(calls, 1),
            "tools/used_share": sum(s["calls"] > 0 for s in self.stats) / n,
            "tools/turns_per_episode": sum(s["turns"] for s in self.stats) / n,
            "tools/cut_by_budget": sum(s["cut"] == "budget" for s in self.stats) / n,
            "tools/cut_by_turns": sum(s["cut"] == "turns" for s in self.stats) / n,
        }
        for name in [*self.tools, UNKNOWN]:
            out[f"tools/calls/{name}"] = sum(s["per_tool"].get(name, 0) for s in self.stats) / n
        return out


UNKNOWN = "(unknown)"  # calls of a tool that does not exist, or that could not be read


def load_toolbox(cfg: PPOStage, tokenizer, prompts) -> Toolbox:
    """The run's tools and environment, once the prompts and the chat template are known to carry them."""
    if not data.is_conversational(data.take(prompts, [0])[0]):
        raise ConfigError(
            "ppo.tools: the prompts are plain text; tools are offered through the chat template, so "
            "give conversational prompts (a `prompt` column of message lists)"
        )
    toolbox = Toolbox(cfg.tools, cfg.environment, cfg.base_dir, cfg.tool_timeout_s)
    check_template(tokenizer, toolbox.schemas)
    result_ids(tokenizer, [{"role": "tool", "name": toolbox.names[0], "content": "x"}], tokenizer.eos_token)
    return toolbox


def dataset_rows(prompts, columns: dict, indices: list[int]) -> list[dict]:
    """The prompts' dataset rows (an environment's `reset(**row)` gets one)."""
    taken = {"prompt": data.take(prompts, indices), **{k: data.take(v, indices) for k, v in columns.items()}}
    return [{k: v[j] for k, v in taken.items()} for j in range(len(indices))]


def prompt_with_observation(prompt: list[dict], observation) -> list[dict]:
    """The prompt with what an environment's `reset` returned appended to its last message (trl's rule)."""
    if observation is None:
        return prompt
    prompt = copy.deepcopy(prompt)
    prompt[-1]["content"] = prompt[-1]["content"] + str(observation)
    return prompt


@torch.no_grad()
def generate_exchanges(
    model,
    tokenizer,
    prompts: list,
    rows: list[dict],
    toolbox: Toolbox,
    config: GenerationConfig,
    device,
    max_tool_turns: int,
    budget: int,
) -> Rollout:
    """Each prompt's exchange (see the module docstring): `rows` are the prompts' dataset rows (for the
    environment's `reset`), `config` samples one model turn (its max_new_tokens: a turn's), `budget`
    the most tokens an exchange has after its prompt, model's and inserted together."""
    n = len(prompts)
    started = [toolbox.start(row) for row in rows]
    environments, tools = [s[0] for s in started], [s[1] for s in started]
    prompts = [prompt_with_observation(p, s[2]) for p, s in zip(prompts, started)]
    context = [
        list(
            tokenizer.apply_chat_template(
                p, tools=toolbox.schemas, add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        for p in prompts
    ]
    ids, own = [[] for _ in range(n)], [[] for _ in range(n)]
    exchanges, has_stop = [[] for _ in range(n)], [False] * n
    stats = [{"turns": 0, "calls": 0, "errors": 0, "cut": None, "per_tool": {}} for _ in range(n)]
    going = list(range(n))
    for turn in range(max_tool_turns + 1):
        if not going:
            break
        left = {i: budget - len(ids[i]) for i in going}
        turn_config = copy.copy(config)
        turn_config.max_new_tokens = max(1, min(config.max_new_tokens, max(left.values())))
        out = generate(model, tokenizer, [None] * len(going), turn_config, device, [context[i] + ids[i] for i in going])
        calling = {}  # rollout: the calls of its turn, to run (those of every rollout together)
        for j, i in enumerate(going):
            length = int(out.response_mask[j].sum())
            new = out.responses[j, : min(length, left[i])].tolist()
            stopped = bool(out.has_stop[j]) and len(new) == length
            ids[i] += new
            own[i] += [1] * len(new)
            stats[i]["turns"] += 1
            if not stopped:  # cut by max_new_tokens or the budget: the exchange ends unfinished
                exchanges[i].append({"role": "assistant", "content": tokenizer.decode(new, skip_special_tokens=True)})
                stats[i]["cut"] = "budget" if len(ids[i]) >= budget else "length"  # (length: max_new_tokens)
                continue
            content, calls = parse_reply(tokenizer.decode(new[:-1], skip_special_tokens=False), tokenizer)
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [c.message() for c in calls]
            exchanges[i].append(message)
            if not calls:  # the answer
                has_stop[i] = True
            elif turn == max_tool_turns:  # a call past the last turn is not run: the exchange ends on it
                stats[i]["cut"] = "turns"
            else:
                calling[i] = calls
        results = toolbox.run([[(call, tools[i]) for call in calls] for i, calls in calling.items()])
        still = []
        for (i, calls), result in zip(calling.items(), results):
            messages, failed = zip(*result)
            try:
                inserted = result_ids(tokenizer, list(messages), tokenizer.decode([ids[i][-1]]))
            except Exception as e:  # a template that cannot render these results (e.g. one call a turn only)
                print(
                    f"warning: the chat template could not render a tool result ({one_line(e)}): the exchange "
                    f"ends on its call"
                )
                stats[i]["cut"] = "template"
                continue
            for call, fail in zip(calls, failed):
                stats[i]["calls"] += 1
                stats[i]["errors"] += fail
                key = call.name if call.name in tools[i] and not call.malformed else UNKNOWN
                stats[i]["per_tool"][key] = stats[i]["per_tool"].get(key, 0) + 1
            if len(ids[i]) + len(inserted) >= budget:  # no room for the results and an answer
                stats[i]["cut"] = "budget"
                continue
            ids[i] += inserted
            own[i] += [0] * len(inserted)
            exchanges[i] += messages
            still.append(i)
        going = still
    R = max(1, max(len(x) for x in ids))
    model_mask = torch.tensor([x + [0] * (R - len(x)) for x in own], device=device)
    return _as_rollout(
        tokenizer,
        prompts,
        context,
        ids,
        has_stop,
        Agent(model_mask, exchanges, environments, stats, toolbox.names),
        device,
    )


def _as_rollout(tokenizer, prompts, context, ids, has_stop, agent: Agent, device) -> Rollout:
    """The exchanges as a padded batch: prompts on the left, exchanges on the right."""
    R, pad = agent.model_mask.shape[1], tokenizer.pad_token_id
    enc = tokenizer.pad({"input_ids": context}, padding_side="left", return_tensors="pt").to(device)
    responses = torch.tensor([x + [pad] * (R - len(x)) for x in ids], device=device)
    mask = torch.tensor([[1] * len(x) + [0] * (R - len(x)) for x in ids], device=device)
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)  # (the exchanges' own tokens, no padding)
    has_stop = torch.tensor(has_stop, device=device)
    return Rollout.joined(prompts, context, enc, responses, mask, has_stop, texts, agent)
